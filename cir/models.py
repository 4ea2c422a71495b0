"""The policy model: `model.*` config, model builders by name, loading it, and tiny models built
from a config.

`load_policy` gives (model, tokenizer, metrics) for a Hugging Face folder or hub name, a cir
checkpoint, or a registered builder's model (`model.path=demo`: the demo task registers one,
see `register_model_builder`). `check_model_path` finds a missing folder in microseconds, before
anything heavy starts, and `model_architecture` reads what a model is (its Hugging Face config)
without building it, so that an engine can refuse a model it cannot serve as the config loads.
Importing this module is cheap: torch and transformers are imported by the functions that
build models.

Tiny models (`tiny_causal_lm`, for tests and the demo) use the Qwen2 architecture, so a
checkpoint saved from one loads unchanged in `transformers` and in vLLM, the same as a real
Qwen2.5 model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from cir.config_loader import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

# What `model.dtype` may be: the parameters' and optimizer state's dtype.
ModelDtype = Literal["float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[str, ...] = get_args(ModelDtype)


def __getattr__(name: str):
    # `DTYPES` (name -> torch dtype) imports torch, so it is made on first use, not at import.
    if name == "DTYPES":
        import torch

        return {dtype: getattr(torch, dtype) for dtype in DTYPE_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class ModelConfig:
    # A Hugging Face model directory or hub name, or a registered model builder's name ("demo":
    # the tiny model the demo task warm-starts itself).
    path: str = "demo"
    tokenizer: str | None = None  # default: the model's own
    dtype: ModelDtype = "float32"  # parameters and optimizer state
    # flash_attention_2 needs flash-attn (`pip install 'cir[flash]'`) and a GPU; it runs packed
    # micro-batches (optim.packing) through flash-attn's varlen kernel.
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class ModelBuilder:
    """A model made by code rather than loaded from a folder (see `register_model_builder`)."""

    build: Callable[..., tuple[Any, Any, dict]]
    architecture: Callable[[Any], dict] | None = None


_BUILDERS: dict[str, ModelBuilder] = {}


def register_model_builder(
    name: str,
    build: Callable[..., tuple[Any, Any, dict]],
    *,
    architecture: Callable[[Any], dict] | None = None,
    overwrite: bool = False,
) -> None:
    """Make `model.path=name` build a model with `build` instead of loading a folder.

    `build(*, device, dtype, seed, options, feedback_template, progress)` returns (model,
    tokenizer, metrics): `device`, `dtype` (torch) where and in what precision to put it, `seed`
    the run's seed, `options` the config section registered under the same name (None if
    none), `feedback_template` the rollout's output block (for a warm start on traces like the
    rollout's), `progress` whether to show a progress bar; `metrics` are logged at step 0.
    `architecture(options)`: the model's Hugging Face config as a dict, without building it.
    """
    if name in _BUILDERS and not overwrite:
        raise ValueError(f"a model builder named {name!r} is already registered (pass overwrite=True)")
    _BUILDERS[name] = ModelBuilder(build, architecture)


# A hub name: "name" or "org/name" (letters, digits, "-", "_", ".").
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_path(path: str, key: str = "model.path") -> None:
    """Raise ConfigError when `path` can be neither a registered builder, a local model folder
    nor a hub name.

    A path that exists must be a folder with a config.json; one that does not exist must
    look like a hub name ("org/name"); anything else (an absolute or relative path, "~/...") is a
    missing folder, reported here instead of as a hub lookup error minutes later.
    """
    if path in _BUILDERS:
        return
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"{key}={path!r}: {local} has no config.json (not a Hugging Face model folder)")
        return
    if not _HUB_NAME.match(path):
        raise ConfigError(f"{key}={path!r}: no such model folder")


def model_architecture(path: str, options: Any = None) -> Mapping | None:
    """The Hugging Face config (as a dict) of the model `path` names, without building or
    downloading it: a registered builder's `architecture(options)`, or a local folder's
    config.json. None when that cannot be known yet (a hub name, a builder that does not say)."""
    builder = _BUILDERS.get(path)
    if builder is not None:
        return None if builder.architecture is None else builder.architecture(options)
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config}: cannot read the model's config ({e})") from None


def load_policy(
    mc: ModelConfig,
    device: torch.device,
    *,
    checkpoint: Path | None = None,
    seed: int = 0,
    options: Any = None,
    feedback_template: str | None = None,
    progress: bool = False,
):
    """(model, tokenizer, metrics) for `model.*` = `mc`: from `checkpoint` when resuming, else
    from `mc.path` (a registered builder, called with `seed`, `options`, `feedback_template` and
    `progress`, see `register_model_builder`). The model is on `device`, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, mc.dtype)
    info: dict[str, float] = {}
    builder = _BUILDERS.get(mc.path)
    if checkpoint is not None:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=dtype, attn_implementation=mc.attn_implementation
        )
    elif builder is not None:
        model, tokenizer, info = builder.build(
            device=device,
            dtype=dtype,
            seed=seed,
            options=options,
            feedback_template=feedback_template,
            progress=progress,
        )
    else:
        tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer or mc.path)
        model = AutoModelForCausalLM.from_pretrained(mc.path, dtype=dtype, attn_implementation=mc.attn_implementation)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    if mc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.eval(), tokenizer, info


def padded_vocab_size(num_tokens: int, multiple: int = 64) -> int:
    """`num_tokens` rounded up to a multiple of `multiple` (friendlier matmul shapes)."""
    return -(-num_tokens // multiple) * multiple


def tiny_causal_lm(
    tokenizer,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    vocab_size: int | None = None,
) -> PreTrainedModel:
    """A randomly initialised `Qwen2ForCausalLM` whose vocabulary fits `tokenizer`.

    The embedding has `len(tokenizer)` rows rounded up to a multiple of 64 (the extra rows are
    never produced by the tokenizer), or `vocab_size` rows when given. EOS, pad and BOS ids come
    from the tokenizer and are set in both `model.config` and `model.generation_config`. `intermediate_size` defaults to
    4 x `hidden_size`. `dtype` defaults to float32. Initialisation uses its own RNG seeded with
    `seed`; the global torch RNG is left untouched.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
    eos, pad, bos = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    if eos is None:
        raise ValueError("tiny_causal_lm: the tokenizer has no EOS token")
    if vocab_size is None:
        vocab_size = padded_vocab_size(len(tokenizer))
    if vocab_size <= max(i for i in (eos, pad, bos) if i is not None):
        raise ValueError(f"tiny_causal_lm: vocab_size {vocab_size} does not cover the special token ids")
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=tie_word_embeddings,
        use_sliding_window=False,
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else eos,
        bos_token_id=bos,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.to(dtype or torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
    )
    model.eval()
    return model
