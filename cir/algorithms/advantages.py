"""Advantage estimators: pure functions of tensors, registered by name.

``compute_advantages(name, rewards, group_ids, ...)`` returns one advantage per trajectory
(the loss broadcasts it over the trajectory's model tokens). A group's samples always live on
one rank, so group statistics are local; batch statistics (REINFORCE++'s whitening) are taken
over every rank through the `DistributedContext`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from cir.distributed import DistributedContext

AdvantageFn = Callable[..., torch.Tensor]
_ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register an advantage estimator under `name`.

    The function takes ``(rewards [n] float, group_ids [n] long, *, num_tokens [n] | None,
    eps: float, dist: DistributedContext)`` and returns advantages ``[n]`` (float32). Estimators
    that use statistics of the whole batch must reduce them through `dist`.
    """

    def wrap(fn: AdvantageFn) -> AdvantageFn:
        if name in _ADVANTAGES:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        # An estimator written without `dist` (group statistics only) is called without it.
        params = inspect.signature(fn).parameters
        takes_dist = "dist" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        _ADVANTAGES[name] = fn if takes_dist else functools.partial(_without_dist, fn)
        return fn

    return wrap


def _without_dist(fn: AdvantageFn, *args, dist=None, **kwargs) -> torch.Tensor:
    return fn(*args, **kwargs)


def advantage_names() -> list[str]:
    return sorted(_ADVANTAGES)


def compute_advantages(
    name: str,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    num_tokens: torch.Tensor | None = None,
    eps: float = 1e-6,
    dist: DistributedContext | None = None,
) -> torch.Tensor:
    """Advantages of `n` trajectories; `group_ids[i]` is the prompt trajectory i samples.

    `num_tokens[i]` (model tokens of trajectory i) is used by estimators that normalise over
    tokens rather than trajectories (REINFORCE++). `dist`: where batch statistics are reduced
    (default: this process alone).
    """
    if name not in _ADVANTAGES:
        raise KeyError(f"unknown advantage estimator {name!r}; known: {', '.join(advantage_names())}")
    rewards = rewards.to(torch.float64)
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-D shapes"
        )
    dist = dist or DistributedContext()
    out = _ADVANTAGES[name](rewards, group_ids.to(torch.long), num_tokens=num_tokens, eps=eps, dist=dist)
    return out.to(torch.float32)


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


@register_advantage("grpo")
def grpo(rewards, group_ids, *, num_tokens=None, eps=1e-6, dist=None):
    """GRPO: reward minus its group mean, divided by the group std."""
    mean, std, _ = _group_stats(rewards, group_ids)
    # A group whose rewards are all equal has std 0 and zero centred rewards: advantage 0.
    return torch.where(std > 0, (rewards - mean) / (std + eps), torch.zeros_like(mean))


@register_advantage("grpo_no_std")
def grpo_no_std(rewards, group_ids, *, num_tokens=None, eps=1e-6, dist=None):
    """GRPO without std normalisation: reward minus its group mean."""
    mean, _, _ = _group_stats(rewards, group_ids)
    return rewards - mean


@register_advantage("dr_grpo")
def dr_grpo(rewards, group_ids, *, num_tokens=None, eps=1e-6, dist=None):
    """Dr. GRPO: group-mean baseline, no std division. Pair it with the length-unbiased
    ``seq-mean-token-sum-norm`` loss aggregation (the trainer's preset does)."""
    return grpo_no_std(rewards, group_ids)


@register_advantage("rloo")
def rloo(rewards, group_ids, *, num_tokens=None, eps=1e-6, dist=None):
    """RLOO: reward minus the mean of the *other* samples of the same prompt.

    r_i - (S - r_i)/(k - 1) = k/(k-1) * (r_i - mean); a group of one gets 0.
    """
    mean, _, k = _group_stats(rewards, group_ids)
    scale = torch.where(k > 1, k / (k - 1).clamp(min=1), torch.zeros_like(mean))
    return scale * (rewards - mean)


@register_advantage("reinforce_pp_baseline")
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
