"""How the actor updates: `optim.*` (the optimizer, its learning-rate schedule and the update's
batch shape) and `sharding.*` (how its parameters are laid out over ranks, and the dtype it
computes in; applied by `cir.training.sharding`). Plain dataclasses: no torch here."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from cir.config_loader import ConfigError


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0: no clipping
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0
    ppo_epochs: int = 1
    mini_batches: int = 1  # optimizer steps per RL step (per epoch)
    # Tokens per forward/backward: padded slots (count x longest), or with `packing` the sum of
    # the lengths packed into one row. A longer single trajectory gets a forward of its own.
    micro_batch_tokens: int = 16384
    # Pack each micro-batch's sequences into one row (no padding; position ids mark where each
    # starts) instead of right-padding them. Pays off with flash-attn's varlen kernel
    # (model.attn_implementation=flash_attention_2); with sdpa/eager `transformers` builds a
    # dense [total, total] block-diagonal mask, so attention grows with the square of the row.
    packing: bool = False

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr}: must be > 0")
        for name in ("ppo_epochs", "mini_batches", "micro_batch_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")

    @property
    def on_policy(self) -> bool:
        """Strictly on-policy (one epoch, one mini-batch): every optimizer step trains on samples
        of the weights it starts from, so the old log-probs are the update's own forward (ratio
        exactly 1) and need no extra pass."""
        return self.ppo_epochs == 1 and self.mini_batches == 1


def lr_multiplier(cfg: OptimConfig, total_optimizer_steps: int) -> Callable[[int], float]:
    """The LR factor by optimizer step: linear warm-up, then the schedule's decay over
    `total_optimizer_steps` (for `torch.optim.lr_scheduler.LambdaLR`)."""
    total = max(1, total_optimizer_steps)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        frac = min(1.0, step / total)
        if cfg.lr_schedule == "cosine":
            decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
        elif cfg.lr_schedule == "linear":
            decay = 1.0 - (1 - cfg.min_lr_ratio) * frac
        else:
            decay = 1.0
        return warm * decay

    return factor


@dataclass
class ShardingConfig:
    """`sharding.*`: the actor's FSDP2 layout, used on CUDA (any number of ranks) and with
    several ranks on the CPU; one CPU process trains the plain module."""

    # Replicas of the sharded model (HSDP): the ranks form a [replicate, world / replicate] mesh;
    # each replica shards the parameters over its ranks and gradients are averaged across
    # replicas. 1: plain FSDP over every rank. One replica per node (replicate = nodes) keeps the
    # per-layer all-gathers on the node's fast links.
    replicate: int = 1
    # What the forward and backward compute in on CUDA: bfloat16 casts the parameters for each
    # pass while the master weights and the optimizer state stay in model.dtype and gradients
    # are reduced in float32. float32 computes in model.dtype. The CPU computes in model.dtype.
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"

    def __post_init__(self) -> None:
        if self.replicate < 1:
            raise ConfigError(f"replicate={self.replicate}: must be >= 1")


def actor_compute_dtype(model_dtype: str, sharding: ShardingConfig, device: str) -> str:
    """The dtype the actor's forward and backward run in (a torch dtype's name): on CUDA
    `sharding.compute_dtype` when it is bfloat16 (FSDP2's mixed precision), else `model_dtype`."""
    if device == "cuda" and sharding.compute_dtype == "bfloat16":
        return "bfloat16"
    return model_dtype


def attention_precision_problem(attn_implementation: str, compute_dtype: str, device: str) -> str | None:
    """Why the actor cannot run `attn_implementation` on `device` ("cpu" or "cuda") computing in
    `compute_dtype` (a torch dtype's name; see `actor_compute_dtype`), or None. flash-attn runs
    on CUDA only, in float16 or bfloat16 only."""
    if attn_implementation != "flash_attention_2":
        return None
    if device != "cuda":
        return f"model.attn_implementation=flash_attention_2 runs on CUDA only, and the actor is on {device}"
    if compute_dtype not in ("bfloat16", "float16"):
        return (
            f"model.attn_implementation=flash_attention_2 needs bfloat16 or float16 compute, and the actor would "
            f"compute in {compute_dtype} (on CUDA: sharding.compute_dtype if bfloat16, else model.dtype); "
            "use sharding.compute_dtype=bfloat16"
        )
    return None
