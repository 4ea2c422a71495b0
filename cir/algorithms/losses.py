"""Policy losses, registered by name, and how micro-batch losses add up to the step's loss.

A policy loss is registered (`cir.algorithms.registry`) with two implementations of the same
function: the plain torch `reference` (the definition, in `cir.kernels.policy_loss_ref`) and the
`fused` one (the Triton kernel behind `cir.kernels.policy_loss`, which falls back to the
reference off CUDA).
Tests compare the two on random inputs; `algo.loss_impl` picks the path at run time. A loss that
also registers its `per_token` term can be computed a slice of tokens at a time (`token_loss`),
which is what the LM head and the loss in one pass (`cir.kernels.linear_loss`) need.

Aggregation across micro-batches and ranks. Each micro-batch's loss comes back normalised
over that micro-batch alone (a token mean, a sequence mean, ...). `micro_batch_weight` is the
share of the whole step's loss that one micro-batch stands for, so that summing
``weight x loss`` over every micro-batch of every rank gives the loss of the global batch.
Data-parallel training averages gradients over ranks, so the weight carries a factor
`world_size` that the averaging divides out again.
"""

from __future__ import annotations

from cir.algorithms.registry import get_policy_loss
from cir.kernels.policy_loss_ref import AGGREGATIONS, TokenSeparableLoss


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
