"""The machine's faults, kept out of training: which trajectories a step trains on, what it logs
about faults, and when too many of them stop the run.

A trajectory whose reward has `RewardResult.fault` set (the sandbox could not run one of its tool
calls, or the grader could not decide) is no verdict on the model. It is left out of the loss,
and its group is scored from its survivors: the advantage estimators only ever see those, so a
group baseline is the mean of the survivors and REINFORCE++'s whitening runs over survivors only.
A group left with fewer than two survivors (no baseline to speak of) is dropped whole. A group
that lost nothing is kept as it is, whatever its size, so a run without faults trains on
exactly what it did before.

Everything here is a pure function of plain values (`FaultWatch` holds a count of steps), so it
is tested alone (tests/test_training_faults.py); the trainer calls it in a few lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# A group that lost a trajectory to a fault is scored from its survivors if at least this many
# are left: fewer have no baseline (one sample's mean is itself).
MIN_SURVIVORS = 2


@dataclass
class Exclusion:
    """What one step left out of the loss because of faults (counts; they add up over rounds)."""

    faulted: int = 0  # trajectories with a fault (sandbox or grader)
    trajectories: int = 0  # every trajectory left out: the faulted ones and the survivors of dropped groups
    groups: int = 0  # groups dropped whole: fewer than MIN_SURVIVORS survivors
    partial_groups: int = 0  # groups scored from their survivors (they lost at least one)

    def __add__(self, other: Exclusion) -> Exclusion:
        return Exclusion(
            self.faulted + other.faulted,
            self.trajectories + other.trajectories,
            self.groups + other.groups,
            self.partial_groups + other.partial_groups,
        )

    def as_totals(self) -> dict[str, float]:
        """Counts under the names `cir.metrics.step_metrics` sums over ranks and logs."""
        return {
            "fault/excluded_trajectories": float(self.trajectories),
            "fault/excluded_groups": float(self.groups),
            "fault/partial_groups": float(self.partial_groups),
        }


def fault_survivors(faulted: Sequence[bool], groups: Sequence[int]) -> tuple[list[int], Exclusion]:
    """The indices (in order) of the trajectories a step may train on, and what was left out.

    `faulted[i]`: trajectory i's reward is a fault; `groups[i]`: its group. A faulted trajectory
    is left out; so is every trajectory of a group that lost one and kept fewer than
    `MIN_SURVIVORS`."""
    if len(faulted) != len(groups):
        raise ValueError(f"{len(faulted)} fault flags for {len(groups)} group ids")
    size: dict[int, int] = {}
    lost: dict[int, int] = {}
    for f, g in zip(faulted, groups):
        size[g] = size.get(g, 0) + 1
        lost[g] = lost.get(g, 0) + bool(f)
    dropped = {g for g in size if lost[g] and size[g] - lost[g] < MIN_SURVIVORS}
    keep = [i for i, (f, g) in enumerate(zip(faulted, groups)) if not f and g not in dropped]
    excluded = Exclusion(
        faulted=sum(lost.values()),
        trajectories=len(groups) - len(keep),
        groups=len(dropped),
        partial_groups=sum(1 for g in size if lost[g] and g not in dropped),
    )
    return keep, excluded


def count_groups(groups: Sequence[int]) -> int:
    return len(set(groups))


def first_groups(groups: Sequence[int], take: int, first_index: int, slots: int) -> tuple[int, list[int]]:
    """The trajectories of the first `take` groups of `groups` (group ids, each group's members
    next to each other, as the rollout returns them): how many there are, and each one's position
    in the step's global list, where group number `first_index + q` owns the `slots` positions from
    `(first_index + q) * slots` (`slots`: `algo.group_size`). A group scored from fewer survivors
    leaves the rest of its positions empty, so which mini-batch a trajectory joins
    (`cir.training.batch`) does not depend on other groups' faults."""
    positions: list[int] = []
    q, k, previous = -1, 0, object()
    for g in groups:
        if g != previous:
            q, k, previous = q + 1, 0, g
            if q == take:
                break
        positions.append((first_index + q) * slots + k)
        k += 1
    return len(positions), positions


def counter_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """`after - before`, key by key, of two snapshots of counters that only grow (e.g.
    `Sandbox.counters()`): one step's counts."""
    return {k: float(after[k] - before.get(k, 0)) for k in after}


@dataclass(frozen=True)
class FaultVerdict:
    """What `FaultWatch.check` says after a step: "ok", "warn" or "stop", and the message (naming
    the figures) to print for the last two."""

    action: str
    message: str = ""


class FaultWatch:
    """Stops a run whose sandbox keeps failing: the share of tool calls that ended in a sandbox
    fault, step by step. Above `warn_share` it warns; above `stop_share` for `stop_steps` steps in a
    row it says stop. Fed the step's counts summed over ranks, every rank reaches the same verdict
    at the same step. The count of steps in a row is not checkpointed: a resumed run starts it
    again."""

    def __init__(self, *, warn_share: float, stop_share: float, stop_steps: int, key: str = "sandbox"):
        self.warn_share, self.stop_share, self.stop_steps, self.key = warn_share, stop_share, stop_steps, key
        self.high_steps = 0  # steps in a row above stop_share

    def check(self, step: int, faults: float, calls: float) -> FaultVerdict:
        share = faults / calls if calls else 0.0
        self.high_steps = self.high_steps + 1 if share > self.stop_share else 0
        figures = f"{share:.1%} of tool calls ({int(faults)} of {int(calls)}) at step {step}"
        k = self.key
        if self.high_steps >= self.stop_steps:
            return FaultVerdict(
                "stop",
                f"sandbox faults were over {k}.fault_stop_share={self.stop_share:g} of tool calls for "
                f"{self.high_steps} steps in a row ({k}.fault_stop_steps={self.stop_steps}); the last: {figures}",
            )
        if share > self.warn_share:
            return FaultVerdict(
                "warn", f"sandbox faults: {figures}, over {k}.fault_warn_share={self.warn_share:g} (see fault/ metrics)"
            )
        return FaultVerdict("ok")
