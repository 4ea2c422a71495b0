"""The code-integrated rollout loop: generate, stop at a python block's closing fence, run the
block in the sandbox, append its output as an output block, go on.

Token exactness. The model's tokens enter a `Trajectory` exactly as the engine sampled them
(with the sampler's log-probs and loss_mask 1); the feedback is tokenized alone and appended
with loss_mask 0 and log-prob 0. Nothing is ever decoded and re-tokenized: decoding is used
only to *find* the fence and to *extract* the code to run.

Fences that share a token with more text. Generation stops on the first token after which
the segment's text holds an opening ```` ```python ```` (or ```` ```py ````) line followed by a
line that starts with ```` ``` ```` (indented by at most three spaces). With a byte-level BPE
that token may also carry a newline or more text: in Qwen's vocabulary the fence's last
backtick comes as ``"`\\n"``, ``"`\\n\\n"``, ``"`.\\n"`` or ``"`s"``, a whole fence as
``" ```\\n"``. That token is kept exactly as sampled, extra text included: the extra text
stays in the response *before* the output block.
The feedback starts with ``"\\n"`` only when the response does not already end with a newline,
so the output block always starts on its own line.

Scheduling. `rollout_async` runs every trajectory as its own coroutine: while one waits on the
sandbox the engine keeps batching the others' decoding steps. `rollout_turn_sync` is the
baseline used by common research code (and by `cir bench rollout`): all trajectories generate
one turn, then all execute, then the next turn, so everyone waits for the slowest at each
turn. Each generate call carries a seed derived from (trajectory seed, turn), so with an
engine whose per-request sampling is seeded both schedules produce the same trajectories.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import re
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

from cir.engines.base import Completion, SamplingParams
from cir.trajectory import BUDGET_EXHAUSTED, ToolCall, Trajectory

OUTPUT_PLACEHOLDER = "{output}"


@dataclass
class RolloutConfig:
    """How one trajectory is generated.

    max_response_tokens: total tokens appended after the prompt (model tokens and feedback).
    tool_budget: at most this many executions per trajectory.
    on_budget_exhausted: what happens when the model closes a python block after the budget
        is spent: "stop" ends the trajectory at the fence (finish_reason "budget"); "notice"
        appends `budget_notice` in an output block (no execution) and keeps generating.
    budget_notice: the text shown in place of output under "notice".
    feedback_template: the text appended after an executed block; `{output}` is replaced
        by the output shown: `ExecResult.feedback()` (stdout, or the error's last line, or a
        timeout notice) without trailing newlines (plain substitution, other braces are kept
        literally). A "\n" is put before it when the response does not end with a newline.
    max_feedback_tokens: the feedback (leading newline, template and output) is cut to at
        most this many tokens by keeping the head of the output and ending it with
        `truncation_marker`. None: no limit. Either way the feedback is also cut to leave
        room for one more model token within max_response_tokens; a block closed with no
        room even for the template and marker is not run (finish_reason "length").
    temperature, top_p, top_k: sampling (temperature 0 is greedy; top_k 0 is off).
    session_mode: run the blocks of one trajectory in one sandbox session, so later blocks
        see the definitions of earlier successful ones. Off: each block runs alone.
    exec_timeout_s: wall-clock limit per block (None: the sandbox's own timeout_s).
    stop_on_eos: stop a trajectory at the tokenizer's EOS token (kept, loss_mask 1).
    stop_token_ids: further token ids that end a trajectory like EOS (e.g. a chat end token).
    """

    max_response_tokens: int = 1024
    tool_budget: int = 2
    on_budget_exhausted: str = "stop"
    budget_notice: str = "Tool budget exhausted; continue without code."
    feedback_template: str = "```output\n{output}\n```\n"
    max_feedback_tokens: int | None = 256
    truncation_marker: str = "...[truncated]"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    session_mode: bool = False
    exec_timeout_s: float | None = None
    stop_on_eos: bool = True
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_response_tokens < 1:
            raise ValueError(f"RolloutConfig.max_response_tokens must be >= 1, got {self.max_response_tokens}")
        if self.tool_budget < 0:
            raise ValueError(f"RolloutConfig.tool_budget must be >= 0, got {self.tool_budget}")
        if self.on_budget_exhausted not in ("stop", "notice"):
            raise ValueError(
                f"RolloutConfig.on_budget_exhausted must be 'stop' or 'notice', got {self.on_budget_exhausted!r}"
            )
        if OUTPUT_PLACEHOLDER not in self.feedback_template:
            raise ValueError(f"RolloutConfig.feedback_template must contain {OUTPUT_PLACEHOLDER!r}")
        if self.max_feedback_tokens is not None and self.max_feedback_tokens < 1:
            raise ValueError(f"RolloutConfig.max_feedback_tokens must be >= 1 or None, got {self.max_feedback_tokens}")
        if self.temperature < 0:
            raise ValueError(f"RolloutConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"RolloutConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"RolloutConfig.top_k must be >= 0, got {self.top_k}")
        if self.exec_timeout_s is not None and not self.exec_timeout_s > 0:
            raise ValueError(f"RolloutConfig.exec_timeout_s must be > 0 or None, got {self.exec_timeout_s}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)


# ---------------------------------------------------------------------------------------------
# Fences


# An opening fence: ```python or ```py, optional trailing blanks, end of line. It need not
# start a line (models sometimes open a block right after prose).
_OPEN_FENCE = re.compile(r"```(?:python|py)[ \t]*\r?\n")
# A closing fence: a line that starts with three backticks, indented by at most three spaces
# as in CommonMark (byte-level BPE vocabularies have tokens such as " ```\n").
_CLOSE_FENCE = re.compile(r"^ {0,3}```", re.MULTILINE)


@dataclass(frozen=True)
class CodeBlock:
    code: str  # text between the opening fence line and the closing fence line (no final newline)
    start: int  # character offset of the opening fence in the searched text
    end: int  # character offset just past the closing fence's three backticks


def find_code_block(text: str) -> CodeBlock | None:
    """The first python block of `text` whose closing fence has been written, else None.

    The closing fence is the first line after the opening fence line that starts with
    three backticks (after at most three spaces); whatever follows them on that line is not
    part of the block.
    """
    opening = _OPEN_FENCE.search(text)
    if opening is None:
        return None
    closing = _CLOSE_FENCE.search(text, opening.end())
    if closing is None:
        return None
    code = text[opening.end() : closing.start()]
    if code.endswith("\n"):
        code = code[:-2] if code.endswith("\r\n") else code[:-1]
    return CodeBlock(code=code, start=opening.start(), end=closing.end())


def fence_closed(text: str) -> bool:
    """Stop predicate for the engine: true once a python block's closing fence is written."""
    if text.count("```") < 2:  # cheap reject: called after every sampled token
        return False
    return find_code_block(text) is not None


# ---------------------------------------------------------------------------------------------
# Feedback


@dataclass(frozen=True)
class Feedback:
    text: str  # exactly what decode(ids) gives back
    ids: list[int]
    output: str  # the output as shown inside the block (after truncation)
    truncated: bool


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _decode(tokenizer, ids: Sequence[int]) -> str:
    # Verbatim text (no clean-up of spaces), so fence detection sees what the engine's stop
    # predicate saw.
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def build_feedback(
    tokenizer,
    output: str,
    *,
    template: str,
    prefix: str = "",
    max_tokens: int | None = None,
    marker: str = "...[truncated]",
) -> Feedback:
    """Tokenize `prefix + template` with `output` substituted, alone.

    If that is longer than `max_tokens`, the output is cut to a head that fits together with
    `marker`, found by bisection on the character count. Every candidate is tokenized, so the
    result always fits; since token counts of heads are only nearly monotone in their length,
    the head found may be a few characters short of the longest possible. Raises ValueError
    if even an empty output with the marker does not fit.
    """

    def render(shown: str) -> tuple[str, list[int]]:
        text = prefix + template.replace(OUTPUT_PLACEHOLDER, shown)
        return text, _encode(tokenizer, text)

    text, ids = render(output)
    if max_tokens is None or len(ids) <= max_tokens:
        return Feedback(text=text, ids=ids, output=output, truncated=False)
    text, ids = render(marker)
    if len(ids) > max_tokens:
        raise ValueError(
            f"feedback template with an empty output and the truncation marker takes {len(ids)} tokens, "
            f"more than max_feedback_tokens={max_tokens}"
        )
    # Invariant: a head of `lo` characters (plus the marker) fits.
    lo, hi = 0, min(len(output), 64 * max_tokens)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(render(output[:mid] + marker)[1]) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    shown = output[:lo] + marker
    text, ids = render(shown)
    return Feedback(text=text, ids=ids, output=shown, truncated=True)


# ---------------------------------------------------------------------------------------------
# One trajectory as a state machine, shared by both schedules


def derive_seed(seed: int | None, turn: int) -> int | None:
    """The seed of generate call number `turn` of a trajectory seeded `seed` (None: unseeded).

    A hash, so neighbouring trajectories' and turns' streams are unrelated, and a pure
    function of (seed, turn), so a trajectory is the same under any scheduling.
    """
    if seed is None:
        return None
    digest = hashlib.blake2b(f"cir.rollout:{int(seed)}:{int(turn)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _eos_ids(tokenizer, config: RolloutConfig) -> tuple[int, ...]:
    ids = list(config.stop_token_ids)
    if config.stop_on_eos:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("RolloutConfig.stop_on_eos is set but the tokenizer has no eos_token_id")
        ids.append(int(eos))
    return tuple(dict.fromkeys(ids))


class _TrajectoryRun:
    """The rollout of one trajectory, driven step by step by a scheduler.

    next_request() -> (ids, params); then take_completion(completion) returns the code to run
    (or None); if it returned code, take_result(exec_result) appends the feedback. `done` says
    when the trajectory is finished.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], config: RolloutConfig, *, seed, problem, stop_ids,
                 max_response_tokens: int):
        self.tokenizer = tokenizer
        self.config = config
        # config.max_response_tokens, or less where the model's context ends sooner: feedback
        # included, the response never goes past it.
        self.max_response_tokens = max_response_tokens
        self.seed = seed
        self.stop_ids = stop_ids
        self.trajectory = Trajectory(prompt_ids=[int(t) for t in prompt_ids], problem=dict(problem or {}))
        self.turn = 0
        self.executions = 0
        self.done = False
        self.session: str | None = f"traj-{uuid.uuid4().hex}" if config.session_mode else None
        self._pending: tuple[str, tuple[int, int], str, int] | None = None  # code, code span, prefix, token limit
        # The smallest feedback (empty output plus marker, with a leading newline): a block is
        # executed only if at least this much room and one more model token remain.
        limit_text = "\n" + config.feedback_template.replace(OUTPUT_PLACEHOLDER, config.truncation_marker)
        self._min_feedback_tokens = len(_encode(tokenizer, limit_text))
        if config.max_feedback_tokens is not None and self._min_feedback_tokens > config.max_feedback_tokens:
            raise ValueError(
                f"RolloutConfig.max_feedback_tokens={config.max_feedback_tokens} is below the "
                f"{self._min_feedback_tokens} tokens of the feedback template with only the truncation marker"
            )

    @property
    def remaining(self) -> int:
        return self.max_response_tokens - len(self.trajectory.response_ids)

    def next_request(self) -> tuple[list[int], SamplingParams]:
        cfg = self.config
        params = SamplingParams(
            max_new_tokens=self.remaining,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            seed=derive_seed(self.seed, self.turn),
            stop_token_ids=self.stop_ids,
            stop_when=fence_closed,
        )
        return self.trajectory.prompt_ids + self.trajectory.response_ids, params

    def take_completion(self, completion: Completion) -> str | None:
        traj, cfg = self.trajectory, self.config
        if len(completion.token_ids) > self.remaining:
            raise RuntimeError(
                f"engine returned {len(completion.token_ids)} tokens for max_new_tokens={self.remaining}"
            )
        span = traj.append(list(completion.token_ids), list(completion.logprobs), trainable=True)
        self.turn += 1
        segment = _decode(self.tokenizer, completion.token_ids)
        block = find_code_block(segment)
        if block is None:
            ended_on_stop = bool(completion.token_ids) and completion.token_ids[-1] in self.stop_ids
            self._finish("eos" if ended_on_stop else "length")
            return None
        budget_spent = self.executions >= cfg.tool_budget
        if budget_spent and cfg.on_budget_exhausted == "stop":
            self._finish("budget")
            return None
        prefix = "" if segment.endswith("\n") else "\n"
        room = self.remaining - 1  # leave room for at least one more model token
        limit = room if cfg.max_feedback_tokens is None else min(room, cfg.max_feedback_tokens)
        if limit < self._min_feedback_tokens:
            # No room for an output block and a continuation: running the code is pointless.
            self._finish("length")
            return None
        if budget_spent:
            self._append_feedback(block.code, span, prefix, limit, cfg.budget_notice, BUDGET_EXHAUSTED, 0.0)
            return None
        self.executions += 1
        self._pending = (block.code, span, prefix, limit)
        return block.code

    def take_result(self, result) -> None:
        if self._pending is None:
            raise RuntimeError("take_result called without a pending code block")
        code, span, prefix, limit = self._pending
        self._pending = None
        # The template supplies the newline that closes the output, so trailing newlines of
        # stdout are dropped (no blank line before the closing fence).
        output = result.feedback().rstrip("\n")
        self._append_feedback(code, span, prefix, limit, output, result.status, float(result.wall_ms))

    def _append_feedback(self, code, code_span, prefix, limit, output, status, wall_ms) -> None:
        cfg = self.config
        fb = build_feedback(
            self.tokenizer, output, template=cfg.feedback_template, prefix=prefix,
            max_tokens=limit, marker=cfg.truncation_marker,
        )
        fb_span = self.trajectory.append(fb.ids, None, trainable=False)
        self.trajectory.tool_calls.append(
            ToolCall(code=code, status=status, output=fb.output, code_span=code_span,
                     feedback_span=fb_span, wall_ms=wall_ms, truncated=fb.truncated)
        )
        if self.remaining <= 0:  # cannot happen given `limit`, kept as a guard
            self._finish("length")

    def _finish(self, reason: str) -> None:
        self.trajectory.finish_reason = reason
        self.done = True


async def _execute(sandbox, run: _TrajectoryRun, code: str):
    return await sandbox.arun(code, timeout_s=run.config.exec_timeout_s, session=run.session)


def _close_session(sandbox, run: _TrajectoryRun) -> None:
    if run.session is not None and hasattr(sandbox, "close_session"):
        sandbox.close_session(run.session)


Progress = Any  # a callable taking the finished Trajectory, or an object with .update(n) (tqdm)


def _report(progress: Progress | None, trajectory: Trajectory) -> None:
    if progress is None:
        return
    if hasattr(progress, "update"):
        progress.update(1)
    else:
        progress(trajectory)


def _make_runs(engine, prompts, config, seeds, problems) -> list[_TrajectoryRun]:
    n = len(prompts)
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    if problems is not None and len(problems) != n:
        raise ValueError(f"{len(problems)} problems for {n} prompts")
    tokenizer = engine.tokenizer
    stop_ids = _eos_ids(tokenizer, config)
    context = getattr(engine, "max_model_len", None)  # prompt + response, when the engine knows it
    runs = []
    for i, prompt in enumerate(prompts):
        problem = None if problems is None else problems[i]
        limit = config.max_response_tokens
        if context is not None:
            if len(prompt) >= context:
                name = (problem or {}).get("id")
                raise ValueError(
                    f"prompt {i}" + (f" (problem {name})" if name else "") + f": prompt of {len(prompt)} tokens "
                    f"leaves no room for a response in the model's context of {context} tokens (max_position_embeddings)"
                )
            limit = min(limit, context - len(prompt))
        runs.append(_TrajectoryRun(
            tokenizer, prompt, config,
            seed=None if seeds is None else seeds[i], problem=problem, stop_ids=stop_ids, max_response_tokens=limit,
        ))
    return runs


# ---------------------------------------------------------------------------------------------
# Schedules


async def _drive(engine, sandbox, run: _TrajectoryRun) -> Trajectory:
    try:
        while not run.done:
            ids, params = run.next_request()
            code = run.take_completion(await engine.generate(ids, params))
            if code is not None:
                run.take_result(await _execute(sandbox, run, code))
    finally:
        _close_session(sandbox, run)
    return run.trajectory


async def rollout_one(
    engine, sandbox, prompt_ids: Sequence[int], config: RolloutConfig, *, seed: int | None = None,
    problem: dict | None = None,
) -> Trajectory:
    """Generate one trajectory: generate -> (closed python block? run it, append the output,
    go on) until EOS, the length limit or the budget stop."""
    (run,) = _make_runs(engine, [prompt_ids], config, None if seed is None else [seed], None if problem is None else [problem])
    return await _drive(engine, sandbox, run)


async def rollout_async(
    engine, sandbox, prompts: Sequence[Sequence[int]], config: RolloutConfig, seeds: Sequence[int] | None = None,
    problems: Sequence[dict] | None = None, progress: Progress | None = None,
) -> list[Trajectory]:
    """All trajectories as independent coroutines; results in the order of `prompts`.

    A trajectory waiting on the sandbox never stalls the others: their generate requests
    stay in flight and the engine keeps batching them.
    """
    runs = _make_runs(engine, prompts, config, seeds, problems)

    async def one(run: _TrajectoryRun) -> Trajectory:
        trajectory = await _drive(engine, sandbox, run)
        _report(progress, trajectory)
        return trajectory

    return list(await asyncio.gather(*(one(run) for run in runs)))


async def rollout_turn_sync(
    engine, sandbox, prompts: Sequence[Sequence[int]], config: RolloutConfig, seeds: Sequence[int] | None = None,
    problems: Sequence[dict] | None = None, progress: Progress | None = None,
) -> list[Trajectory]:
    """The turn-synchronous baseline: every live trajectory generates one turn (batched),
    then all closed blocks execute (in parallel), then the next turn starts. Everyone waits
    for the slowest generation and the slowest execution of every turn."""
    runs = _make_runs(engine, prompts, config, seeds, problems)
    try:
        active = list(runs)
        while active:
            requests = [run.next_request() for run in active]
            completions = await asyncio.gather(*(engine.generate(ids, params) for ids, params in requests))
            to_execute = []
            for run, completion in zip(active, completions):
                code = run.take_completion(completion)
                if code is not None:
                    to_execute.append((run, code))
            results = await asyncio.gather(*(_execute(sandbox, run, code) for run, code in to_execute))
            for (run, _), result in zip(to_execute, results):
                run.take_result(result)
            for run in active:
                if run.done:
                    _report(progress, run.trajectory)
            active = [run for run in active if not run.done]
    finally:
        for run in runs:
            _close_session(sandbox, run)
    return [run.trajectory for run in runs]


_MODES: dict[str, Callable[..., Awaitable[list[Trajectory]]]] = {
    "async": rollout_async,
    "turn_sync": rollout_turn_sync,
}


def run_sync(coro: Awaitable) -> Any:
    """Run a coroutine to completion from synchronous code.

    Without a running event loop this is asyncio.run; inside one (a notebook, an async
    caller) the coroutine runs on a fresh loop in a helper thread, since the caller's loop
    cannot be re-entered.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def rollout(
    engine, sandbox, prompts: Sequence[Sequence[int]], config: RolloutConfig, mode: str = "async",
    seeds: Sequence[int] | None = None, problems: Sequence[dict] | None = None, progress: Progress | None = None,
) -> list[Trajectory]:
    """Synchronous entry point: mode "async" (per-trajectory) or "turn_sync" (the baseline)."""
    if mode not in _MODES:
        raise ValueError(f"unknown rollout mode {mode!r}; known: {', '.join(_MODES)}")
    return run_sync(_MODES[mode](engine, sandbox, prompts, config, seeds=seeds, problems=problems, progress=progress))


# ---------------------------------------------------------------------------------------------
# Metrics


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
        "feedback_token_share": feedback_tokens / (model_tokens + feedback_tokens) if model_tokens + feedback_tokens else 0.0,
    }
    for reason, count in sorted(reasons.items()):
        stats[f"finish_{reason or 'unknown'}"] = count / n
    return stats


__all__ = [
    "CodeBlock", "Feedback", "RolloutConfig", "build_feedback", "derive_seed", "fence_closed",
    "find_code_block", "rollout", "rollout_async", "rollout_one", "rollout_stats", "rollout_turn_sync", "run_sync",
]
