"""Policy losses, registered by name, and how micro-batch losses add up to the step's loss.

A policy loss is registered with two implementations of the same function: the plain torch
`reference` (the definition, in `cir.kernels.policy_loss_ref`) and the `fused` one (the
Triton kernel behind `cir.kernels.policy_loss`, which falls back to the reference off CUDA).
Tests compare the two on random inputs; `algo.loss_impl` picks the path at run time. A loss may
also register its `per_token` term (the loss of one token from that token's values, before the
mask and the aggregation): `token_loss` then gives the loss as a sum over tokens taken a slice at
a time, which is what the fused LM-head pass (`cir.kernels.linear_loss`) needs.

Aggregation across micro-batches and ranks. Each micro-batch's loss comes back normalised
over that micro-batch alone (a token mean, a sequence mean, ...). `micro_batch_weight` is the
share of the whole step's loss that one micro-batch stands for, so that summing
``weight x loss`` over every micro-batch of every rank gives the loss of the global batch.
Data-parallel training averages gradients over ranks, so the weight carries a factor
`world_size` that the averaging divides out again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cir.kernels import policy_loss as fused_policy_loss
from cir.kernels.policy_loss_ref import (
    AGGREGATIONS,
    TokenSeparableLoss,
    policy_loss_reference,
    ppo_clip_token_loss,
)


@dataclass(frozen=True)
class PolicyLoss:
    """One loss, two implementations with the same signature (see `cir.kernels.policy_loss`),
    and optionally its per-token term (`cir.kernels.policy_loss_ref.ppo_clip_token_loss`'s
    signature), which lets the fused LM-head pass compute it."""

    name: str
    reference: Callable
    fused: Callable
    per_token: Callable | None = None


_POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(
    name: str, *, reference: Callable, fused: Callable | None = None, per_token: Callable | None = None
) -> PolicyLoss:
    """Register a policy loss; without a fused implementation the reference serves both. With
    `per_token` (the loss of each token alone, which the reference aggregates with the mask and
    `algo.aggregation`) the fused LM-head pass can compute it too."""
    if name in _POLICY_LOSSES:
        raise ValueError(f"policy loss {name!r} is already registered")
    entry = PolicyLoss(name, reference, fused or reference, per_token)
    _POLICY_LOSSES[name] = entry
    return entry


def policy_loss_names() -> list[str]:
    return sorted(_POLICY_LOSSES)


def get_policy_loss(name: str) -> PolicyLoss:
    if name not in _POLICY_LOSSES:
        raise KeyError(f"unknown policy loss {name!r}; known: {', '.join(policy_loss_names())}")
    return _POLICY_LOSSES[name]


def compute_policy_loss(name: str, *args, impl: str = "auto", **kwargs):
    """The loss `name` by the implementation `impl`: "reference" is the plain definition;
    "auto" | "triton" | "torch" go through the fused entry point, which picks among them."""
    entry = get_policy_loss(name)
    if impl == "reference":
        return entry.reference(*args, **kwargs)
    return entry.fused(*args, impl=impl, **kwargs)


def token_loss(name: str, old_logprob, advantages, loss_mask, **kwargs) -> TokenSeparableLoss:
    """The loss `name` as a sum over tokens, evaluated a slice of tokens at a time (for the fused
    LM-head pass): the arguments of `compute_policy_loss` less the log-probs and entropies, which
    the pass computes (`old_logprob` None: on-policy, each token's own log-prob detached)."""
    entry = get_policy_loss(name)
    if entry.per_token is None:
        raise ValueError(f"policy loss {name!r} has no per-token term registered: the fused pass cannot compute it")
    return TokenSeparableLoss(entry.per_token, old_logprob, advantages, loss_mask, **kwargs)


# The clipped surrogate of PPO / GRPO / REINFORCE++ with asymmetric clip ("clip-higher"),
# optional dual clip, KL to a reference (capped per token) and an entropy bonus.
register_policy_loss(
    "ppo_clip", reference=policy_loss_reference, fused=fused_policy_loss, per_token=ppo_clip_token_loss
)


def micro_batch_weight(
    aggregation: str,
    *,
    tokens: int,
    seqs: int,
    total_tokens: int,
    total_seqs: int,
    world_size: int = 1,
) -> float:
    """The weight of one micro-batch's self-normalised loss in the step's loss.

    `tokens`, `seqs`: the micro-batch's trained (model) tokens and sequences; `total_tokens`,
    `total_seqs`: the same over the whole mini-batch on every rank. "token-mean" weighs by
    tokens; the sequence-level aggregations (whose per-micro-batch loss is a mean over its
    sequences) weigh by sequences.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; known: {', '.join(AGGREGATIONS)}")
    if aggregation == "token-mean":
        return world_size * tokens / max(total_tokens, 1)
    return world_size * seqs / max(total_seqs, 1)
