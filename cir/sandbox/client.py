"""The sandbox a trainer talks to: `Sandbox` (sync, batch and asyncio entry points) and the
settings it starts its warm interpreter with.

The C++ core (``cir._sandbox.Supervisor``) queues requests, feeds the worker slots, captures
output, enforces the limits and restarts the zygote if it dies; the GIL is released while it
waits. This module turns its outcomes into `ExecResult`s, keeps session histories and routes
completions to asyncio futures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cir.sandbox.config import DEFAULT_PRELOAD, MiB
from cir.sandbox.isolation import (
    child_environment,
    describe_isolation,
    isolation_warnings,
)
from cir.sandbox.policy import IsolationPolicy
from cir.sandbox.results import FAULT_REASONS, ExecResult, classify, truncation_marker

if TYPE_CHECKING:
    from cir.sandbox.config import SandboxConfig

log = logging.getLogger("cir.sandbox")

# The zygote bootstrap: restore the caller's import path, then hand over to the zygote module.
_BOOTSTRAP = "import sys, json; sys.path[:] = json.loads(sys.argv[1]); from cir.sandbox.zygote import main; main()"


class SandboxError(RuntimeError):
    """The sandbox cannot run snippets: it refused to start (the machine cannot isolate as
    its policy asks), could not start, is closed, or is unavailable for now (its interpreter
    keeps failing to start; it goes on trying, with backoff, and runs snippets again once one
    starts). Never a snippet's fault."""


@dataclass
class _Cell:
    code: str
    wall_ms: float
    cpu_ms: float


@dataclass
class _Limits:
    timeout_s: float
    memory_mb: int
    cpu_time_s: float | None
    max_processes: int
    max_open_files: int
    max_file_bytes: int


@dataclass
class _AsyncBridge:
    """Routes completions announced on the core's notify fd to asyncio futures."""

    futures: dict = field(default_factory=dict)  # request id -> (future, on_done)
    pending_per_loop: dict = field(default_factory=dict)  # loop -> count
    lock: threading.Lock = field(default_factory=threading.Lock)


def launch_settings(
    *,
    workers: int,
    preload: Sequence[str] = DEFAULT_PRELOAD,
    warmup: bool = True,
    policy: IsolationPolicy | None = None,
    native_fork: bool = True,
    huge_pages: bool = True,
    fill_free_blocks: bool = True,
) -> dict:
    """How the supervisor starts the zygote: executable, argv, environment, the zygote's
    configuration (JSON) and the isolation policy (JSON). Used by `Sandbox` and by the native
    supervisor test's driver."""
    policy = IsolationPolicy() if policy is None else policy
    config = {
        "preload": list(preload),
        "warmup": bool(warmup),
        # Only to order the snippets' import path: what they can see is derived in the zygote.
        "sys_path": list(sys.path),
        "child_env": child_environment("/"),
        "native_fork": bool(native_fork),
        "huge_pages": bool(huge_pages),
        "fill_free_blocks": bool(fill_free_blocks),
    }
    zygote_env = child_environment("/")
    zygote_env.pop("TMPDIR")
    return {
        "executable": _interpreter_path(),
        "argv": [sys.executable, "-c", _BOOTSTRAP, json.dumps(list(sys.path))],
        "env": [f"{k}={v}" for k, v in zygote_env.items()],
        "config_json": json.dumps(config),
        "policy_json": policy.to_json(),
    }


class Sandbox:
    """A pool of isolated, warm Python executors. Thread-safe; a context manager.

    Args:
        workers: snippets running at the same time (default: CPU count).
        timeout_s: time limit per snippet, counted from the moment it starts (time in the
            queue does not count), on its own time (see Time limit below).
        memory_mb: address space a snippet may use on top of the preloaded modules
            (RLIMIT_AS), i.e. what ``python -c`` gets under ``ulimit -v``.
        max_output_bytes: stdout + stderr kept per snippet; past it the snippet is killed and
            the text ends with "[... output truncated at N bytes]".
        preload: modules imported in the warm interpreter.
        warmup: exercise sympy/numpy/stdlib once so first-use costs are paid up front.
        cpu_time_s: RLIMIT_CPU (default: timeout + 1 s).
        max_processes: RLIMIT_NPROC for the snippet's uid (contains fork bombs).
        max_open_files: RLIMIT_NOFILE.
        max_file_bytes: RLIMIT_FSIZE (largest file a snippet may write).
        network: allow network access (default: none).
        namespaces: use pid/net/mount/ipc namespaces (False needs accept_weaker_isolation).
        extra_readonly_paths: host paths shown read-only to snippets beyond what their
            interpreter needs. Visible to the policy: model-written code can read (and print)
            whatever is there.
        accept_weaker_isolation: start even where the machine cannot provide the isolation
            (no mount or user namespaces); snippets then see the host's files as far as
            permissions allow. Without it such a sandbox refuses to start (SandboxError,
            one line naming what is missing).
        work_dir_bytes, work_dir_inodes: caps of a snippet's writable space (its work dir, on
            its worker slot's own tmpfs). Default: 4 x max_file_bytes (at least 64 MiB), 4096.
        policy: the whole `IsolationPolicy` at once (then the five arguments above are not given).
        startup_timeout_s: how long to wait for the warm interpreter to become ready.
        fault_attempts: how often a snippet is run when the machine fails it (the interpreter
            dies under it, its process cannot be started, it is starved of CPU): retried with
            the same code after retry_backoff_s, then twice that, ...; still failing, its result
            has status "sandbox_fault" (see ExecResult.reason).
        retry_backoff_s: the first wait before such a retry.
        restart_backoff_s: (first, longest) wait before starting the interpreter again after a
            failed start. The sandbox never gives up: after three failed starts in a row it
            raises SandboxError for every snippet until a start succeeds.
        wall_guard: (factor, extra seconds): the wall clock ends every snippet at
            factor x its limit + extra, however long it waited for a CPU (see Time limit).
        native_fork: fork snippet processes from the zygote's C++ loop, leaving out Python's
            at-fork handlers that only matter when other threads exist (the zygote has
            none), instead of through ``os.fork`` from a Python loop (False: the reference
            path). Falls back to ``os.fork`` where it cannot tell that this is safe.
        huge_pages: lay the zygote's object heap out in 2 MiB-aligned chunks and back it with
            transparent huge pages, so a fork copies (and an exit tears down) one page-table
            entry per 2 MiB instead of 512.
        fill_free_blocks: take the free small-object blocks the warm-up left in the zygote
            with inert placeholders, so a snippet's objects go to fresh pages instead of being
            scattered over (and copying) the zygote's.

        The last three only change how fast a snippet starts and ends; with all three False
        the sandbox takes its plain reference path.

    Attributes:
        policy: the `IsolationPolicy` in force.
        isolation: what is isolated on this machine, one mechanism per line, with every path
            a snippet can see.
        isolation_facts: the same as data (namespaces, uid range, filesystem, seccomp, ...).

    Time limit: it counts the snippet's own time (running, or sleeping and waiting on its
    own account), not the time it was ready to run but waited for a CPU behind other work
    (the scheduler's per-task run delay). A wall-clock guard still ends every snippet, at
    three times its limit plus 5 s (`wall_guard`); if the snippet's own time was not used up
    by then, it had mostly waited for a CPU: a fault of the machine ("starved"), retried,
    never the snippet's timeout.

    Sessions: ``run(code, session="traj-17")`` first replays the earlier *successful* cells
    of that session in the same fresh process, with their output discarded, then runs
    `code`; only its output is reported. The time limit applies to `code` alone (the replay
    gets twice the time the cells took originally, plus the limit). A cell that fails on
    replay (e.g. it depends on randomness) is skipped. ``close_session`` forgets it all.

    Lifetime: `close` (or leaving the ``with`` block) stops the zygote and lets go of the C++
    supervisor. A sandbox never closed is closed when it is garbage-collected, or at the
    latest when the interpreter exits (see `_CoreHandle`).
    """

    @classmethod
    def from_config(cls, cfg: SandboxConfig) -> Sandbox:
        """The sandbox a run's ``sandbox.*`` config describes (other settings: defaults)."""
        return cls(
            workers=cfg.workers,
            timeout_s=cfg.timeout_s,
            memory_mb=cfg.memory_mb,
            max_output_bytes=cfg.max_output_bytes,
            preload=tuple(cfg.preload),
            extra_readonly_paths=tuple(cfg.extra_readonly_paths),
            accept_weaker_isolation=cfg.accept_weaker_isolation,
        )

    def __init__(
        self,
        workers: int | None = None,
        timeout_s: float = 5.0,
        memory_mb: int = 2048,
        max_output_bytes: int = 64 * 1024,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        warmup: bool = True,
        cpu_time_s: float | None = None,
        max_processes: int = 64,
        max_open_files: int = 256,
        max_file_bytes: int = 16 * MiB,
        network: bool = False,
        *,
        namespaces: bool = True,
        extra_readonly_paths: Sequence[str] = (),
        accept_weaker_isolation: bool = False,
        work_dir_bytes: int | None = None,
        work_dir_inodes: int = 4096,
        policy: IsolationPolicy | None = None,
        startup_timeout_s: float = 300.0,
        native_fork: bool = True,
        huge_pages: bool = True,
        fill_free_blocks: bool = True,
        fault_attempts: int = 3,
        retry_backoff_s: float = 0.05,
        restart_backoff_s: tuple[float, float] = (0.1, 30.0),
        wall_guard: tuple[float, float] = (3.0, 5.0),
    ):
        from cir import _sandbox

        workers = (os.cpu_count() or 1) if workers is None else int(workers)
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("max_output_bytes", max_output_bytes)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if cpu_time_s is not None and not cpu_time_s > 0:
            raise ValueError(f"cpu_time_s must be > 0, got {cpu_time_s!r}")
        if isinstance(preload, str):
            raise TypeError("preload must be a sequence of module names, not a string")
        if policy is None:
            policy = IsolationPolicy(
                namespaces=bool(namespaces),
                network=bool(network),
                extra_readonly_paths=tuple(extra_readonly_paths),
                work_dir_bytes=max(64 * MiB, 4 * int(max_file_bytes))
                if work_dir_bytes is None
                else int(work_dir_bytes),
                work_dir_inodes=int(work_dir_inodes),
                accept_weaker_isolation=bool(accept_weaker_isolation),
            )
        elif not isinstance(policy, IsolationPolicy):
            raise TypeError(f"policy must be an IsolationPolicy, got {type(policy).__name__}")
        network = policy.network
        self.policy = policy
        self.workers = workers
        self.max_output_bytes = int(max_output_bytes)
        self._limits = _Limits(
            timeout_s=float(timeout_s),
            memory_mb=int(memory_mb),
            cpu_time_s=cpu_time_s,
            max_processes=int(max_processes),
            max_open_files=int(max_open_files),
            max_file_bytes=int(max_file_bytes),
        )
        self._sessions: dict[str, list[_Cell]] = {}
        self._sessions_lock = threading.Lock()
        self._bridge = _AsyncBridge()
        self._closed = False

        first_backoff, longest_backoff = restart_backoff_s
        supervisor = _sandbox.Supervisor(
            **launch_settings(
                workers=workers,
                preload=preload,
                warmup=warmup,
                policy=policy,
                native_fork=native_fork,
                huge_pages=huge_pages,
                fill_free_blocks=fill_free_blocks,
            ),
            workers=workers,
            max_output_bytes=self.max_output_bytes,
            host_tmp_dir=tempfile.gettempdir(),
            startup_timeout_s=float(startup_timeout_s),
            fault_attempts=int(fault_attempts),
            retry_backoff_s=float(retry_backoff_s),
            restart_backoff_s=float(first_backoff),
            restart_backoff_max_s=float(longest_backoff),
            wall_guard_factor=float(wall_guard[0]),
            wall_guard_extra_s=float(wall_guard[1]),
        )
        self._handle = _CoreHandle(supervisor)
        # Runs on close(), when the sandbox is collected, or at interpreter exit (finalizers
        # are atexit hooks), whichever comes first. It holds the handle, never the sandbox.
        self._finalizer = weakref.finalize(self, _CoreHandle.release, self._handle)
        self._final_stats: dict = {}
        try:
            supervisor.wait_ready(float(startup_timeout_s))
        except RuntimeError as exc:
            self._finalizer()
            message = str(exc)
            if message.startswith("cir sandbox: refusing"):
                raise SandboxError(message) from None  # one line: what is missing, what accepts it
            raise SandboxError(f"the sandbox could not start: {message}") from None
        self.isolation_facts: dict = json.loads(supervisor.ready_json or "{}")
        self.isolation_facts["uid_range"] = (
            (supervisor.uid_base, supervisor.uid_base + supervisor.uid_slots - 1)
            if self.isolation_facts.get("drop_uid")
            else None
        )
        self.isolation: str = describe_isolation(self.isolation_facts, network=network)
        for warning in isolation_warnings(self.isolation_facts, network=network):
            log.warning("cir sandbox: %s", warning)

    # -- running ------------------------------------------------------------------------
    def run(self, code: str, *, timeout_s: float | None = None, session: str | None = None) -> ExecResult:
        """Runs one snippet and waits for it (the GIL is released meanwhile)."""
        job = self._job(code, timeout_s, session)
        outcome = self._core.wait(self._submit(job))
        return self._finish(outcome, code, session)

    def run_batch(
        self,
        codes: Sequence[str],
        *,
        timeout_s: float | None = None,
        sessions: Sequence[str | None] | None = None,
        progress: bool = False,
    ) -> list[ExecResult]:
        """Runs many snippets on all workers; results come back in the order of `codes`.

        Cells of the same session run one after the other, in order, each seeing the
        earlier ones; everything else runs concurrently.
        """
        codes = list(codes)
        if sessions is None:
            sessions = [None] * len(codes)
        sessions = list(sessions)
        if len(sessions) != len(codes):
            raise ValueError(f"sessions has {len(sessions)} entries for {len(codes)} codes")
        results: list[ExecResult | None] = [None] * len(codes)
        waiting: dict[str, deque[int]] = {}
        submitted: deque[tuple[int, int]] = deque()
        for i, (code, session) in enumerate(zip(codes, sessions)):
            if session is not None and session in waiting:
                waiting[session].append(i)
                continue
            if session is not None:
                waiting[session] = deque()
            submitted.append((i, self._submit(self._job(code, timeout_s, session))))
        bar = _progress_bar(len(codes), progress)
        try:
            while submitted:
                i, rid = submitted.popleft()
                results[i] = self._finish(self._core.wait(rid), codes[i], sessions[i])
                bar.update(1)
                session = sessions[i]
                if session is not None and waiting.get(session):
                    j = waiting[session].popleft()
                    submitted.append((j, self._submit(self._job(codes[j], timeout_s, session))))
        finally:
            bar.close()
            # Only left on error (e.g. KeyboardInterrupt): kill them and collect the outcomes,
            # so nothing stays behind in the core (a closed core has failed them all already).
            core = self._handle.supervisor
            if core is not None:
                for _, rid in submitted:
                    core.cancel(rid)
                for _, rid in submitted:
                    try:
                        core.wait(rid)
                    except Exception:  # noqa: BLE001 - already failing; the first error wins
                        pass
        return results  # type: ignore[return-value]

    async def arun(self, code: str, *, timeout_s: float | None = None, session: str | None = None) -> ExecResult:
        """Runs one snippet without blocking the event loop.

        Completion is signalled on an eventfd the loop watches (no thread per call).
        Cancelling the awaiting task kills the snippet.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        job = self._job(code, timeout_s, session)
        bridge = self._bridge
        with bridge.lock:
            rid = self._submit(job, notify=True)
            bridge.futures[rid] = future
            count = bridge.pending_per_loop.get(loop, 0)
            if count == 0:
                loop.add_reader(self._core.notify_fd, self._drain_notified)
            bridge.pending_per_loop[loop] = count + 1
        try:
            outcome = await future
        except asyncio.CancelledError:
            core = self._handle.supervisor
            if core is not None:  # (a closed core has ended the snippet already)
                core.cancel(rid)
            self._forget_future(rid, loop)
            raise
        return self._finish(outcome, code, session)

    def _drain_notified(self) -> None:
        core = self._handle.supervisor
        if core is None:  # released at exit; close() drained what was left
            return
        bridge = self._bridge
        with bridge.lock:
            done = core.take_notified()
            items = [(bridge.futures.pop(rid, None), outcome) for rid, outcome in done]
            for future, _ in items:
                if future is not None:
                    self._release_loop(future.get_loop())
        for future, outcome in items:
            if future is None:
                continue
            loop = future.get_loop()
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if loop is running:
                if not future.done():
                    future.set_result(outcome)
            elif not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, future, outcome)

    def _forget_future(self, rid: int, loop) -> None:
        with self._bridge.lock:
            if self._bridge.futures.pop(rid, None) is not None:
                self._release_loop(loop)

    def _release_loop(self, loop) -> None:
        # Called with the bridge lock held.
        count = self._bridge.pending_per_loop.get(loop, 0) - 1
        if count <= 0:
            self._bridge.pending_per_loop.pop(loop, None)
            core = self._handle.supervisor  # None once closed: close() removed the readers
            if core is not None and not loop.is_closed():
                try:
                    loop.remove_reader(core.notify_fd)
                except (RuntimeError, ValueError):
                    pass
        else:
            self._bridge.pending_per_loop[loop] = count

    # -- sessions -------------------------------------------------------------------------
    def close_session(self, session: str) -> None:
        """Forgets a session's history (later cells start from a fresh interpreter)."""
        with self._sessions_lock:
            self._sessions.pop(session, None)

    # -- bookkeeping --------------------------------------------------------------------------
    def stats(self) -> dict:
        """The counters of `counters` plus the state now: queued, inflight, occupied_slots
        (inflight + finished processes still being torn down), zygote_pid (host pid), ready,
        available (False while the interpreter keeps failing to start), sessions."""
        core = self._handle.supervisor
        s = dict(core.stats()) if core is not None else dict(self._final_stats)
        with self._sessions_lock:
            s["sessions"] = len(self._sessions)
        return s

    def counters(self) -> dict[str, int]:
        """A snapshot of counters that only grow over the sandbox's life, for a trainer to log
        per step (the difference between two snapshots):

        submitted, executed (snippets that ran to a verdict of their own), timeouts,
        output_limits; retries (runs repeated after a fault of the machine), restarts (of the
        warm interpreter, after it died or failed to start), start_failures (starts that never
        became ready); faults (snippets given up as "sandbox_fault", all reasons) and
        faults_<reason> for interpreter_lost, start_failed, host_resource and starved (see
        results.FAULT_REASONS); unavailable (snippets refused with SandboxError while no
        interpreter could be started).
        """
        s = self.stats()
        keys = ("submitted", "executed", "timeouts", "output_limits", "retries", "restarts", "start_failures")
        out = {k: int(s[k]) for k in keys}
        reasons = {k: int(s[f"faults_{k}"]) for k in FAULT_REASONS if k != "unavailable"}
        out["faults"] = sum(reasons.values())
        out.update({f"faults_{k}": v for k, v in reasons.items()})
        out["unavailable"] = int(s["unavailable"])
        return out

    def close(self) -> None:
        """Stops the zygote and every snippet; pending requests fail with SandboxError."""
        if self._closed:
            return
        self._closed = True
        core = self._handle.supervisor
        if core is None:  # already released at interpreter exit
            return
        core.close()
        # Pending arun() calls get their "sandbox closed" outcome (raised as SandboxError).
        self._drain_notified()
        with self._bridge.lock:
            for loop in list(self._bridge.pending_per_loop):
                if not loop.is_closed():
                    try:
                        loop.remove_reader(core.notify_fd)
                    except (RuntimeError, ValueError):
                        pass
            self._bridge.pending_per_loop.clear()
        self._final_stats = dict(core.stats())
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------
    @property
    def _core(self):
        """The C++ supervisor; SandboxError once it has been let go of."""
        core = self._handle.supervisor
        if core is None:
            raise SandboxError("sandbox is closed")
        return core

    def _job(self, code: str, timeout_s: float | None, session: str | None) -> dict:
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        if self._closed:
            raise SandboxError("sandbox is closed")
        lim = self._limits
        timeout = lim.timeout_s if timeout_s is None else float(timeout_s)
        if not timeout > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        cpu = lim.cpu_time_s if lim.cpu_time_s is not None else timeout + 1.0
        cells: list[_Cell] = []
        if session is not None:
            with self._sessions_lock:
                cells = list(self._sessions.get(session, ()))
        # Replaying history takes about as long as it took the first time; allow twice that.
        replay_wall = sum(c.wall_ms for c in cells) / 1000.0
        replay_cpu = sum(c.cpu_ms for c in cells) / 1000.0
        return {
            "code": code.encode("utf-8", "surrogatepass"),
            "cells": [c.code.encode("utf-8", "surrogatepass") for c in cells],
            "timeout_s": timeout,
            "replay_timeout_s": 2 * replay_wall + 1.0 + timeout,
            "as_bytes": lim.memory_mb * MiB,
            "cpu_seconds": max(1, math.ceil(cpu + 2 * replay_cpu)),
            "fsize_bytes": lim.max_file_bytes,
            "nproc": lim.max_processes,
            "nofile": lim.max_open_files,
        }

    def _submit(self, job: dict, notify: bool = False) -> int:
        try:
            return self._core.submit(**job, notify=notify)
        except RuntimeError as exc:  # closed, refused or unavailable: the sandbox's state, not the code's
            raise SandboxError(str(exc)) from None

    def _finish(self, outcome: dict, code: str, session: str | None) -> ExecResult:
        if outcome["infra_error"]:
            raise SandboxError(outcome["infra_message"])
        if outcome["cancelled"]:
            raise asyncio.CancelledError()
        if outcome["fault"]:
            reason = outcome["fault"]
            log.warning("cir sandbox: snippet given up after %d attempts: %s", outcome["attempts"], reason)
            return ExecResult("sandbox_fault", "", "", 0, 0.0, 0.0, reason=reason, attempts=int(outcome["attempts"]))
        result = self._result(outcome)
        if session is not None and result.status == "ok":
            with self._sessions_lock:
                self._sessions.setdefault(session, []).append(_Cell(code, result.wall_ms, result.cpu_ms))
        return result

    def _result(self, o: dict) -> ExecResult:
        stdout = o["stdout"].decode("utf-8", "replace")
        stderr = o["stderr"].decode("utf-8", "replace")
        exit_code = int(o["exit_code"])
        if o["truncated"]:
            # The snippet is killed once past the limit; whether it managed to exit first is
            # a race, so the outcome is always reported as that kill.
            exit_code = -signal.SIGKILL
            marker = truncation_marker(self.max_output_bytes)
            if o["truncated_stream"] == 2:
                stderr += marker
            else:
                stdout += marker
        status = classify(
            exit_code=exit_code,
            stderr=stderr,
            timed_out=o["timed_out"],
            truncated=o["truncated"],
            maxrss_kb=o["maxrss_kb"],
            memory_mb=self._limits.memory_mb + self.isolation_facts.get("vm_preloaded_extra_bytes", 0) / MiB,
        )
        return ExecResult(
            status, stdout, stderr, exit_code, float(o["wall_ms"]), float(o["cpu_ms"]), attempts=int(o["attempts"])
        )


class _CoreHandle:
    """Owns a sandbox's C++ supervisor (the ``cir._sandbox.Supervisor`` Python object) until
    `release` closes it and drops it.

    The supervisor object must be gone before the interpreter finishes shutting down:
    nanobind counts the instances still alive at that point as leaked and prints a report.
    A sandbox object itself may well survive the shutdown: the interpreter never frees what
    a daemon thread's frames can reach, and a daemon thread started from a script's
    ``__main__`` (a progress monitor, a logger, a server) reaches the script's globals
    through its function. So the sandbox only holds this handle, and `release` empties it
    on close() or at the latest at exit, while the interpreter is still whole.
    """

    __slots__ = ("supervisor",)

    def __init__(self, supervisor) -> None:
        self.supervisor = supervisor

    @staticmethod
    def release(handle: _CoreHandle) -> None:
        supervisor, handle.supervisor = handle.supervisor, None
        if supervisor is not None:
            supervisor.close()  # idempotent; it also stops the zygote when close() was never called


def _interpreter_path() -> str:
    """What to exec for the zygote: this very interpreter. Through /proc/self/exe when that is
    it, which also works where the interpreter's directory cannot be traversed by our uid."""
    try:
        own = os.stat("/proc/self/exe")
    except OSError:
        return sys.executable
    try:
        named = os.stat(sys.executable)
    except OSError:
        return "/proc/self/exe"  # our uid cannot reach it by name, but it is what runs us
    same = (own.st_dev, own.st_ino) == (named.st_dev, named.st_ino)
    return "/proc/self/exe" if same else sys.executable


def _resolve(future, outcome) -> None:
    if not future.done():
        future.set_result(outcome)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="snippet", file=sys.stderr, dynamic_ncols=True)
