"""Run model-written Python snippets fast and isolated.

A :class:`Sandbox` keeps one warm interpreter (the *zygote*: a Python process with sympy,
numpy, ... imported and exercised once) and forks it for every snippet, so a snippet pays
neither interpreter start-up nor imports. The C++ core (``cir._sandbox``) queues requests,
feeds a fixed number of worker slots, captures output through pipes, enforces the limits
and restarts the zygote if it dies; the GIL is released while it waits.

Each snippet runs in a fresh process that looks like ``python -c CODE``: same exit status,
stdout and traceback, its own empty working directory, a clean environment, rlimits on
address space, CPU time, file size, processes and open files, no network, an unprivileged
uid when the trainer runs as root, and nothing it started survives it. See
:attr:`Sandbox.isolation` for what is active on the current machine.

    with Sandbox(workers=4) as sb:
        sb.run("print(2 + 2)").stdout            # '4\\n'
        sb.run_batch(["1/0", "print(1)"])        # order kept
        await sb.arun(code, session="traj-17")   # asyncio; sees earlier cells of traj-17
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

log = logging.getLogger("cir.sandbox")

MiB = 1024 * 1024
DEFAULT_PRELOAD: tuple[str, ...] = ("math", "fractions", "itertools", "sympy", "numpy")
STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "killed")

# The zygote bootstrap: restore the caller's import path, then hand over to cir._zygote.
_BOOTSTRAP = "import sys, json; sys.path[:] = json.loads(sys.argv[1]); from cir._zygote import main; main()"


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start, was closed): not a snippet's fault."""


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one snippet.

    status: "ok" | "error" | "timeout" | "memory" | "output_limit" | "killed", decided in
        that order of precedence: "timeout" (the snippet ran past its wall-clock or CPU
        limit), "memory" (MemoryError, or died by a signal after using nearly all its memory),
        "output_limit" (output cut at max_output_bytes, marked in the text), "killed" (died
        by a signal not caused by the limits above), "error" (non-zero exit, e.g. an uncaught
        exception: exit 1 with a traceback on stderr), "ok".
    exit_code: as a shell reports it: 0, 1, ..., or -signal.
    wall_ms, cpu_ms: wall-clock time from the start of the snippet, CPU time (user + system,
        including children it waited for).
    """

    status: str
    stdout: str
    stderr: str
    exit_code: int
    wall_ms: float
    cpu_ms: float

    @property
    def error_line(self) -> str:
        """The last non-empty line of stderr (the exception line of a traceback), or ""."""
        return last_line(self.stderr)

    def feedback(self) -> str:
        """What the model is shown: stdout when the snippet succeeded; otherwise stdout (if
        any) followed by the error line, or by a notice for a timeout/memory/signal."""
        if self.status == "ok":
            return self.stdout
        if self.status == "error":
            notice = self.error_line or f"Process exited with status {self.exit_code}"
        elif self.status == "timeout":
            notice = "TimeoutError: the code ran past its time limit"
        elif self.status == "memory":
            notice = self.error_line if _is_memory_error(self.error_line) else "MemoryError: the code ran out of memory"
        elif self.status == "output_limit":
            notice = self.error_line if self.exit_code not in (0, -signal.SIGKILL) else ""
            if not self.stdout:
                return self.stderr
        else:  # killed
            notice = f"Process killed by {_signal_name(-self.exit_code)}"
        if not self.stdout:
            return notice
        if not notice:
            return self.stdout
        return self.stdout + ("" if self.stdout.endswith("\n") else "\n") + notice


def last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.rstrip()
    return ""


_MEMORY_ERROR = re.compile(r"^(?:[\w.]+\.)?_?\w*MemoryError(?::|$)")


def _is_memory_error(line: str) -> bool:
    return bool(_MEMORY_ERROR.match(line))


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def classify(
    *, exit_code: int, stderr: str, timed_out: bool, truncated: bool, maxrss_kb: int = 0, memory_mb: float | None = None
) -> str:
    """The status of a finished snippet (see :class:`ExecResult`). Shared by the sandbox and
    :func:`run_fresh`, so both are judged by the same rule."""
    if timed_out or exit_code == -signal.SIGXCPU:
        return "timeout"
    if exit_code == 1 and _is_memory_error(last_line(stderr)):
        return "memory"
    if (
        exit_code in (-signal.SIGSEGV, -signal.SIGABRT, -signal.SIGBUS, -signal.SIGKILL)
        and memory_mb
        and maxrss_kb >= 0.9 * memory_mb * 1024
    ):
        return "memory"
    if truncated:
        return "output_limit"
    if exit_code < 0:
        return "killed"
    if exit_code != 0:
        return "error"
    return "ok"


def truncation_marker(limit: int) -> str:
    return f"\n[... output truncated at {limit} bytes]"


def child_environment(workdir: str) -> dict[str, str]:
    """The whole environment of a snippet (nothing is inherited from the trainer)."""
    path = os.pathsep.join(dict.fromkeys([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]))
    return {
        "PATH": path,
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        # The zygote must stay single-threaded to fork safely; BLAS pools would break that.
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


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
    network: bool = False,
    max_file_bytes: int = 16 * MiB,
    native_fork: bool = True,
    huge_pages: bool = True,
    fill_free_blocks: bool = True,
) -> dict:
    """How the supervisor starts the zygote: executable, argv, environment and the zygote's
    configuration (JSON). Used by `Sandbox` and by the native supervisor test's driver."""
    config = {
        "preload": list(preload),
        "warmup": bool(warmup),
        "network": bool(network),
        "sys_path": list(sys.path),
        "child_env": child_environment("/"),
        "tmp_bytes": max(64 * MiB, workers * 4 * int(max_file_bytes)),
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
    }


class Sandbox:
    """A pool of isolated, warm Python executors. Thread-safe; a context manager.

    Args:
        workers: snippets running at the same time (default: CPU count).
        timeout_s: wall-clock limit per snippet, counted from the moment it starts (time in
            the queue does not count).
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
        namespaces: use pid/net/mount/ipc namespaces where the kernel allows them.
        startup_timeout_s: how long to wait for the warm interpreter to become ready.
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
        isolation: what is isolated on this machine, one mechanism per line.
        isolation_facts: the same as data (namespaces, uid range, mounts, seccomp, ...).

    Sessions: ``run(code, session="traj-17")`` first replays the earlier *successful* cells
    of that session in the same fresh process, with their output discarded, then runs
    `code`; only its output is reported. The time limit applies to `code` alone (the replay
    gets twice the time the cells took originally, plus the limit). A cell that fails on
    replay (e.g. it depends on randomness) is skipped. ``close_session`` forgets it all.
    """

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
        startup_timeout_s: float = 300.0,
        native_fork: bool = True,
        huge_pages: bool = True,
        fill_free_blocks: bool = True,
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

        self._core = _sandbox.Supervisor(
            **launch_settings(
                workers=workers,
                preload=preload,
                warmup=warmup,
                network=network,
                max_file_bytes=max_file_bytes,
                native_fork=native_fork,
                huge_pages=huge_pages,
                fill_free_blocks=fill_free_blocks,
            ),
            workers=workers,
            max_output_bytes=self.max_output_bytes,
            use_namespaces=bool(namespaces),
            allow_user_namespace=True,
            net_namespace=not network,
            drop_uid=True,
            host_tmp_dir=tempfile.gettempdir(),
            startup_timeout_s=float(startup_timeout_s),
        )
        self._finalizer = weakref.finalize(self, self._core.close)
        try:
            self._core.wait_ready(float(startup_timeout_s))
        except RuntimeError as exc:
            self._core.close()
            raise SandboxError(f"the sandbox could not start: {exc}") from None
        self.isolation_facts: dict = json.loads(self._core.ready_json or "{}")
        self.isolation_facts["uid_range"] = (
            (self._core.uid_base, self._core.uid_base + self._core.uid_slots - 1)
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
        outcome = self._core.wait(self._core.submit(**job))
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
            submitted.append((i, self._core.submit(**self._job(code, timeout_s, session))))
        bar = _progress_bar(len(codes), progress)
        try:
            while submitted:
                i, rid = submitted.popleft()
                results[i] = self._finish(self._core.wait(rid), codes[i], sessions[i])
                bar.update(1)
                session = sessions[i]
                if session is not None and waiting.get(session):
                    j = waiting[session].popleft()
                    submitted.append((j, self._core.submit(**self._job(codes[j], timeout_s, session))))
        finally:
            bar.close()
            # Only left on error (e.g. KeyboardInterrupt): kill them and collect the outcomes,
            # so nothing stays behind in the core.
            for _, rid in submitted:
                self._core.cancel(rid)
            for _, rid in submitted:
                try:
                    self._core.wait(rid)
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
            rid = self._core.submit(**job, notify=True)
            bridge.futures[rid] = future
            count = bridge.pending_per_loop.get(loop, 0)
            if count == 0:
                loop.add_reader(self._core.notify_fd, self._drain_notified)
            bridge.pending_per_loop[loop] = count + 1
        try:
            outcome = await future
        except asyncio.CancelledError:
            self._core.cancel(rid)
            self._forget_future(rid, loop)
            raise
        return self._finish(outcome, code, session)

    def _drain_notified(self) -> None:
        bridge = self._bridge
        with bridge.lock:
            done = self._core.take_notified()
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
            if not loop.is_closed():
                try:
                    loop.remove_reader(self._core.notify_fd)
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
        """Counters: submitted, executed, timeouts, output_limits, retries (snippets re-run
        after the zygote died), lost (died twice), restarts (of the zygote), queued, inflight,
        occupied_slots (inflight + finished processes still being torn down), zygote_pid (host
        pid), ready, sessions."""
        s = dict(self._core.stats())
        with self._sessions_lock:
            s["sessions"] = len(self._sessions)
        return s

    def close(self) -> None:
        """Stops the zygote and every snippet; pending requests fail with SandboxError."""
        if self._closed:
            return
        self._closed = True
        self._core.close()
        # Pending arun() calls get their "sandbox closed" outcome (raised as SandboxError).
        self._drain_notified()
        with self._bridge.lock:
            for loop in list(self._bridge.pending_per_loop):
                if not loop.is_closed():
                    try:
                        loop.remove_reader(self._core.notify_fd)
                    except (RuntimeError, ValueError):
                        pass
            self._bridge.pending_per_loop.clear()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------
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

    def _finish(self, outcome: dict, code: str, session: str | None) -> ExecResult:
        if outcome["infra_error"]:
            raise SandboxError(outcome["infra_message"])
        if outcome["cancelled"]:
            raise asyncio.CancelledError()
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
        if stderr.startswith("cir-sandbox: snippet set-up failed"):
            log.warning("cir sandbox: %s", stderr.strip())
        status = classify(
            exit_code=exit_code,
            stderr=stderr,
            timed_out=o["timed_out"],
            truncated=o["truncated"],
            maxrss_kb=o["maxrss_kb"],
            memory_mb=self._limits.memory_mb + self.isolation_facts.get("vm_preloaded_extra_bytes", 0) / MiB,
        )
        return ExecResult(status, stdout, stderr, exit_code, float(o["wall_ms"]), float(o["cpu_ms"]))


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


# -- describing the isolation ----------------------------------------------------------------


def describe_isolation(facts: dict, *, network: bool = False) -> str:
    """One line per mechanism, as active on this machine."""
    ns = facts.get("namespaces", {})
    mounts = facts.get("mounts") or {}
    lines = []
    active = [name for name in ("pid", "net", "mount", "ipc", "user") if ns.get(name)]
    lines.append("namespaces: " + (", ".join(active) if active else "none"))
    if facts.get("drop_uid"):
        lo, hi = facts.get("uid_range") or (facts.get("uid_base"), None)
        lines.append(f"identity: one unprivileged uid/gid per worker slot ({lo}..{hi}), no capabilities, no_new_privs")
    else:
        lines.append("identity: snippets run as the trainer's uid (not root: no privilege to drop), no capabilities, no_new_privs")
    if ns.get("pid"):
        lines.append("processes: pid namespace (the zygote is its init); everything a snippet starts is killed when it ends")
    elif facts.get("drop_uid"):
        lines.append("processes: everything of the slot uid is killed when a snippet ends (subreaper zygote)")
    else:
        lines.append("processes: process group + orphan sweep of the subreaper zygote")
    if mounts.get("readonly_root") and mounts.get("private_tmp"):
        lines.append(
            "filesystem: all mounts read-only; private tmpfs /tmp (work dirs) and empty /dev/shm; "
            "writable only: the snippet's own work dir"
        )
    elif mounts.get("private_tmp"):
        lines.append("filesystem: private /tmp; other mounts keep their permissions")
    else:
        lines.append("filesystem: work dirs on the host /tmp; file permissions only")
    if mounts.get("private_proc"):
        lines.append("/proc: shows only the sandbox's processes")
    if network:
        lines.append("network: allowed (network=True)")
    elif ns.get("net"):
        lines.append("network: empty network namespace (loopback down, no interfaces)")
    elif facts.get("seccomp_blocks_inet"):
        lines.append("network: AF_INET/AF_INET6 sockets refused by seccomp")
    else:
        lines.append("network: NOT isolated")
    if facts.get("seccomp"):
        lines.append("seccomp: namespaces, mount, bpf, perf, io_uring, keyctl, module and x32 syscalls refused")
    lines.append("limits: RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_CORE=0, wall clock, output size")
    return "\n".join(lines)


def isolation_warnings(facts: dict, *, network: bool = False) -> list[str]:
    ns = facts.get("namespaces", {})
    mounts = facts.get("mounts") or {}
    out = []
    if not facts.get("drop_uid"):
        out.append("snippets run under the trainer's own uid (no root to drop from)")
    if not network and not ns.get("net") and not facts.get("seccomp_blocks_inet"):
        out.append("network is NOT isolated (no network namespace, no seccomp)")
    if not ns.get("pid") and not facts.get("drop_uid") and not facts.get("orphan_sweep"):
        out.append("detached descendants of snippets may survive them (no pid namespace, uid or orphan sweep)")
    if not mounts.get("readonly_root"):
        out.append("the filesystem is not read-only for snippets; only file permissions protect it")
    if facts.get("python_readable_by_snippets") is False:
        out.append(
            "the Python installation is not readable by the sandbox uid (a parent directory is "
            "private) and no mount namespace can re-expose it: snippets can only import preloaded modules"
        )
    for w in mounts.get("warnings", []):
        out.append(f"mount set-up: {w}")
    return out


# -- ground truth -------------------------------------------------------------------------------


def run_fresh(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 2048,
    max_output_bytes: int = 64 * 1024,
    cpu_time_s: float | None = None,
    max_file_bytes: int = 16 * MiB,
    max_open_files: int = 256,
    python: str = sys.executable,
) -> ExecResult:
    """Runs `code` with ``python -c`` in a fresh interpreter under the same limits as the
    sandbox (RLIMIT_AS, CPU, FSIZE, NOFILE; wall clock; stdin a pipe nobody writes to; the
    snippet environment; an empty temporary cwd) and classifies it with the same rule.

    It is the reference the sandbox is compared against. It is NOT isolated: it runs as the
    calling user. Use it only for trusted code (tests, benchmarks).
    """
    cpu = cpu_time_s if cpu_time_s is not None else timeout_s + 1.0

    def limit_child() -> None:
        os.setsid()
        as_bytes = memory_mb * MiB
        resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(cpu), math.ceil(cpu) + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    with tempfile.TemporaryDirectory(prefix="cir-fresh-") as workdir:
        stdin_r, stdin_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [python, "-c", code],
                stdin=stdin_r,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=child_environment(workdir),
                preexec_fn=limit_child,
            )
        finally:
            os.close(stdin_r)
        chunks: dict[str, list[bytes]] = {"out": [], "err": []}

        def pump(stream, key: str) -> None:
            for block in iter(lambda: stream.read1(65536), b""):
                chunks[key].append(block)

        readers = [
            threading.Thread(target=pump, args=(proc.stdout, "out"), daemon=True),
            threading.Thread(target=pump, args=(proc.stderr, "err"), daemon=True),
        ]
        for t in readers:
            t.start()
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        start = time.monotonic()
        timer = threading.Timer(timeout_s, on_timeout)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall_ms = (time.monotonic() - start) * 1000
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it left behind
        except (ProcessLookupError, PermissionError):
            pass
        for t in readers:
            t.join(timeout=5)
        os.close(stdin_w)
        proc.stdout.close()
        proc.stderr.close()
    out, err = b"".join(chunks["out"]), b"".join(chunks["err"])
    truncated_stream = 0
    if len(out) + len(err) > max_output_bytes:
        # The sandbox reads both pipes as they fill; stdout usually overflows first.
        if len(out) > max_output_bytes:
            out, err, truncated_stream = out[:max_output_bytes], b"", 1
        else:
            err, truncated_stream = err[: max_output_bytes - len(out)], 2
    stdout = out.decode("utf-8", "replace")
    stderr = err.decode("utf-8", "replace")
    if truncated_stream == 1:
        stdout += truncation_marker(max_output_bytes)
    elif truncated_stream == 2:
        stderr += truncation_marker(max_output_bytes)
    # Output past the limit: the sandbox kills the snippet, so the reference says the same.
    exit_code = -signal.SIGKILL if truncated_stream else proc.returncode
    status_name = classify(
        exit_code=exit_code,
        stderr=stderr,
        timed_out=timed_out.is_set(),
        truncated=bool(truncated_stream),
        maxrss_kb=usage.ru_maxrss,
        memory_mb=memory_mb,
    )
    cpu_ms = (usage.ru_utime + usage.ru_stime) * 1000
    return ExecResult(status_name, stdout, stderr, exit_code, wall_ms, cpu_ms)
