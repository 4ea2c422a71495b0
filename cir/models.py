"""The policy model: `model.*` config, loading it, and tiny models built from a config.

`load_policy` gives (model, tokenizer) for a Hugging Face folder or hub name, a cir
checkpoint, or a built-in task's model (`model.path=demo`). `check_model_path` finds a missing
folder in microseconds, before anything heavy starts.

Tiny models (`tiny_causal_lm`, for tests and the demo) use the Qwen2 architecture, so a
checkpoint saved from one loads unchanged in `transformers` and in vLLM, the same as a real
Qwen2.5 model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import GenerationConfig, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from cir.config_loader import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    # A Hugging Face model directory or hub name, or a built-in task's name ("demo": the tiny
    # model the demo warm-starts itself).
    path: str = "demo"
    tokenizer: str | None = None  # default: the model's own
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # parameters and optimizer state
    # flash_attention_2 needs flash-attn (`pip install 'cir[flash]'`) and a GPU; it runs packed
    # micro-batches (optim.packing) through flash-attn's varlen kernel.
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False


# A hub name: "name" or "org/name" (letters, digits, "-", "_", ".").
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_path(path: str, key: str = "model.path") -> None:
    """Raise ConfigError when `path` can be neither a local model folder nor a hub name.

    A path that exists must be a folder with a config.json; one that does not exist must
    look like a hub name ("org/name"); anything else (an absolute or relative path, "~/...") is a
    missing folder, reported here instead of as a hub lookup error minutes later.
    """
    from cir.tasks import get_task

    if get_task(path) is not None:
        return
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"{key}={path!r}: {local} has no config.json (not a Hugging Face model folder)")
        return
    if not _HUB_NAME.match(path):
        raise ConfigError(f"{key}={path!r}: no such model folder")


def load_policy(cfg, device: torch.device, *, checkpoint: Path | None = None):
    """(model, tokenizer, metrics) for the run `cfg` (a TrainConfig): from `checkpoint` when
    resuming, else from `cfg.model.path` (a task's `build_policy` when it names one). The model
    is on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cir.tasks import get_task

    mc = cfg.model
    dtype = DTYPES[mc.dtype]
    info: dict[str, float] = {}
    task = get_task(mc.path)
    if checkpoint is not None:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=dtype, attn_implementation=mc.attn_implementation
        )
    elif task is not None:
        model, tokenizer, info = task.build_policy(cfg, device, dtype)
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
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    vocab_size: int | None = None,
) -> PreTrainedModel:
    """A randomly initialised `Qwen2ForCausalLM` whose vocabulary fits `tokenizer`.

    The embedding has `len(tokenizer)` rows rounded up to a multiple of 64 (the extra rows are
    never produced by the tokenizer), or `vocab_size` rows when given. EOS, pad and BOS ids come
    from the tokenizer and are set in both `model.config` and `model.generation_config`. `intermediate_size` defaults to
    4 x `hidden_size`. Initialisation uses its own RNG seeded with `seed`; the global torch RNG is
    left untouched.
    """
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
    model.to(dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
    )
    model.eval()
    return model
