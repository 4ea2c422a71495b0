"""The sampler/trainer mismatch: how far the engine's log-probs are from the trainer's, and an
optional importance-sampling correction for it.

The engine samples with its own kernels and precision (vLLM in bf16, say), so the policy that
sampled a token is not exactly the one the trainer computes, even with the same weights. Every
step measures the gap over model tokens (`mismatch_metrics`); `importance_weights` offers the
corrections peers use, as per-token weights on the advantages:

- "token_tis" (truncated importance sampling): w_t = min(pi_old(t) / pi_sampler(t), cap);
- "seq_mis" (masked importance sampling): a sequence whose geometric-mean ratio
  exp(mean_t log(pi_old / pi_sampler)) lies outside [1/cap, cap] gets weight 0, the others 1.

Weights are non-negative, and the clipped surrogate is positively homogeneous in the advantage
(min(r A, clip(r) A) scaled by w >= 0 is the same with w A), so weighting the advantages
token by token weights each token's loss. Off ("none") by default.
"""

from __future__ import annotations

from typing import Literal

import torch

Correction = Literal["none", "token_tis", "seq_mis"]
CORRECTIONS: tuple[str, ...] = ("none", "token_tis", "seq_mis")


def mismatch_metrics(trainer_logprob: torch.Tensor, sampler_logprob: torch.Tensor, mask: torch.Tensor) -> dict:
    """Over the tokens where `mask` > 0: the mean and max |trainer - sampler| log-prob, and a
    KL(sampler || trainer) estimate (k3: r - 1 - log r with r = pi_trainer / pi_sampler, unbiased
    under the sampler's samples). 0-d float32 tensors; zeros when no token counts."""
    trainer_logprob = trainer_logprob.detach()
    n = mask.sum().clamp(min=1)
    diff = trainer_logprob - sampler_logprob
    keep = mask > 0
    d64 = diff.double()[keep]
    zero = trainer_logprob.new_zeros(())
    return {
        "logprob_diff_sampler": (diff.abs() * mask).sum() / n,
        "logprob_diff_sampler_max": d64.abs().max().float() if d64.numel() else zero,
        "sampler_kl": (torch.expm1(d64) - d64).mean().float() if d64.numel() else zero,
    }


def importance_weights(
    old_logprob: torch.Tensor,
    sampler_logprob: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    mode: str,
    cap: float,
) -> torch.Tensor | None:
    """Per-token weights [n] for packed tokens (sequence s is cu_seqlens[s]:cu_seqlens[s+1]);
    None for "none". Tokens with `mask` 0 (interpreter feedback) get weight 0 here and count
    for nothing in the sequence ratio."""
    if mode == "none":
        return None
    if mode not in CORRECTIONS:
        raise ValueError(f"unknown rollout correction {mode!r}; known: {', '.join(CORRECTIONS)}")
    if not cap > 1:
        raise ValueError(f"rollout correction cap must be > 1, got {cap}")
    keep = (mask > 0).to(torch.float64)
    log_ratio = (old_logprob.detach().double() - sampler_logprob.double()) * keep
    if mode == "token_tis":
        return (log_ratio.exp().clamp(max=cap) * keep).to(old_logprob.dtype)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    sums = torch.zeros(lengths.numel(), dtype=torch.float64, device=log_ratio.device).index_add_(0, seq, log_ratio)
    counts = torch.zeros_like(sums).index_add_(0, seq, keep)
    mean_log = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    inside = mean_log.abs() <= torch.log(torch.tensor(cap, dtype=torch.float64))
    return (inside.to(torch.float64)[seq] * keep).to(old_logprob.dtype)
