"""The rollout loop: one trajectory as a state machine, driven by one of two schedules (see
`cir.rollout` for the rules it follows)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from cir.engines.base import ABORTED, Completion, SamplingParams, evaluates_stop_rule, stop_rule_strings
from cir.rollout.config import OUTPUT_PLACEHOLDER, RolloutConfig
from cir.rollout.feedback import _decode, _encode, build_feedback
from cir.rollout.fences import PYTHON_BLOCK_CLOSED, fence_closed, find_code_block
from cir.rollout.seeds import derive_seed
from cir.sandbox import ExecResult, SandboxError
from cir.trajectory import BUDGET_EXHAUSTED, SANDBOX_FAULT, ToolCall, Trajectory

# ---------------------------------------------------------------------------------------------
# One trajectory as a state machine, shared by both schedules


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

    A segment is what the model wrote since the last feedback (or the prompt). With an engine
    that evaluates the closing-fence rule itself (`exact_stop_rule`), every generate call ends
    a segment. Otherwise the request carries the rule's stand-in stop string ("```"), which also
    fires on an opening fence or backticks inside a line: a completion that ended on a stop
    string (or rule) while the segment holds no closed python block is a false stop, and the
    next generate call continues the same segment. Each generate call counts as a turn for the
    seed (`derive_seed(seed, turn)`), continuations included. A completion that runs past the
    token where the block closes (a stand-in string split across two calls) is cut at that
    token, so the segment ends exactly where the exact rule would have stopped: greedy
    trajectories are the same either way.

    A paused engine (`Engine.pause`) returns what a request had sampled so far, finish_reason
    "aborted": the tokens are kept and the next call continues the segment, like a false stop,
    with the next turn's seed. The continuation's stop condition must see the whole segment (a
    block may have opened before the cut), and an engine's stop rule sees only its own request's
    text: so the rest of a cut segment is requested with the stand-in stop strings and the fence
    decided over the whole segment, as with an engine that does not evaluate the rule.
    `version()` (default 0) is read as each request is made: the policy version its tokens are
    sampled under (`Trajectory.versions`).
    """

    def __init__(
        self,
        tokenizer,
        prompt_ids: Sequence[int],
        config: RolloutConfig,
        *,
        seed,
        problem_id,
        group,
        stop_ids,
        max_response_tokens: int,
        exact_stop_rule: bool = True,
        position: int = -1,
        version: Callable[[], int] | None = None,
    ):
        self.tokenizer = tokenizer
        self.exact_stop_rule = exact_stop_rule
        self.config = config
        # config.max_response_tokens, or less where the model's context ends sooner: feedback
        # included, the response never goes past it.
        self.max_response_tokens = max_response_tokens
        self.seed = seed
        self.stop_ids = stop_ids
        self.trajectory = Trajectory(
            prompt_ids=[int(t) for t in prompt_ids], problem_id=problem_id, group=group, position=position
        )
        self._version = version
        self._request_version = 0  # the policy version of the request in flight
        self._segment_cut = False  # the current segment was cut by a pause
        self.turn = 0  # generate calls so far (continuations after a false stop included)
        self.segment_start = 0  # where the current segment starts in response_ids
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
        )
        self._request_version = self._version() if self._version is not None else 0
        if self._exact:
            params = replace(params, stop_rule=PYTHON_BLOCK_CLOSED)
        else:
            params = replace(params, stop_strings=stop_rule_strings(PYTHON_BLOCK_CLOSED))
        return self.trajectory.prompt_ids + self.trajectory.response_ids, params

    @property
    def _exact(self) -> bool:
        """Whether the engine's stop rule decides the fence for this segment's next request."""
        return self.exact_stop_rule and not self._segment_cut

    def take_completion(self, completion: Completion) -> str | None:
        traj, cfg = self.trajectory, self.config
        if len(completion.token_ids) > self.remaining:
            raise RuntimeError(
                f"engine returned {len(completion.token_ids)} tokens for max_new_tokens={self.remaining}"
            )
        token_ids, logprobs = list(completion.token_ids), list(completion.logprobs)
        written = traj.response_ids[self.segment_start :]  # the segment's earlier parts
        segment = _decode(self.tokenizer, written + token_ids)
        block = find_code_block(segment)
        if block is not None and not self._exact:
            keep = self._tokens_until_closed(written, token_ids)
            if keep < len(token_ids):
                token_ids, logprobs = token_ids[:keep], logprobs[:keep]
                segment = _decode(self.tokenizer, written + token_ids)
                block = find_code_block(segment)
        traj.append(token_ids, logprobs, trainable=True, version=self._request_version)
        span = (self.segment_start, len(traj.response_ids))
        self.turn += 1
        if block is None:
            if token_ids and token_ids[-1] in self.stop_ids:
                self._finish("eos")
            elif completion.finish_reason in ("stop_string", "stop_rule") and self.remaining > 0:
                pass  # a false stop (e.g. on the opening fence): the next call continues the segment
            elif completion.finish_reason == ABORTED and self.remaining > 0:
                self._segment_cut = True  # paused: the next call continues the segment
            else:
                self._finish("length")
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

    def _tokens_until_closed(self, written: list[int], new: list[int]) -> int:
        """How many of `new` tokens to keep: up to the first one after which `written + new[:k]`
        holds a closed python block (the token the exact rule stops on). The rule is monotone in
        k, so a bisection over decoded prefixes finds it; usually the last token is the one."""
        decode = lambda k: _decode(self.tokenizer, written + new[:k])  # noqa: E731
        if len(new) <= 1 or not fence_closed(decode(len(new) - 1)):
            return len(new)
        lo, hi = 1, len(new) - 1  # the rule holds at hi; find the smallest such k
        while lo < hi:
            mid = (lo + hi) // 2
            if fence_closed(decode(mid)):
                hi = mid
            else:
                lo = mid + 1
        return hi

    def take_result(self, result) -> None:
        if self._pending is None:
            raise RuntimeError("take_result called without a pending code block")
        code, span, prefix, limit = self._pending
        self._pending = None
        if result.status == SANDBOX_FAULT:
            # The machine failed (retried by the sandbox, still failing): nothing the model
            # could learn from. The call is recorded as such, nothing is shown to the model,
            # and the trajectory ends here (left out of training and of the scores).
            end = len(self.trajectory.response_ids)
            self.trajectory.tool_calls.append(
                ToolCall(code=code, status=SANDBOX_FAULT, output="", code_span=span, feedback_span=(end, end))
            )
            self._finish("sandbox_fault")
            return
        # The template supplies the newline that closes the output, so trailing newlines of
        # stdout are dropped (no blank line before the closing fence).
        output = result.feedback().rstrip("\n")
        self._append_feedback(code, span, prefix, limit, output, result.status, float(result.wall_ms))

    def _append_feedback(self, code, code_span, prefix, limit, output, status, wall_ms) -> None:
        cfg = self.config
        fb = build_feedback(
            self.tokenizer,
            output,
            template=cfg.feedback_template,
            prefix=prefix,
            max_tokens=limit,
            marker=cfg.truncation_marker,
        )
        fb_span = self.trajectory.append(fb.ids, None, trainable=False, version=self._request_version)
        self.segment_start = fb_span[1]
        self._segment_cut = False
        self.trajectory.tool_calls.append(
            ToolCall(
                code=code,
                status=status,
                output=fb.output,
                code_span=code_span,
                feedback_span=fb_span,
                wall_ms=wall_ms,
                truncated=fb.truncated,
            )
        )
        if self.remaining <= 0:  # cannot happen given `limit`, kept as a guard
            self._finish("length")

    def _finish(self, reason: str) -> None:
        self.trajectory.finish_reason = reason
        self.done = True


async def _execute(sandbox, run: _TrajectoryRun, code: str):
    try:
        return await sandbox.arun(code, timeout_s=run.config.exec_timeout_s, session=run.session)
    except SandboxError as exc:
        # The sandbox could not take this call at all (its interpreter cannot start for now, it
        # was closed): this trajectory ends in a sandbox fault; the others of the batch go on.
        return ExecResult(SANDBOX_FAULT, "", str(exc), 0, 0.0, 0.0, reason="unavailable", attempts=0)


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


def _make_runs(
    engine, prompts, config, seeds, problem_ids, groups, positions=None, version=None
) -> list[_TrajectoryRun]:
    n = len(prompts)
    for name, values in (("seeds", seeds), ("problem_ids", problem_ids), ("groups", groups), ("positions", positions)):
        if values is not None and len(values) != n:
            raise ValueError(f"{len(values)} {name} for {n} prompts")
    tokenizer = engine.tokenizer
    stop_ids = _eos_ids(tokenizer, config)
    exact_stop_rule = evaluates_stop_rule(engine, PYTHON_BLOCK_CLOSED)
    context = engine.max_model_len  # prompt + response
    runs = []
    for i, prompt in enumerate(prompts):
        name = "" if problem_ids is None else problem_ids[i]
        limit = config.max_response_tokens
        if context is not None:
            if len(prompt) >= context:
                raise ValueError(
                    f"prompt {i}" + (f" (problem {name})" if name else "") + f": prompt of {len(prompt)} tokens "
                    f"leaves no room for a response in the model's context of {context} tokens (max_model_len)"
                )
            limit = min(limit, context - len(prompt))
        runs.append(
            _TrajectoryRun(
                tokenizer,
                prompt,
                config,
                seed=None if seeds is None else seeds[i],
                problem_id=name,
                group=i if groups is None else int(groups[i]),
                stop_ids=stop_ids,
                max_response_tokens=limit,
                exact_stop_rule=exact_stop_rule,
                position=-1 if positions is None else int(positions[i]),
                version=version,
            )
        )
    return runs


# ---------------------------------------------------------------------------------------------
# Schedules


async def drive(engine, sandbox, run: _TrajectoryRun, gate: Callable[[], Awaitable] | None = None) -> Trajectory:
    """Run one trajectory (one of `trajectory_runs`) to its end. `gate`: awaited before each
    generate call (an asynchronous collector holds new requests there while it updates the weights)."""
    try:
        while not run.done:
            if gate is not None:
                await gate()
            ids, params = run.next_request()
            code = run.take_completion(await engine.generate(ids, params))
            if code is not None:
                run.take_result(await _execute(sandbox, run, code))
    finally:
        _close_session(sandbox, run)
    return run.trajectory


def trajectory_runs(
    engine,
    prompts: Sequence[Sequence[int]],
    config: RolloutConfig,
    *,
    seeds: Sequence[int] | None = None,
    problem_ids: Sequence[str] | None = None,
    groups: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    version: Callable[[], int] | None = None,
) -> list[_TrajectoryRun]:
    """One not-yet-started run per prompt, for a caller that schedules them itself (the
    asynchronous collector) with `drive`; `version()` is read as each generate call is made."""
    return _make_runs(engine, prompts, config, seeds, problem_ids, groups, positions, version)


async def rollout_one(
    engine,
    sandbox,
    prompt_ids: Sequence[int],
    config: RolloutConfig,
    *,
    seed: int | None = None,
    problem_id: str = "",
) -> Trajectory:
    """Generate one trajectory: generate -> (closed python block? run it, append the output,
    go on) until EOS, the length limit or the budget stop."""
    (run,) = _make_runs(engine, [prompt_ids], config, None if seed is None else [seed], [problem_id], None)
    return await drive(engine, sandbox, run)


async def rollout_async(
    engine,
    sandbox,
    prompts: Sequence[Sequence[int]],
    config: RolloutConfig,
    seeds: Sequence[int] | None = None,
    problem_ids: Sequence[str] | None = None,
    groups: Sequence[int] | None = None,
    progress: Progress | None = None,
    positions: Sequence[int] | None = None,
) -> list[Trajectory]:
    """All trajectories as independent coroutines; results in the order of `prompts`.

    A trajectory waiting on the sandbox never stalls the others: their generate requests
    stay in flight and the engine keeps batching them.
    """
    runs = _make_runs(engine, prompts, config, seeds, problem_ids, groups, positions)

    async def one(run: _TrajectoryRun) -> Trajectory:
        trajectory = await drive(engine, sandbox, run)
        _report(progress, trajectory)
        return trajectory

    return list(await asyncio.gather(*(one(run) for run in runs)))


async def rollout_turn_sync(
    engine,
    sandbox,
    prompts: Sequence[Sequence[int]],
    config: RolloutConfig,
    seeds: Sequence[int] | None = None,
    problem_ids: Sequence[str] | None = None,
    groups: Sequence[int] | None = None,
    progress: Progress | None = None,
    positions: Sequence[int] | None = None,
) -> list[Trajectory]:
    """The turn-synchronous baseline: every live trajectory generates one turn (batched),
    then all closed blocks execute (in parallel), then the next turn starts. Everyone waits
    for the slowest generation and the slowest execution of every turn."""
    runs = _make_runs(engine, prompts, config, seeds, problem_ids, groups, positions)
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
        inside_a_loop = True
    except RuntimeError:  # "no running event loop": the usual case
        inside_a_loop = False
    if not inside_a_loop:
        # Run outside the `except` block: an exception from the rollout must show its own
        # traceback, not one chained to the RuntimeError that only said there was no loop.
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def rollout(
    engine,
    sandbox,
    prompts: Sequence[Sequence[int]],
    config: RolloutConfig,
    mode: str = "async",
    seeds: Sequence[int] | None = None,
    problem_ids: Sequence[str] | None = None,
    groups: Sequence[int] | None = None,
    progress: Progress | None = None,
    positions: Sequence[int] | None = None,
) -> list[Trajectory]:
    """Synchronous entry point: mode "async" (per-trajectory) or "turn_sync" (the baseline).

    `problem_ids[i]`, `groups[i]` (default: i) and `positions[i]` (default: -1) are written into
    trajectory i when it is created: which problem it answers, which group of samples its
    advantage is taken in, and where it sits in the step's global list.
    """
    if mode not in _MODES:
        raise ValueError(f"unknown rollout mode {mode!r}; known: {', '.join(_MODES)}")
    coro = _MODES[mode](
        engine,
        sandbox,
        prompts,
        config,
        seeds=seeds,
        problem_ids=problem_ids,
        groups=groups,
        progress=progress,
        positions=positions,
    )
    return run_sync(coro)
