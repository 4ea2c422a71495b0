"""Batch-level rollout numbers for the trainer's metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from cir.trajectory import Trajectory


def rollout_stats(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Batch-level numbers for the trainer's metrics (means per trajectory, rates per call)."""
    n = len(trajectories)
    if n == 0:
        return {}
    calls = sum(t.num_tool_calls for t in trajectories)
    model_tokens = sum(t.num_model_tokens for t in trajectories)
    feedback_tokens = sum(t.num_feedback_tokens for t in trajectories)
    reasons = Counter(t.finish_reason for t in trajectories)
    stats = {
        "tool_calls_per_traj": calls / n,
        "exec_error_rate": sum(t.num_exec_errors for t in trajectories) / calls if calls else 0.0,
        "timeout_rate": sum(t.num_timeouts for t in trajectories) / calls if calls else 0.0,
        "budget_notices_per_traj": sum(len(t.tool_calls) - t.num_tool_calls for t in trajectories) / n,
        "response_tokens_mean": (model_tokens + feedback_tokens) / n,
        "model_tokens_mean": model_tokens / n,
        "feedback_token_share": feedback_tokens / (model_tokens + feedback_tokens)
        if model_tokens + feedback_tokens
        else 0.0,
    }
    for reason, count in sorted(reasons.items()):
        stats[f"finish_{reason or 'unknown'}"] = count / n
    return stats
