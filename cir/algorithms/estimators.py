"""The built-in advantage estimators: pure functions of tensors, registered by name in
`cir.algorithms.registry` (`algo.advantage`) and called through `compute_advantages`.

Each takes ``(rewards [n] float64, group_ids [n] long, *, num_tokens, eps, dist)`` and returns
``[n]`` advantages; group statistics are local (a group's samples live on one rank), batch
statistics go through `dist`.
"""

from __future__ import annotations

import torch

from cir.distributed import DistributedContext


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor):
    """Per-trajectory group mean, group (unbiased) std and group size."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    g = counts.numel()
    sums = torch.zeros(g, dtype=rewards.dtype).index_add_(0, inverse, rewards)
    mean = sums / counts
    dev2 = torch.zeros(g, dtype=rewards.dtype).index_add_(0, inverse, (rewards - mean[inverse]) ** 2)
    # Unbiased std, as torch.std; a group of one has std 0.
    std = torch.where(counts > 1, (dev2 / (counts - 1).clamp(min=1)).sqrt(), torch.zeros_like(dev2))
    return mean[inverse], std[inverse], counts[inverse]


def grpo(rewards, group_ids, *, num_tokens=None, eps=1e-6, dist=None):
    """GRPO: reward minus its group mean, divided by the group std."""
    mean, std, _ = _group_stats(rewards, group_ids)
    # A group whose rewards are all equal has std 0 and zero centred rewards: advantage 0.
    return torch.where(std > 0, (rewards - mean) / (std + eps), torch.zeros_like(mean))


def grpo_no_std(rewards, group_ids, *, num_tokens=None, eps=1e-6, dist=None):
    """GRPO without std normalisation: reward minus its group mean."""
    mean, _, _ = _group_stats(rewards, group_ids)
    return rewards - mean


def dr_grpo(rewards, group_ids, *, num_tokens=None, eps=1e-6, dist=None):
    """Dr. GRPO: group-mean baseline, no std division. Pair it with the length-unbiased
    ``seq-mean-token-sum-norm`` loss aggregation (the trainer's preset does)."""
    return grpo_no_std(rewards, group_ids)


def rloo(rewards, group_ids, *, num_tokens=None, eps=1e-6, dist=None):
    """RLOO: reward minus the mean of the *other* samples of the same prompt.

    r_i - (S - r_i)/(k - 1) = k/(k-1) * (r_i - mean); a group of one gets 0.
    """
    mean, _, k = _group_stats(rewards, group_ids)
    scale = torch.where(k > 1, k / (k - 1).clamp(min=1), torch.zeros_like(mean))
    return scale * (rewards - mean)


def reinforce_pp_baseline(rewards, group_ids, *, num_tokens=None, eps=1e-6, dist=None):
    """REINFORCE++ with a per-group baseline (the paper's estimator).

    Subtract the group mean reward, then whiten over the whole batch (every rank's share of
    it). The batch statistics are taken over tokens (each trajectory weighted by its
    model-token count) when `num_tokens` is given, as the per-token advantages of the batch
    are what gets whitened.
    """
    mean, _, _ = _group_stats(rewards, group_ids)
    centred = rewards - mean
    w = torch.ones_like(centred) if num_tokens is None else num_tokens.to(centred.dtype).clamp(min=0)
    dist = dist or DistributedContext()
    total, mu, var = dist.weighted_mean_var(centred, w)
    if total <= 0:
        return torch.zeros_like(centred)
    return (centred - mu) / (var.sqrt() + eps)
