"""The asynchronous collector (`run.collector=async`): the next steps' rollouts go on while a
step trains, and the long tail of one step is the head start of the next.

One event loop, on a background thread, drives every trajectory in flight as a task, across
steps. Groups (the `group_size` samples of one prompt) are admitted from the problem stream in
order, each with a global admission index g; as in the synchronous trainer, block g // B of the
stream (B = `algo.prompts_per_step`) is the problems of step g // B, and each rank owns the
groups whose g % B falls in its contiguous shard. A trajectory's seed is
`sample_seed(run seed, g // B, 0, g % B, j)`: the seed the synchronous trainer gives sample j of
problem g % B at step g // B. So with S = 0 the asynchronous collector samples exactly what the
synchronous one does, and two ranks sample what one does.

The staleness bound S (`run.max_staleness`; a token sampled under policy version v and trained
at step t has staleness t - v, the versions being the updates published before):

- admission is paced, not pruned: a rank admits the next group of its shard while it has fewer
  than (S + 1) * B_r admitted, untrained groups (B_r: its share of B), AReaL's capacity rule;
- step t trains every group admitted at version <= t - S (it is waited for), then the earliest
  admitted of the completed others, up to B_r. Then no trained token is older than S versions.
  The rule can ask for more than B_r groups only when S >= 2 and completion order was skewed;
  those wait one step more and are counted (``async/over_bound_groups``), never dropped;
  completed work is never thrown away.

The update: when the step's groups are complete the gate on new generate calls closes, the
engine is paused (`Engine.pause`: every request in flight returns what it has sampled so far,
finish_reason "aborted"), sleeps, the actor updates, the new weights are loaded, the version
goes up, the engine resumes and the gate opens. Trajectories that were cut continue their
segment with a new request under the new weights (`cir.rollout.loop`); each token keeps the
version it was sampled under (`Trajectory.versions`) and its sampler log-prob, which the loss
takes as the behaviour policy. Snippets already running in the sandbox go on during the update
(their output is waiting at resume): ``async/sandbox_overlap_s`` is the time of the update
during which the sandbox held a snippet (running or queued; summed over ranks).

Every wait has a timeout (`run.async_timeout_s`): a stuck engine or sandbox ends the run with an
error naming what waited, not a hang.

Checkpoints: the in-flight groups are regenerated, not saved. The checkpoint records the
admission index and problem of every admitted, untrained group (over all ranks) and the problem
blocks they come from; a resumed run re-admits them first, under the resumed weights and with the
same seeds, so the bound holds trivially and the checkpoint stays small (their partial tokens
would be stale by then anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import asdict, dataclass, field

from cir.data import Problem
from cir.prompts import prompt_token_ids
from cir.rewards import score_trajectories
from cir.rollout import drive, sample_seed, trajectory_runs
from cir.training.actor import sync_weights
from cir.training.collector import Collected, Sample, SyncCollector, stage_rollout_config
from cir.training.faults import fault_survivors
from cir.trajectory import Trajectory


class CollectorTimeout(RuntimeError):
    """A wait of the asynchronous collector ran past `run.async_timeout_s`."""


@dataclass
class _Group:
    g: int  # global admission index
    problem: Problem
    version: int  # the policy version when it was admitted
    futures: list = field(default_factory=list)  # one concurrent future per trajectory

    @property
    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def trajectories(self) -> list[Trajectory]:
        return [f.result() for f in self.futures]


class _TimedSandbox:
    """The sandbox as the rollout sees it, timing its executions against the update windows:
    `overlap_s` is the wall time, within the windows, during which at least one snippet was in
    the sandbox (running or queued for a worker): the sandbox's work the update hid."""

    def __init__(self, sandbox):
        self._sandbox = sandbox
        self._lock = threading.Lock()
        self._in_flight = 0
        self._window_open = False
        self._last = time.perf_counter()
        self.overlap_s = 0.0

    def __getattr__(self, name):
        return getattr(self._sandbox, name)

    def _advance(self) -> None:
        """Count the time since the last event if it was overlapped (under the lock)."""
        now = time.perf_counter()
        if self._window_open and self._in_flight:
            self.overlap_s += now - self._last
        self._last = now

    async def arun(self, code, **kwargs):
        with self._lock:
            self._advance()
            self._in_flight += 1
        try:
            return await self._sandbox.arun(code, **kwargs)
        finally:
            with self._lock:
                self._advance()
                self._in_flight -= 1

    def window_opens(self) -> None:
        with self._lock:
            self._advance()
            self._window_open = True

    def window_closes(self) -> None:
        with self._lock:
            self._advance()
            self._window_open = False


class AsyncCollector(SyncCollector):
    """Trajectories in flight across steps under a staleness bound (see the module docstring)."""

    def __init__(self, cfg, **parts):
        super().__init__(cfg, **parts)
        run = cfg.run
        self.max_staleness = run.max_staleness
        self.timeout_s = run.async_timeout_s
        self.B = cfg.algo.prompts_per_step
        self.shard = self.dist.shard_bounds(self.B)
        self.B_r = self.shard[1] - self.shard[0]
        self.timed_sandbox = _TimedSandbox(self.sandbox)
        self.version: int | None = None  # the policy version the engine holds (set at the first collect)
        self.next_g = 0  # the first admission index of the next block to draw from the stream
        self.blocks: dict[int, list[Problem]] = {}  # block number -> the stream's problems of that step
        self.groups: dict[int, _Group] = {}  # admitted, untrained groups of this rank, by g
        self._todo: list[int] = []  # this rank's groups of the drawn blocks not admitted yet, in order
        self._changed = threading.Condition()
        self._last_activity = None
        self._last_collect = None
        # The loop and its gate (open: new generate calls may start).
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cir-collector", daemon=True)
        self._thread.start()
        self._gate = self._on_loop(self._make_gate())

    # -- the loop --------------------------------------------------------------------------------

    def _on_loop(self, coro, what: str = "the collector's loop"):
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.timeout_s)
        except TimeoutError:
            raise CollectorTimeout(f"{what} did not answer within run.async_timeout_s={self.timeout_s:g} s") from None

    @staticmethod
    async def _make_gate() -> asyncio.Event:
        gate = asyncio.Event()
        gate.set()
        return gate

    async def _wait_gate(self) -> None:
        if not self._gate.is_set():
            await asyncio.wait_for(self._gate.wait(), self.timeout_s)

    async def _close_gate(self) -> None:
        self._gate.clear()

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The sampler, the admission index, and every rank's admitted, untrained groups (to be
        regenerated on resume). A collective: every rank calls it."""
        pending = self.dist.gather_to_main(sorted(self.groups) + self._todo)
        pending = sorted(g for part in pending or [] for g in part)
        needed = {g // self.B for g in pending}
        return {
            "sampler": self.sampler.state_dict(),
            "async": {
                "next_g": self.next_g,
                "pending": pending,
                "blocks": {str(b): [asdict(p) for p in self.blocks[b]] for b in sorted(needed)},
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        saved = state.get("async")
        if saved is None:  # a synchronous run's checkpoint: its next step starts a fresh block
            return
        self.next_g = int(saved["next_g"])
        self.blocks = {int(b): [Problem(**p) for p in problems] for b, problems in saved["blocks"].items()}
        # Admitted but untrained (regenerated now, same seeds) and not yet admitted, in order.
        self._todo = [g for g in saved["pending"] if self._mine(g)]

    # -- admission -------------------------------------------------------------------------------

    def _mine(self, g: int) -> bool:
        return self.shard[0] <= g % self.B < self.shard[1]

    def _problem(self, g: int) -> Problem:
        return self.blocks[g // self.B][g % self.B]

    def _draw_block(self) -> None:
        """The stream's next `B` problems: the block of admission indices next_g .. next_g + B."""
        block = self.next_g // self.B
        self.blocks[block] = self.sampler.next_batch()
        self._todo += [self.next_g + i for i in range(*self.shard)]
        self.next_g += self.B

    def _admit(self, stage) -> None:
        """Admit this rank's next groups while the capacity rule allows."""
        capacity = (self.max_staleness + 1) * self.B_r
        while len(self.groups) < capacity:
            if not self._todo:
                self._draw_block()
            self._start_group(self._todo.pop(0), stage)

    def _start_group(self, g: int, stage) -> None:
        cfg = self.cfg
        problem = self._problem(g)
        G = cfg.algo.group_size
        prompt = prompt_token_ids(self.template, problem.problem, self.tokenizer)
        step, i = divmod(g, self.B)
        runs = trajectory_runs(
            self.engine,
            [prompt] * G,
            stage_rollout_config(cfg.rollout, stage),
            seeds=[sample_seed(cfg.run.seed, step, 0, i, j) for j in range(G)],
            problem_ids=[problem.id] * G,
            groups=[g] * G,
            version=lambda: self.version,
        )
        group = _Group(g, problem, self.version)
        for run in runs:
            future = asyncio.run_coroutine_threadsafe(
                drive(self.engine, self.timed_sandbox, run, gate=self._wait_gate), self.loop
            )
            future.add_done_callback(self._notify)
            group.futures.append(future)
        self.groups[g] = group

    def _notify(self, _future) -> None:
        with self._changed:
            self._changed.notify_all()

    # -- collect ---------------------------------------------------------------------------------

    def collect(self, step: int, stage) -> Collected:
        if self.version is None:
            self.version = step
            if not self.blocks and not self._todo:
                # A fresh run, or one resumed from a synchronous checkpoint: step `step` draws block
                # `step`, as the synchronous trainer would (its seeds too).
                self.next_g = max(self.next_g, step * self.B)
        if self.version != step:
            raise RuntimeError(f"async collector at policy version {self.version}, asked for step {step}")
        t0 = time.perf_counter()
        self._admit(stage)
        chosen = sorted(self._wait_for_step(step))
        trajectories = [t for g in chosen for t in self.groups.pop(g).trajectories()]
        answers = {g: self._problem(g).answer for g in chosen}
        t_reward = time.perf_counter()
        rewards = score_trajectories(
            trajectories,
            [answers[t.group] for t in trajectories],
            self.tokenizer,
            self.cfg.reward,
            stage.max_response_tokens,
        )
        t_reward = time.perf_counter() - t_reward
        first = self._global_offset(len(chosen))
        G = self.cfg.algo.group_size
        samples = [Sample(t, r, first * G + k) for k, (t, r) in enumerate(zip(trajectories, rewards))]
        # The machine's faults are not the policy's: such trajectories stay out of the loss, and a
        # group keeps its place, scored from its survivors (or dropped), as in the synchronous
        # collector (`cir.training.faults`).
        survivors, excluded = fault_survivors([r.fault is not None for r in rewards], [t.group for t in trajectories])
        self._forget_blocks()
        metrics = self._metrics(step, chosen, trajectories, time.perf_counter() - t0)
        return Collected(samples, [samples[i] for i in survivors], t_reward, metrics, excluded)

    def _wait_for_step(self, step: int) -> list[int]:
        """The groups step `step` trains on: every one admitted at version <= step - S (waited
        for), then the earliest admitted of the completed others, up to B_r."""
        S = self.max_staleness

        def choose() -> list[int] | None:
            self._raise_failures()
            ordered = sorted(self.groups.values(), key=lambda grp: (grp.version, grp.g))
            must = [grp for grp in ordered if grp.version <= step - S][: self.B_r]
            if not all(grp.done for grp in must):
                return None
            taken = {grp.g for grp in must}
            others = [grp for grp in ordered if grp.g not in taken and grp.done]
            chosen = must + others[: self.B_r - len(must)]
            if len(chosen) < min(self.B_r, len(self.groups)):
                return None
            return [grp.g for grp in chosen]

        deadline = time.monotonic() + self.timeout_s
        with self._changed:
            while (chosen := choose()) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    waiting = sorted(g for g, grp in self.groups.items() if not grp.done)
                    raise CollectorTimeout(
                        f"async collector: step {step} waited {self.timeout_s:g} s for its groups "
                        f"(still running: admission indices {waiting[:8]}); the engine or the sandbox "
                        "seems stuck (run.async_timeout_s)"
                    )
                self._changed.wait(min(left, 1.0))
        return chosen

    def _raise_failures(self) -> None:
        for grp in self.groups.values():
            for f in grp.futures:
                if f.done() and f.exception() is not None:
                    raise RuntimeError(f"async collector: a rollout of group {grp.g} failed") from f.exception()

    def _global_offset(self, count: int) -> int:
        """How many groups ranks before this one train this step (their samples come first)."""
        counts = self.dist.counts_by_rank([count])
        return sum(row[0] for row in counts[: self.dist.rank])

    def _forget_blocks(self) -> None:
        keep = {g // self.B for g in self.groups} | {g // self.B for g in self._todo}
        self.blocks = {b: p for b, p in self.blocks.items() if b in keep}

    def _metrics(self, step: int, chosen: list[int], trajectories: list[Trajectory], wall_s: float) -> dict:
        """Staleness and overlap figures of the step, over every rank."""
        S = self.max_staleness
        staleness, spans, tokens = [], [], 0
        for t in trajectories:
            versions = [v for v, m in zip(t.versions, t.loss_mask) if m]
            staleness += [step - v for v in versions]
            if versions:
                spans.append(max(versions) - min(versions))
            tokens += len(versions)
        over = sum(
            1 for g in set(chosen) if any(step - v > S for t in trajectories if t.group == g for v in t.versions)
        )
        activity = self.engine.activity() if hasattr(self.engine, "activity") else None
        idle = None
        if activity is not None and self._last_activity is not None:
            idle = (activity - self._last_activity).idle_share
        self._last_activity = activity
        now = time.perf_counter()
        interval = now - self._last_collect if self._last_collect is not None else wall_s
        self._last_collect = now
        sums = self.dist.sum_floats(
            [
                float(sum(staleness)),
                float(len(staleness)),
                float(sum(s > 0 for s in staleness)),
                float(sum(spans)),
                float(len(spans)),
                float(over),
                float(len(self.groups)),
                float(self.timed_sandbox.overlap_s),
                float(tokens),
            ]
        )
        n_tok, n_traj = max(sums[1], 1.0), max(sums[4], 1.0)
        out = {
            "async/staleness_mean": sums[0] / n_tok,
            "async/staleness_max": self.dist.max_float(float(max(staleness, default=0))),
            "async/stale_token_share": sums[2] / n_tok,
            "async/version_span_mean": sums[3] / n_traj,
            "async/version_span_max": self.dist.max_float(float(max(spans, default=0))),
            "async/over_bound_groups": sums[5],
            "async/groups_carried": sums[6],
            "async/sandbox_overlap_s": sums[7],
            "async/tokens_per_s": sums[8] / max(interval, 1e-9),
        }
        self.timed_sandbox.overlap_s = 0.0
        if idle is not None:
            out["async/engine_idle_share"] = self.dist.mean_metrics({"x": idle})["x"]
        return out

    # -- around the update -----------------------------------------------------------------------

    @contextlib.contextmanager
    def update_window(self):
        """Close the gate, pause the engine (requests in flight return their partial tokens),
        let it sleep; the actor updates inside; the engine wakes but stays paused until
        `publish` has loaded the new weights."""
        self._on_loop(self._close_gate())
        self.timed_sandbox.window_opens()
        self.engine.pause(timeout_s=self.timeout_s)
        with super().update_window():
            yield

    def publish(self, actor) -> None:
        sync_weights(actor, self.engine)
        self.version += 1
        self.engine.resume()
        self.timed_sandbox.window_closes()
        self.loop.call_soon_threadsafe(self._gate.set)

    def close(self) -> None:
        """Cancel what is in flight and stop the loop (the state stays readable: `state_dict`
        still lists the cancelled groups, which a resumed run regenerates)."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self.engine.resume()
        with contextlib.suppress(Exception):
            self._on_loop(self._cancel_all(), "cancelling the rollouts in flight")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.loop.close()

    @staticmethod
    async def _cancel_all() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
