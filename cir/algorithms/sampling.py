"""Dynamic sampling: which prompt groups carry a learning signal.

A group in which every sample got the same reward has zero advantage under any group
baseline; with `algo.dynamic_sampling` the trainer drops such groups and refills the batch
from the next problems: `informative_groups` says which trajectories stay, `missing_groups`
how many groups the step still lacks over all ranks, and `groups_to_keep` which of them each
rank trains on once there are enough.
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


def groups_to_keep(counts: list[list[int]], wanted_groups: int, rank: int) -> tuple[list[int], list[int]]:
    """Which of its informative groups `rank` keeps: per refill round, how many (its first ones)
    and the index in the step's global list of kept groups of the first of them.

    `counts[k][r]` is the number of informative groups rank `k` found in round `r`. The step
    keeps the first `wanted_groups` in the order one process would have found them: round by
    round and, within a round, by problem position (rank 0's contiguous shard, then rank 1's,
    ...). So the trained batch, and each trajectory's place in it, do not depend on the number
    of ranks, and no rank drops a group while the step still lacks some (a rank may train on
    more groups than another, or on none).
    """
    left, index = wanted_groups, 0
    rounds = len(counts[rank]) if counts else 0
    keep, first = [0] * rounds, [0] * rounds
    for r in range(rounds):
        for k, per_round in enumerate(counts):
            take = min(per_round[r], left)
            if k == rank:
                keep[r], first[r] = take, index
            left -= take
            index += take
    return keep, first
