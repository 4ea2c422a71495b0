"""Sampling seeds as pure functions of where a sample sits, so a resumed run, another number of
ranks or another schedule draws the same samples.

`sample_seed` seeds one trajectory from its parts (training: run seed, step, refill round,
problem position, sample; evaluation: run seed, problem position, sample); `derive_seed` seeds
each generate call of a trajectory from the trajectory's seed and the turn. Both are hashes, so
neighbouring trajectories' and turns' streams are unrelated.
"""

from __future__ import annotations

import hashlib


def sample_seed(*parts: int) -> int:
    """A trajectory's sampling seed: a pure function of its parts (stable across processes)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def derive_seed(seed: int | None, turn: int) -> int | None:
    """The seed of generate call number `turn` of a trajectory seeded `seed` (None: unseeded).

    A pure function of (seed, turn), so a trajectory is the same under any scheduling.
    """
    if seed is None:
        return None
    digest = hashlib.blake2b(f"cir.rollout:{int(seed)}:{int(turn)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
