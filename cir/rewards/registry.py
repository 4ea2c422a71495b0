"""Rewards registered by name, and the built-in ``"math"`` reward.

`register_reward` / `register_batch_reward` add a reward, `compute_rewards` scores a batch of
responses with the one a run names, and `score_trajectories` does the same from finished
trajectories (the step the trainer and evaluation share). The built-in ``"math"`` reward is
the paper's +1 / -1 with optional format and overlong penalties configured by `RewardConfig`.

The response is graded on the model's own words by default: `score_trajectories` extracts the
answer from the model's sampled segments only (the interpreter's output spans, known exactly from
the trajectory's `loss_mask`, are left out), so a ``\\boxed{}`` that only the code printed is not
the model's answer. `RewardConfig.grade_tool_output` grades the whole response instead.

``trajectory_info`` keys the built-in reward reads (build them with
`reward_info_from_trajectory`): ``response_length`` (model-sampled tokens of the response),
``max_response_length`` (the current response-length limit, needed for the overlong
penalty), ``finish_reason``, ``budget_exhausted`` (the model tried to run code after its
tool budget was spent) and optionally ``unclosed_code`` (overrides the text check).

Faults are the machine's, never the model's: a result with `RewardResult.fault` set was not
graded (or not decided) and is left out of the loss and of evaluation's scores, counted apart.
``trajectory_info["sandbox_fault"]`` (a tool call the sandbox could not run, see
`cir.trajectory.SANDBOX_FAULT`) gives ``fault="sandbox"`` without calling the reward at all, for
every reward; the built-in reward gives ``fault="grader_timeout"`` / ``"grader_crash"`` when the
grader could not decide after its retries (`cir.rewards.grader`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cir.rewards.answers import _scan_boxes, normalize_answer, without_code_blocks
from cir.rewards.grader import GradeOutcome, grade_outcomes

if TYPE_CHECKING:
    from cir.trajectory import Trajectory


# RewardResult.fault values: the sandbox's, and the grader's (GradeOutcome.fault).
FAULT_SANDBOX = "sandbox"
GRADER_FAULTS = ("grader_timeout", "grader_crash")


@dataclass
class RewardResult:
    """The reward of one response.

    fault: None when the response was graded. Otherwise whose failure left it ungraded:
        "sandbox" (a tool call the sandbox could not run), "grader_timeout" / "grader_crash"
        (the grader could not decide after its retries). A faulted result's `reward` (0.0) and
        `correct` (False) mean nothing: the trainer leaves it out of the loss and evaluation
        out of its scores, and both count it apart.
    """

    reward: float
    correct: bool
    info: dict = field(default_factory=dict)
    fault: str | None = None


def faulted_result(fault: str, info: dict | None = None) -> RewardResult:
    """The result of a response that was not graded because of `fault` (see `RewardResult`)."""
    return RewardResult(reward=0.0, correct=False, info={"reason": fault, **(info or {})}, fault=fault)


RewardFn = Callable[..., RewardResult]  # (response_text, reference, *, trajectory_info) -> RewardResult
BatchRewardFn = Callable[..., list[RewardResult]]  # (responses, references, infos, config) -> list


@dataclass
class RewardConfig:
    """The reward: which function, and the built-in ``"math"`` reward's knobs.

    Penalties are non-negative amounts subtracted from the reward (0 turns them off).

    name: registered reward function (``"math"``, or one registered with `register_reward`).
    correct_reward / wrong_reward: reward for a correct / wrong (or missing) final answer.
    no_box_penalty: the response has no boxed answer.
    multi_box_penalty: the response boxes more than one distinct answer (the last one counts;
        boxes the grader finds equivalent, such as ``\\frac12`` and ``0.5``, are one answer).
    unclosed_code_penalty: the response ends inside an unclosed python block.
    tool_budget_penalty: the model tried to run code after its tool budget was spent.
    overlong_buffer / overlong_penalty: soft overlong penalty. With the length limit L
        (``trajectory_info["max_response_length"]``) and buffer B, a response of n model
        tokens loses nothing for n <= L - B, then linearly more, up to `overlong_penalty`
        at n >= L. Off when either is 0.
    grader_timeout_s: per-answer grading deadline; a grader that misses it on every try (see
        `cir.rewards.grader.GraderPool`) leaves the answer ungraded (``fault="grader_timeout"``).
    grade_tool_output: grade the whole response, interpreter output included. Off (the default,
        the paper's setting): only the model's own text is read, so an answer the code printed
        and the model never restated earns nothing.
    """

    name: str = "math"
    correct_reward: float = 1.0
    wrong_reward: float = -1.0
    no_box_penalty: float = 0.0
    multi_box_penalty: float = 0.0
    unclosed_code_penalty: float = 0.0
    tool_budget_penalty: float = 0.0
    overlong_buffer: int = 0
    overlong_penalty: float = 0.0
    grader_timeout_s: float = 5.0
    grade_tool_output: bool = False

    def __post_init__(self) -> None:
        for name in (
            "no_box_penalty",
            "multi_box_penalty",
            "unclosed_code_penalty",
            "tool_budget_penalty",
            "overlong_penalty",
        ):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"RewardConfig.{name} is an amount subtracted from the reward and must be >= 0, "
                    f"got {getattr(self, name)}"
                )
        if self.overlong_buffer < 0:
            raise ValueError(f"RewardConfig.overlong_buffer must be >= 0, got {self.overlong_buffer}")
        if self.grader_timeout_s <= 0:
            raise ValueError(f"RewardConfig.grader_timeout_s must be > 0, got {self.grader_timeout_s}")


@dataclass
class _RewardEntry:
    fn: RewardFn
    takes_config: bool
    batch_fn: BatchRewardFn | None = None


_REWARDS: dict[str, _RewardEntry] = {}


def register_reward(name: str, *, overwrite: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn(response_text, reference, *, trajectory_info[, config])``
    under `name` (see the `cir.rewards` docstring for an example)."""

    def decorate(fn: RewardFn) -> RewardFn:
        if name in _REWARDS and not overwrite:
            raise ValueError(f"a reward named {name!r} is already registered (pass overwrite=True to replace it)")
        params = inspect.signature(fn).parameters
        if "trajectory_info" not in params:
            raise TypeError(f"reward {name!r}: the function must take a keyword argument 'trajectory_info'")
        _REWARDS[name] = _RewardEntry(fn=fn, takes_config="config" in params)
        return fn

    return decorate


def register_batch_reward(name: str) -> Callable[[BatchRewardFn], BatchRewardFn]:
    """Decorator adding a batch form ``fn(responses, references, infos, config) -> list`` to
    the reward already registered as `name`; `compute_rewards` then uses it."""

    def decorate(fn: BatchRewardFn) -> BatchRewardFn:
        if name not in _REWARDS:
            raise KeyError(f"register the per-response reward {name!r} before its batch form")
        _REWARDS[name].batch_fn = fn
        return fn

    return decorate


def get_reward(name: str) -> RewardFn:
    """The per-response reward function registered as `name`."""
    if name not in _REWARDS:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(_REWARDS)}")
    return _REWARDS[name].fn


def available_rewards() -> list[str]:
    return sorted(_REWARDS)


def compute_rewards(
    name: str | None,
    responses: Sequence[str],
    references: Sequence[str],
    infos: Sequence[dict] | None = None,
    config: RewardConfig | None = None,
) -> list[RewardResult]:
    """Rewards for a batch of responses (what the trainer calls once per step).

    name: the registered reward (None: ``config.name``). infos: one `trajectory_info` dict
    per response (None: empty dicts). Uses the reward's batch form when it has one. A response
    whose info has ``sandbox_fault`` set is not graded: its result is ``fault="sandbox"``.
    """
    config = config or RewardConfig()
    name = name or config.name
    if name not in _REWARDS:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(_REWARDS)}")
    infos = list(infos) if infos is not None else [{} for _ in responses]
    if not len(responses) == len(references) == len(infos):
        raise ValueError(
            f"{len(responses)} responses, {len(references)} references and {len(infos)} infos: lengths differ"
        )
    entry = _REWARDS[name]
    graded = [i for i, info in enumerate(infos) if not (info or {}).get("sandbox_fault")]
    results: list[RewardResult] = [faulted_result(FAULT_SANDBOX) for _ in responses]
    responses, references, infos = ([seq[i] for i in graded] for seq in (responses, references, infos))
    if entry.batch_fn is not None:
        scored = entry.batch_fn(responses, references, infos, config) if graded else []
        if len(scored) != len(responses):
            raise RuntimeError(f"reward {name!r} returned {len(scored)} results for {len(responses)} responses")
    else:
        extra = {"config": config} if entry.takes_config else {}
        scored = [entry.fn(r, ref, trajectory_info=info, **extra) for r, ref, info in zip(responses, references, infos)]
    for i, result in zip(graded, scored):
        results[i] = result
    return results


def overlong_penalty(length: int, max_length: int, buffer: int, penalty: float) -> float:
    """The soft overlong penalty (<= 0): 0 up to ``max_length - buffer`` tokens, then linear
    down to ``-penalty`` at ``max_length`` (and beyond)."""
    if buffer <= 0 or penalty <= 0:
        return 0.0
    if buffer > max_length:
        raise ValueError(f"overlong buffer ({buffer}) is larger than the length limit ({max_length})")
    free = max_length - buffer
    if length <= free:
        return 0.0
    return -penalty * min(1.0, (length - free) / buffer)


_PYTHON_OPEN = re.compile(r"```(?:python|py)\b")


def has_unclosed_code_block(text: str) -> bool:
    """True when the last python block of `text` has no closing fence."""
    opens = list(_PYTHON_OPEN.finditer(text))
    return bool(opens) and "```" not in text[opens[-1].end() :]


def reward_info_from_trajectory(trajectory, max_response_length: int | None = None) -> dict:
    """The `trajectory_info` dict the built-in reward reads, from a `cir.trajectory.Trajectory`."""
    calls = getattr(trajectory, "tool_calls", [])
    return {
        "response_length": int(trajectory.num_model_tokens),
        "max_response_length": max_response_length,
        "finish_reason": trajectory.finish_reason,
        "budget_exhausted": trajectory.finish_reason == "budget"
        or any(getattr(c, "status", "") == "budget_exhausted" for c in calls),
        "num_tool_calls": int(getattr(trajectory, "num_tool_calls", len(calls))),  # executions, not budget notices
        "sandbox_fault": bool(getattr(trajectory, "sandbox_fault", False)),  # not graded: see RewardResult
    }


def model_text(trajectory, tokenizer) -> str:
    """The model's own words: its sampled segments (loss_mask 1), each decoded alone, joined.

    The interpreter's output is left out exactly where it was appended (the mask is built at
    append time), never found again by a regex over decoded text. Segments end on whole tokens
    (a feedback span starts after the token that closed the fence), so decoding them one by
    one gives the same characters as decoding the model's tokens in place.
    """
    ids, mask = trajectory.response_ids, trajectory.loss_mask
    parts, start = [], None
    for i, m in enumerate(mask):
        if m and start is None:
            start = i
        elif not m and start is not None:
            parts.append(tokenizer.decode(ids[start:i]))
            start = None
    if start is not None:
        parts.append(tokenizer.decode(ids[start:]))
    return "".join(parts)


def grading_text(trajectory, tokenizer, grade_tool_output: bool = False) -> str:
    """The text the reward reads: the model's own words, or (`grade_tool_output`) the whole
    response with the interpreter's output."""
    # Decoding is fine here: the text is only graded, never turned back into training tokens.
    return trajectory.text(tokenizer) if grade_tool_output else model_text(trajectory, tokenizer)


def score_trajectories(
    trajectories: Sequence[Trajectory],
    answers: Sequence[str],
    tokenizer,
    config: RewardConfig,
    max_response_tokens: int | None,
) -> list[RewardResult]:
    """Rewards of finished trajectories, one per trajectory, with the reward `config` names.

    answers: the reference answer of each trajectory's problem. max_response_tokens: the
    response-length limit the trajectories were sampled under (the overlong penalty measures
    against it). The reward reads `grading_text` (the model's own words unless
    `config.grade_tool_output`). A trajectory with a sandbox fault (`Trajectory.sandbox_fault`)
    is not graded: its result has ``fault="sandbox"``. The trajectories are only read: the
    caller decides where the results go.
    """
    texts = [grading_text(t, tokenizer, config.grade_tool_output) for t in trajectories]
    infos = [reward_info_from_trajectory(t, max_response_tokens) for t in trajectories]
    return compute_rewards(None, texts, answers, infos, config)


# A response boxing more distinct forms than this is not graded pair by pair (28 pairs at 8):
# each form counts as its own answer.
MAX_BOX_FORMS = 8


def _math_shaping(
    response_text: str, trajectory_info: dict, config: RewardConfig
) -> tuple[str | None, dict[str, float], list[str]]:
    """The final answer, the penalties that apply (name -> amount; all but "multi_box", which
    needs the grader) and the response's boxes, one per normal form, in order.

    Boxes inside fenced blocks (code the model wrote) are not the model's answer and are not
    read; the interpreter's output blocks are, when `config.grade_tool_output` asks for them."""
    boxes = _scan_boxes(without_code_blocks(response_text, keep_output=config.grade_tool_output))
    answer = boxes[-1] if boxes else None
    forms: dict[str, str] = {}  # normal form -> the first box written in it
    for box in boxes:
        if box is not None:
            forms.setdefault(normalize_answer(box), box)
    penalties: dict[str, float] = {}
    if answer is None and config.no_box_penalty:
        penalties["no_box"] = config.no_box_penalty
    unclosed = trajectory_info.get("unclosed_code")
    if unclosed is None:
        unclosed = has_unclosed_code_block(response_text)
    if unclosed and config.unclosed_code_penalty:
        penalties["unclosed_code"] = config.unclosed_code_penalty
    exhausted = trajectory_info.get("budget_exhausted") or trajectory_info.get("finish_reason") == "budget"
    if exhausted and config.tool_budget_penalty:
        penalties["tool_budget"] = config.tool_budget_penalty
    if config.overlong_penalty and config.overlong_buffer:
        length, limit = trajectory_info.get("response_length"), trajectory_info.get("max_response_length")
        if length is None or limit is None:
            raise KeyError(
                "the overlong penalty needs trajectory_info['response_length'] and ['max_response_length'] "
                "(see reward_info_from_trajectory)"
            )
        amount = -overlong_penalty(int(length), int(limit), config.overlong_buffer, config.overlong_penalty)
        if amount:
            penalties["overlong"] = amount
    return answer, penalties, list(forms.values())


def _form_pairs(forms: list[str]) -> list[tuple[int, int]]:
    """The pairs of a response's box forms the grader compares (none past `MAX_BOX_FORMS`)."""
    if not 2 <= len(forms) <= MAX_BOX_FORMS:
        return []
    return [(i, j) for j in range(len(forms)) for i in range(j)]


def _distinct_answers(num_forms: int, pairs: list[tuple[int, int]], outcomes: list[GradeOutcome]) -> int:
    """How many different answers `num_forms` box forms hold, the pairs graded equivalent merged."""
    root = list(range(num_forms))

    def find(i: int) -> int:
        while root[i] != i:
            i = root[i]
        return i

    for (i, j), outcome in zip(pairs, outcomes):
        if outcome.correct and outcome.fault is None:
            root[find(j)] = find(i)
    return len({find(i) for i in range(num_forms)})


def _math_result(
    answer: str | None,
    outcome: GradeOutcome,
    penalties: dict[str, float],
    num_boxes: int,
    box_fault: str | None,
    config: RewardConfig,
) -> RewardResult:
    if num_boxes > 1 and config.multi_box_penalty:
        penalties = {**penalties, "multi_box": config.multi_box_penalty}
    info = {
        "answer": answer,
        "reason": outcome.reason,
        "num_distinct_boxes": num_boxes,
        "penalties": penalties,
    }
    if outcome.detail:
        info["detail"] = outcome.detail
    # The grader could not decide the answer, or (when the penalty depends on it) whether two
    # boxes are one answer: the machine's fault, not a verdict on the model.
    fault = outcome.fault or (box_fault if config.multi_box_penalty else None)
    if fault is not None:
        return faulted_result(fault, info)
    base = config.correct_reward if outcome.correct else config.wrong_reward
    return RewardResult(reward=base - sum(penalties.values()), correct=outcome.correct, info=info)


@register_reward("math")
def math_reward(
    response_text: str, reference: str, *, trajectory_info: dict, config: RewardConfig | None = None
) -> RewardResult:
    """+`correct_reward` when the last boxed answer equals the reference, else `wrong_reward`,
    minus the configured format and overlong penalties."""
    return math_reward_batch([response_text], [reference], [trajectory_info], config or RewardConfig())[0]


@register_batch_reward("math")
def math_reward_batch(
    responses: list[str], references: list[str], infos: list[dict], config: RewardConfig
) -> list[RewardResult]:
    shaped = [_math_shaping(r, info or {}, config) for r, info in zip(responses, infos)]
    # One batch for the grader: every answer against its reference, then the pairs of each
    # response's box forms (whether \frac12 and 0.5 are one answer or two).
    form_pairs = [_form_pairs(forms) for _, _, forms in shaped]
    requests = [(answer, ref) for (answer, _, _), ref in zip(shaped, references)]
    for (_, _, forms), pairs in zip(shaped, form_pairs):
        requests += [(forms[j], forms[i]) for i, j in pairs]
    outcomes = grade_outcomes(requests, config.grader_timeout_s)
    box_outcomes = iter(outcomes[len(responses) :])
    results = []
    for (answer, penalties, forms), outcome, pairs in zip(shaped, outcomes, form_pairs):
        verdicts = [next(box_outcomes) for _ in pairs]
        num_boxes = _distinct_answers(len(forms), pairs, verdicts)
        box_fault = next((v.fault for v in verdicts if v.fault is not None), None)
        results.append(_math_result(answer, outcome, penalties, num_boxes, box_fault, config))
    return results
