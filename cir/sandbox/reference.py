"""The reference a sandbox result is compared against: the snippet alone in a fresh ``python -c``.

The sandbox promises that a snippet's status, exit code and output are what ``python -c CODE``
gives when run alone under the same limits. `run_fresh` produces exactly that: one new
interpreter per snippet, started the way the sandbox starts one (an empty temporary working
directory, the snippet environment of `child_environment`, standard input a pipe that nothing
is written to and that stays open, so ``input()`` waits like a user who never types), under the
same limits (RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE, no core files, the wall clock,
and the output cap, past which it is killed as the sandbox kills it), judged by the same
`classify`. Everything it started is killed when it ends or runs out of time (it gets its own
process group).

It is NOT isolated: it runs as the calling user, with the caller's files and network. Use it
only for trusted code (tests, benchmarks).

`run_fresh_batch` runs many snippets, at most `parallel` at a time; `run_fresh` is a batch of
one. The fidelity tests compare the sandbox with it directly; ``cir bench sandbox`` computes
its cached ground truth with it (`cir.bench.sandbox_truth`).

``grace_s`` (default 0) adds wall-clock (and CPU) time for the interpreter's own start-up and
imports, which a warm executor has already paid for: ``import sympy`` alone takes half a second
on a quiet machine and two on a loaded one. A snippet that finishes after ``timeout_s`` but
within the grace is then not a timeout; its ``wall_ms`` shows how close it came.
"""

from __future__ import annotations

import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cir.sandbox.config import MiB
from cir.sandbox.isolation import child_environment
from cir.sandbox.results import ExecResult, classify, truncation_marker

_READ_CHUNK = 65536
# Longest wait for a live process's exit or output between two looks at the clocks.
_TICK_S = 0.02
# A descendant that left the process group (setsid) may keep the pipes open after the snippet
# has exited and its group was killed: stop reading them this long after the exit.
_DRAIN_AFTER_EXIT_S = 1.0


@dataclass(frozen=True)
class _Limits:
    timeout_s: float
    memory_mb: int
    max_output_bytes: int
    cpu_time_s: float | None
    max_file_bytes: int
    max_open_files: int
    grace_s: float

    def __post_init__(self) -> None:
        for name in ("timeout_s", "memory_mb", "max_output_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s!r}")

    @property
    def wall_s(self) -> float:
        return self.timeout_s + self.grace_s

    def set_in_child(self) -> None:
        """The rlimits (runs in the child between fork and exec)."""
        cpu = math.ceil(self.cpu_time_s if self.cpu_time_s is not None else self.wall_s + 1.0)
        as_bytes = self.memory_mb * MiB
        resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_file_bytes, self.max_file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_open_files, self.max_open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@dataclass
class _Run:
    """One snippet's interpreter, from start to reaped."""

    proc: subprocess.Popen
    workdir: str
    started: float
    deadline: float
    captured: dict[int, bytearray] = field(default_factory=lambda: {1: bytearray(), 2: bytearray()})
    open_streams: int = 2
    truncated_stream: int = 0  # 1 (stdout) or 2 (stderr): the stream that went past the cap
    timed_out: bool = False
    exited_at: float | None = None
    wait_status: int = 0
    usage: resource.struct_rusage | None = None

    @property
    def finished(self) -> bool:
        if self.exited_at is None:
            return False
        return self.open_streams == 0 or time.monotonic() - self.exited_at > _DRAIN_AFTER_EXIT_S


def run_fresh(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 2048,
    max_output_bytes: int = 64 * 1024,
    cpu_time_s: float | None = None,
    max_file_bytes: int = 16 * MiB,
    max_open_files: int = 256,
    grace_s: float = 0.0,
    python: str = sys.executable,
) -> ExecResult:
    """Runs `code` with ``python -c`` in a fresh interpreter under the sandbox's limits and
    classifies it by the sandbox's rule (see the module docstring). The arguments mean what
    they mean for `Sandbox`; `cpu_time_s` defaults to the wall-clock limit + 1 s."""
    return run_fresh_batch(
        [code],
        parallel=1,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        max_output_bytes=max_output_bytes,
        cpu_time_s=cpu_time_s,
        max_file_bytes=max_file_bytes,
        max_open_files=max_open_files,
        grace_s=grace_s,
        python=python,
    )[0]


def run_fresh_batch(
    codes: Sequence[str],
    *,
    parallel: int = 2,
    on_done: Callable[[int], None] | None = None,
    timeout_s: float = 5.0,
    memory_mb: int = 2048,
    max_output_bytes: int = 64 * 1024,
    cpu_time_s: float | None = None,
    max_file_bytes: int = 16 * MiB,
    max_open_files: int = 256,
    grace_s: float = 0.0,
    python: str = sys.executable,
) -> list[ExecResult]:
    """`run_fresh` for each of `codes`, at most `parallel` interpreters at a time; results
    in the order of `codes`. ``on_done(k)`` is called with the number finished so far after
    each one.

    One thread does it all: a selector drains every pipe (a large print never blocks a child)
    and the loop watches the clocks. The children get their rlimits from a ``preexec_fn``,
    which is safe as long as no other thread of the caller holds a lock when it forks.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    limits = _Limits(
        float(timeout_s),
        int(memory_mb),
        int(max_output_bytes),
        cpu_time_s,
        int(max_file_bytes),
        int(max_open_files),
        float(grace_s),
    )
    results: list[ExecResult | None] = [None] * len(codes)
    pending = deque(enumerate(codes))
    running: dict[int, _Run] = {}
    selector = selectors.DefaultSelector()
    done = 0
    try:
        while pending or running:
            while pending and len(running) < parallel:
                i, code = pending.popleft()
                run = _start(code, limits, python)
                running[i] = run
                selector.register(run.proc.stdout, selectors.EVENT_READ, (i, 1))
                selector.register(run.proc.stderr, selectors.EVENT_READ, (i, 2))
            for key, _ in selector.select(timeout=_TICK_S):
                i, stream = key.data
                _read(running[i], key.fileobj, stream, selector, limits.max_output_bytes)
            for i, run in list(running.items()):
                _watch(run)
                if run.finished:
                    _end(run, selector)
                    results[i] = _result(run, limits)
                    del running[i]
                    done += 1
                    if on_done is not None:
                        on_done(done)
    finally:
        for run in running.values():  # only on an exception: leave nothing behind
            _kill_group(run)
            if run.exited_at is None:
                run.proc.wait()
            _end(run, selector)
        selector.close()
    return results  # type: ignore[return-value]


def _start(code: str, limits: _Limits, python: str) -> _Run:
    workdir = tempfile.mkdtemp(prefix="cir-fresh-")
    try:
        proc = subprocess.Popen(
            [python, "-c", code],
            stdin=subprocess.PIPE,  # never written to, kept open until the end: a read blocks
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=child_environment(workdir),
            preexec_fn=limits.set_in_child,
            start_new_session=True,  # its own process group: everything it starts can be killed
        )
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    for stream in (proc.stdout, proc.stderr):
        os.set_blocking(stream.fileno(), False)
    now = time.monotonic()
    return _Run(proc, workdir, started=now, deadline=now + limits.wall_s)


def _read(run: _Run, stream, which: int, selector: selectors.BaseSelector, cap: int) -> None:
    """Takes what one pipe holds. The first byte past the cap (stdout + stderr together) ends
    the snippet, as in the sandbox; whatever comes after is read and dropped."""
    try:
        chunk = os.read(stream.fileno(), _READ_CHUNK)
    except BlockingIOError:
        return
    if not chunk:
        selector.unregister(stream)
        stream.close()
        run.open_streams -= 1
        return
    if run.truncated_stream:
        return
    room = cap - len(run.captured[1]) - len(run.captured[2])
    run.captured[which] += chunk[:room]
    if len(chunk) > room:
        run.truncated_stream = which
        _kill_group(run)


def _watch(run: _Run) -> None:
    """Reaps the snippet once it has exited, after killing what it left in its group; kills
    the group at the deadline."""
    if run.exited_at is not None:
        return
    # Look without reaping first: while the exited leader is a zombie its group id cannot be
    # taken by anyone else, so killing the group cannot hit a stranger.
    if os.waitid(os.P_PID, run.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
        _kill_group(run)
        _, run.wait_status, run.usage = os.wait4(run.proc.pid, 0)
        run.exited_at = time.monotonic()
        run.proc.returncode = os.waitstatus_to_exitcode(run.wait_status)  # so Popen never waits for it
    elif not run.timed_out and time.monotonic() >= run.deadline:
        run.timed_out = True
        _kill_group(run)


def _kill_group(run: _Run) -> None:
    try:
        os.killpg(run.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _end(run: _Run, selector: selectors.BaseSelector) -> None:
    for stream in (run.proc.stdout, run.proc.stderr):
        if not stream.closed:
            selector.unregister(stream)
            stream.close()
    run.open_streams = 0
    run.proc.stdin.close()
    shutil.rmtree(run.workdir, ignore_errors=True)


def _result(run: _Run, limits: _Limits) -> ExecResult:
    stdout = bytes(run.captured[1]).decode("utf-8", "replace")
    stderr = bytes(run.captured[2]).decode("utf-8", "replace")
    if run.truncated_stream == 1:
        stdout += truncation_marker(limits.max_output_bytes)
    elif run.truncated_stream == 2:
        stderr += truncation_marker(limits.max_output_bytes)
    # Output past the cap: the sandbox kills the snippet, so the reference reports that kill.
    exit_code = -signal.SIGKILL if run.truncated_stream else os.waitstatus_to_exitcode(run.wait_status)
    status = classify(
        exit_code=exit_code,
        stderr=stderr,
        timed_out=run.timed_out,
        truncated=bool(run.truncated_stream),
        maxrss_kb=run.usage.ru_maxrss,
        memory_mb=limits.memory_mb,
    )
    wall_ms = (run.exited_at - run.started) * 1000.0
    cpu_ms = (run.usage.ru_utime + run.usage.ru_stime) * 1000.0
    return ExecResult(status, stdout, stderr, exit_code, wall_ms, cpu_ms)
