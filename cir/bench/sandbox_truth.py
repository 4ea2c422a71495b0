"""Ground truth for ``cir bench sandbox``: each snippet alone in a fresh ``python -c``.

The sandbox promises that a snippet's status and stdout are what ``python -c <snippet>`` gives
when run alone under the same limits. This module produces exactly that reference: one fresh
interpreter per snippet (``sys.executable -c code``), an empty temporary working directory, a
clean environment, ``RLIMIT_AS`` set to the memory limit, and the same wall-clock timeout plus
a start-up grace (the whole process group is killed when it runs out). At most ``parallel``
interpreters run at once.

Status mapping: exit 0 -> ``ok``; timeout -> ``timeout``; more stdout than the cap ->
``output_limit``; killed by a signal -> ``killed``; a traceback whose last line names a
``MemoryError`` (or a subclass such as numpy's ``_ArrayMemoryError``) -> ``memory``; any other
non-zero exit -> ``error``.

Standard input is a pipe that nothing is written to and that stays open while the snippet runs,
as in the sandbox: ``input()`` blocks until the timeout, just as ``python -c`` started from a
terminal waits for a user who never types.

The grace (``grace_s``, default 3 s) exists because a fresh interpreter's clock includes its own
start-up and the imports (``import sympy`` alone takes about half a second on a quiet machine, and
two seconds on a loaded one) that a warm executor has already paid for; without it a shared
machine turns slow start-ups into false reference timeouts. A snippet is therefore a reference
timeout when it runs past ``timeout_s + grace_s``; one that finished after more than
``timeout_s`` is flagged by the benchmark as near the limit (its status is then ambiguous). The
benchmark corpus has no such snippet: its snippets need milliseconds or never end.

Results are cached in one JSON file per (Python version, sympy/numpy versions, limits), one
entry per snippet keyed by the SHA-256 of its code, so later runs and subsets (``--quick``)
reuse what an earlier run computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "killed")
# Keep this much of stderr's tail: enough for the traceback's last line.
_STDERR_TAIL_BYTES = 16384
_READ_CHUNK = 65536
CACHE_FORMAT = 2  # 2: stdin is an open, silent pipe (was /dev/null)


@dataclass(frozen=True)
class Limits:
    """The limits one benchmark run applies to every system (sandbox, baseline, ground truth)."""

    timeout_s: float = 2.0
    memory_mb: int = 2048
    max_output_bytes: int = 65536

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb must be >= 64, got {self.memory_mb}")
        if self.max_output_bytes < 1:
            raise ValueError(f"max_output_bytes must be >= 1, got {self.max_output_bytes}")


@dataclass
class Outcome:
    """What one system reported for one snippet, in the sandbox's status vocabulary.

    ``stdout`` holds at most ``max_output_bytes`` of output (decoded as UTF-8, undecodable bytes
    replaced); ``error_line`` is the last non-empty line of stderr (the traceback's last line).
    """

    status: str
    stdout: str
    error_line: str = ""
    exit_code: int | None = None
    wall_ms: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict) -> Outcome:
        return cls(**{k: row[k] for k in ("status", "stdout", "error_line", "exit_code", "wall_ms")})


def last_line(text: str) -> str:
    """The last non-empty line of ``text`` (stripped), or ''."""
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return ""


def names_memory_error(error_line: str) -> bool:
    """True when a traceback's last line is a MemoryError or a subclass named ``...MemoryError``."""
    head = error_line.split(":", 1)[0].strip()
    return head.rsplit(".", 1)[-1].endswith("MemoryError")


def classify_exit(
    returncode: int | None, timed_out: bool, stdout_bytes: int, error_line: str, limits: Limits
) -> str:
    """Status of a finished fresh interpreter (see the module docstring for the order)."""
    if timed_out:
        return "timeout"
    if stdout_bytes > limits.max_output_bytes:
        return "output_limit"
    if returncode == 0:
        return "ok"
    if returncode is not None and returncode < 0:
        return "killed"
    if names_memory_error(error_line):
        return "memory"
    return "error"


def clean_env() -> dict[str, str]:
    """The environment of a reference interpreter: nothing inherited from this process."""
    return {"PATH": os.defpath, "LANG": "C.UTF-8"}


def _limit_address_space(memory_mb: int) -> Callable[[], None]:
    limit = memory_mb * 1024 * 1024

    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


@dataclass
class _Job:
    index: int
    proc: subprocess.Popen
    workdir: str
    started: float
    deadline: float
    stdout: bytearray
    stdout_total: int
    stderr: bytearray
    open_fds: int
    timed_out: bool = False

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()


DEFAULT_GRACE_S = 3.0


def run_fresh(
    codes: Sequence[str],
    limits: Limits,
    parallel: int = 2,
    on_done: Callable[[int], None] | None = None,
    python: str = sys.executable,
    grace_s: float = DEFAULT_GRACE_S,
) -> list[Outcome]:
    """Run each code string in its own fresh ``python -c``, at most ``parallel`` at a time.

    Each gets ``limits.timeout_s + grace_s`` seconds of wall clock (see the module docstring).

    Single-threaded on purpose: the children are started with a ``preexec_fn`` (for the
    rlimit), which is only safe when no other thread of this process can hold a lock at fork
    time, and one ``selectors`` loop drains every pipe so a large print never blocks a child.
    ``on_done(k)`` is called with the number of finished snippets after each one.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    results: list[Outcome | None] = [None] * len(codes)
    pending = list(range(len(codes)))
    pending.reverse()  # pop() from the end keeps the original order
    running: dict[int, _Job] = {}
    sel = selectors.DefaultSelector()
    done = 0
    preexec = _limit_address_space(limits.memory_mb)
    try:
        while pending or running:
            while pending and len(running) < parallel:
                i = pending.pop()
                job = _start(i, codes[i], limits.timeout_s + grace_s, preexec, python)
                running[i] = job
                sel.register(job.proc.stdout, selectors.EVENT_READ, (i, "out"))
                sel.register(job.proc.stderr, selectors.EVENT_READ, (i, "err"))
            now = time.monotonic()
            live = [j.deadline for j in running.values() if not j.timed_out]
            wait = min(max(0.0, min(live) - now), 0.05) if live else 0.05
            for key, _ in sel.select(timeout=wait):
                i, which = key.data
                job = running[i]
                chunk = os.read(key.fd, _READ_CHUNK)
                if not chunk:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                    job.open_fds -= 1
                elif which == "out":
                    job.stdout_total += len(chunk)
                    room = limits.max_output_bytes + 1 - len(job.stdout)
                    if room > 0:
                        job.stdout += chunk[:room]
                else:
                    job.stderr += chunk
                    if len(job.stderr) > 2 * _STDERR_TAIL_BYTES:
                        del job.stderr[:-_STDERR_TAIL_BYTES]
            now = time.monotonic()
            for i, job in list(running.items()):
                if not job.timed_out and now >= job.deadline and job.proc.poll() is None:
                    job.timed_out = True
                    _kill_group(job.proc)
                if job.open_fds == 0 and job.proc.poll() is not None:
                    results[i] = _finish(job, limits)
                    del running[i]
                    done += 1
                    if on_done is not None:
                        on_done(done)
                elif job.timed_out and job.proc.poll() is not None and now > job.deadline + 1.0:
                    # A grandchild kept the pipes open past the kill; stop reading them.
                    for f in (job.proc.stdout, job.proc.stderr):
                        if f is not None and not f.closed:
                            sel.unregister(f)
                            f.close()
                    job.open_fds = 0
    finally:
        for job in running.values():  # only on an exception: leave nothing behind
            _kill_group(job.proc)
            job.close_stdin()
            job.proc.wait()
            shutil.rmtree(job.workdir, ignore_errors=True)
        sel.close()
    return [r for r in results if r is not None]


def _start(i: int, code: str, wall_s: float, preexec: Callable[[], None], python: str) -> _Job:
    workdir = tempfile.mkdtemp(prefix="cir-truth-")
    proc = subprocess.Popen(
        [python, "-c", code],
        stdin=subprocess.PIPE,  # never written, kept open until the end: a read blocks
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=workdir,
        env=clean_env(),
        preexec_fn=preexec,
        start_new_session=True,  # own process group: a timeout kills everything it started
    )
    for f in (proc.stdout, proc.stderr):
        os.set_blocking(f.fileno(), False)
    now = time.monotonic()
    return _Job(i, proc, workdir, now, now + wall_s, bytearray(), 0, bytearray(), 2)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _finish(job: _Job, limits: Limits) -> Outcome:
    rc = job.proc.wait()
    job.close_stdin()
    wall_ms = (time.monotonic() - job.started) * 1000.0
    shutil.rmtree(job.workdir, ignore_errors=True)
    error_line = last_line(job.stderr.decode("utf-8", errors="replace"))
    status = classify_exit(rc, job.timed_out, job.stdout_total, error_line, limits)
    stdout = bytes(job.stdout[: limits.max_output_bytes]).decode("utf-8", errors="replace")
    return Outcome(status, stdout, error_line, rc, wall_ms)


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cir"


def environment_key(limits: Limits, grace_s: float) -> str:
    """What, besides the code, decides a snippet's reference result."""

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"

    ident = {
        "format": CACHE_FORMAT,
        "python": sys.version,
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "sympy": version("sympy"),
        "numpy": version("numpy"),
        "limits": asdict(limits),
        "grace_s": grace_s,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def code_key(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


def ground_truth(
    codes: Sequence[str],
    limits: Limits,
    cache_dir: Path | None = None,
    refresh: bool = False,
    parallel: int = 2,
    on_progress: Callable[[int, int], None] | None = None,
    grace_s: float = DEFAULT_GRACE_S,
) -> tuple[list[Outcome], dict]:
    """Reference outcomes for ``codes`` (cached); returns ``(outcomes, info)``.

    ``info`` says where the cache lives, how many snippets were computed now and how long
    that took. ``refresh=True`` recomputes every snippet asked for.
    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    path = cache_dir / f"sandbox_truth-{environment_key(limits, grace_s)}.json"
    entries: dict[str, dict] = {}
    if path.exists() and not refresh:
        try:
            entries = json.loads(path.read_text())["entries"]
        except (OSError, ValueError, KeyError, TypeError):
            entries = {}  # unreadable cache: recompute, then overwrite it
    keys = [code_key(c) for c in codes]
    missing: list[int] = []  # first index of each snippet not in the cache
    seen: set[str] = set()
    for i, k in enumerate(keys):
        if k not in entries and k not in seen:
            seen.add(k)
            missing.append(i)
    t0 = time.perf_counter()
    if missing:
        report = (lambda k: on_progress(k, len(missing))) if on_progress else None
        fresh = run_fresh([codes[i] for i in missing], limits, parallel, report, grace_s=grace_s)
        for i, out in zip(missing, fresh):
            entries[keys[i]] = out.to_json()
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(
            {"format": CACHE_FORMAT, "limits": asdict(limits), "grace_s": grace_s, "entries": entries}
        ))
        tmp.replace(path)
    info = {
        "cache_file": str(path),
        "computed": len(missing),
        "from_cache": len(codes) - len(missing),
        "compute_s": round(time.perf_counter() - t0, 3),
        "grace_s": grace_s,
    }
    return [Outcome.from_json(entries[k]) for k in keys], info
