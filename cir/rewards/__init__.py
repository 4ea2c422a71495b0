"""Rewards: extract the final boxed answer, grade it against the reference, shape the reward.

Three layers, each usable alone:

* **Extraction** (`cir.rewards.answers`: `extract_boxed`, `extract_all_boxed`,
  `normalize_answer`, `normalize_reference`): pure string work.
* **Grading** (`cir.rewards.grader`: `grade`, `grade_batch`, `grade_outcomes`, `GraderPool`,
  `grader_counters`): symbolic equivalence with `math-verify` in a shared pool of worker
  processes, each request with a deadline, retried on a fresh worker when one hangs or dies.
* **Rewards** (`cir.rewards.registry`) registered by name (`register_reward`, `get_reward`,
  `compute_rewards`, `score_trajectories`). The built-in ``"math"`` reward is the paper's
  +1 / -1 with optional format and overlong penalties configured by `RewardConfig`.

Every public name of the three is importable from here (``from cir.rewards import grade``).

Registering your own reward::

    from cir.rewards import RewardResult, register_reward

    @register_reward("exact_word")
    def exact_word(response_text, reference, *, trajectory_info):
        correct = response_text.strip().split()[-1:] == [reference]
        return RewardResult(reward=1.0 if correct else 0.0, correct=correct, info={})

    # then train with reward.name=exact_word

A result with `RewardResult.fault` set (the sandbox could not run a tool call, the grader could
not decide) is not a verdict on the model: training leaves it out of the loss, evaluation out of
its scores, and both count it apart. Trajectories with a sandbox fault never reach a reward
function.

A reward function may also accept a ``config`` keyword (it then receives the run's
`RewardConfig`), and may register a batch form with `register_batch_reward` when it can
grade many responses faster together (the built-in ``"math"`` reward grades a batch in
parallel in the worker pool).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cir.lazy import lazy_attributes
from cir.rewards.answers import (
    answer_only_in_tool_output,
    extract_all_boxed,
    extract_boxed,
    grading_form,
    normalize_answer,
    normalize_reference,
    plain_number,
    without_code_blocks,
)

# The grader and the registry are imported on first use of one of their names: code that only
# reads answers (data loading imports `cir.rewards.answers`, which runs this file first) then
# does not load the grading pool's process machinery or register rewards.
_LAZY_NAMES: dict[str, str] = {
    "GradeOutcome": "grader",
    "GraderCounters": "grader",
    "GraderPool": "grader",
    "GraderUnavailable": "grader",
    "get_grader_pool": "grader",
    "grade": "grader",
    "grade_batch": "grader",
    "grade_outcomes": "grader",
    "grader_counters": "grader",
    "shutdown_grader_pool": "grader",
    "BatchRewardFn": "registry",
    "RewardConfig": "registry",
    "RewardFn": "registry",
    "RewardResult": "registry",
    "available_rewards": "registry",
    "compute_rewards": "registry",
    "faulted_result": "registry",
    "get_reward": "registry",
    "grading_text": "registry",
    "has_unclosed_code_block": "registry",
    "math_reward": "registry",
    "math_reward_batch": "registry",
    "model_text": "registry",
    "overlong_penalty": "registry",
    "register_batch_reward": "registry",
    "register_reward": "registry",
    "reward_info_from_trajectory": "registry",
    "score_trajectories": "registry",
}

__all__ = [
    "BatchRewardFn",
    "GradeOutcome",
    "GraderCounters",
    "GraderPool",
    "GraderUnavailable",
    "RewardConfig",
    "RewardFn",
    "RewardResult",
    "answer_only_in_tool_output",
    "available_rewards",
    "compute_rewards",
    "extract_all_boxed",
    "extract_boxed",
    "faulted_result",
    "get_grader_pool",
    "get_reward",
    "grade",
    "grade_batch",
    "grade_outcomes",
    "grader_counters",
    "grading_form",
    "grading_text",
    "has_unclosed_code_block",
    "math_reward",
    "math_reward_batch",
    "model_text",
    "normalize_answer",
    "normalize_reference",
    "overlong_penalty",
    "plain_number",
    "register_batch_reward",
    "register_reward",
    "reward_info_from_trajectory",
    "score_trajectories",
    "shutdown_grader_pool",
    "without_code_blocks",
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_NAMES)


if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from cir.rewards.grader import (
        GradeOutcome,
        GraderCounters,
        GraderPool,
        GraderUnavailable,
        get_grader_pool,
        grade,
        grade_batch,
        grade_outcomes,
        grader_counters,
        shutdown_grader_pool,
    )
    from cir.rewards.registry import (
        BatchRewardFn,
        RewardConfig,
        RewardFn,
        RewardResult,
        available_rewards,
        compute_rewards,
        faulted_result,
        get_reward,
        grading_text,
        has_unclosed_code_block,
        math_reward,
        math_reward_batch,
        model_text,
        overlong_penalty,
        register_batch_reward,
        register_reward,
        reward_info_from_trajectory,
        score_trajectories,
    )
