"""Batch-level rollout numbers for the trainer's metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from cir.trajectory import Trajectory

# "sandbox_fault": the sandbox could not run a block (the machine's fault); the trajectory ends there.
FINISH_REASONS = ("eos", "length", "budget", "sandbox_fault")


def rollout_totals(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Counts over a batch of trajectories (they add up over ranks; `rates` turns them into
    the metrics)."""
    reasons = Counter(t.finish_reason for t in trajectories)
    totals = {
        "trajectories": len(trajectories),
        "tool_calls": sum(t.num_tool_calls for t in trajectories),
        "exec_errors": sum(t.num_exec_errors for t in trajectories),
        "sandbox_faults": sum(t.num_sandbox_faults for t in trajectories),
        "timeouts": sum(t.num_timeouts for t in trajectories),
        "budget_notices": sum(len(t.tool_calls) - t.num_tool_calls for t in trajectories),
        "model_tokens": sum(t.num_model_tokens for t in trajectories),
        "feedback_tokens": sum(t.num_feedback_tokens for t in trajectories),
    }
    for reason in FINISH_REASONS:
        totals[f"finish_{reason}"] = reasons.get(reason, 0)
    return totals


def rates(totals: dict[str, float]) -> dict[str, float]:
    """Means per trajectory and rates per call from `rollout_totals` (summed over any ranks)."""
    n, calls = totals["trajectories"], totals["tool_calls"]
    faults = totals.get("sandbox_faults", 0)
    judged = calls - faults
    if n == 0:
        return {}
    tokens = totals["model_tokens"] + totals["feedback_tokens"]
    stats = {
        "tool_calls_per_traj": calls / n,
        # The model's errors and timeouts are rates over the calls that reached a verdict of the
        # code's own: a sandbox fault is the machine's, counted apart (its rate is over all calls).
        "exec_error_rate": totals["exec_errors"] / judged if judged else 0.0,
        "timeout_rate": totals["timeouts"] / judged if judged else 0.0,
        "sandbox_fault_rate": faults / calls if calls else 0.0,
        "budget_notices_per_traj": totals["budget_notices"] / n,
        "response_tokens_mean": tokens / n,
        "model_tokens_mean": totals["model_tokens"] / n,
        "feedback_token_share": totals["feedback_tokens"] / tokens if tokens else 0.0,
    }
    for reason in FINISH_REASONS:
        stats[f"finish_{reason}"] = totals[f"finish_{reason}"] / n
    return stats


def rollout_stats(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Batch-level numbers for the trainer's metrics (means per trajectory, rates per call)."""
    return rates(rollout_totals(trajectories))
