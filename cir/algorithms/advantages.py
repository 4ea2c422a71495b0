"""Advantages by estimator name: ``compute_advantages(name, rewards, group_ids, ...)`` returns
one advantage per trajectory (the loss broadcasts it over the trajectory's model tokens).

The estimators are pure functions of tensors (the built-ins in `cir.algorithms.estimators`)
registered by name in `cir.algorithms.registry`. A group's samples always live on one rank, so
group statistics are local; batch statistics (REINFORCE++'s whitening) are taken over every
rank through the `DistributedContext`.
"""

from __future__ import annotations

import torch

from cir.algorithms.registry import get_advantage
from cir.distributed import DistributedContext


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
    estimator = get_advantage(name)
    rewards = rewards.to(torch.float64)
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-D shapes"
        )
    dist = dist or DistributedContext()
    out = estimator(rewards, group_ids.to(torch.long), num_tokens=num_tokens, eps=eps, dist=dist)
    return out.to(torch.float32)
