"""One factory for generation engines, chosen by `run.engine`.

The trainer and `cir eval` call `make_engine`; nothing else names a concrete engine. An engine
gets the policy's architecture and initial weights here, and afterwards new weights only
through `Engine.load_weights` (see `cir.training.actor.sync_weights`).
"""

from __future__ import annotations

from typing import Literal, get_args

EngineName = Literal["hf"]
ENGINES: tuple[str, ...] = get_args(EngineName)
DEFAULT_ENGINE = "hf"  # no extra install, any transformers causal LM, CPU or one GPU


def make_engine(name: str, model, tokenizer, *, max_batch_size: int, seed: int, share_model: bool = False):
    """An engine serving `model` (a `transformers` causal LM) with `tokenizer`.

    `share_model=False` (training): the engine works on its own copy, so the trainer's module
    is never touched by generation. `share_model=True` (evaluation of a model nobody trains):
    no second copy.
    """
    if name == "hf":
        from cir.engines.hf import HFEngine

        return HFEngine(model, tokenizer, max_batch_size=max_batch_size, seed=seed, share_model=share_model)
    raise ValueError(f"engine {name!r}: choose one of {', '.join(ENGINES)}")
