"""Dynamic sampling: which prompt groups carry a learning signal.

A group in which every sample got the same reward has zero advantage under any group
baseline; with `algo.dynamic_sampling` the trainer drops such groups and refills the batch
from the next problems: `informative_groups` says which trajectories stay, `missing_groups`
how many groups the step still lacks over all ranks.
"""

from __future__ import annotations

import torch

from cir.distributed import DistributedContext


def informative_groups(rewards: torch.Tensor, group_ids: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """Dynamic sampling: True for trajectories whose group's rewards are not all equal.

    A group in which every sample got the same reward has zero advantage everywhere under
    any group baseline, so it only dilutes the batch.
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    g = int(inverse.max()) + 1 if inverse.numel() else 0
    big = torch.finfo(torch.float64).max
    r = rewards.to(torch.float64)
    lo = torch.full((g,), big, dtype=torch.float64).scatter_reduce(0, inverse, r, reduce="amin")
    hi = torch.full((g,), -big, dtype=torch.float64).scatter_reduce(0, inverse, r, reduce="amax")
    return (hi - lo > tol)[inverse]


def missing_groups(kept_groups: int, wanted_groups: int, dist: DistributedContext) -> int:
    """How many more informative groups the whole step needs (the same number on every rank)."""
    (kept,) = dist.sum_floats([kept_groups])
    return max(0, wanted_groups - int(kept))
