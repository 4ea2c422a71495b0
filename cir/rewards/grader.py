"""Grading: is an extracted answer mathematically equal to the reference?

`grade`, `grade_batch` and `grade_outcomes` compare with `math-verify` (symbolic equivalence),
after two cheap paths decided here: an exact match of the normal forms (`normalize_answer`), and
two plain numbers compared exactly (`plain_number`). math-verify receives each answer's
`grading_form` (the degree sign, LaTeX spacing, scientific notation and units rewritten so it reads
the value stated).

math-verify bounds its own work with ``signal.alarm``, which works only on a process's main thread
and cannot interrupt a long C-level computation (``9^{9^{9}}`` as a Python integer). cir therefore
turns those alarms off and grades in a small persistent pool of worker processes (`GraderPool`):
each request has a deadline, and a worker that misses it or dies is killed and replaced and the
request tried again (`max_retries` times, after a growing pause). A request that fails every try
is a grader fault, not a verdict: its `GradeOutcome` has ``fault="grader_timeout"`` or
``"grader_crash"`` (and ``correct=False``, which means nothing then); rewards leave it out rather
than score it wrong. `grader_counters()` counts retries, faults and replaced workers for the whole
process (subtract two snapshots for one step's share). The pool is created on first use and shared;
any thread (or an asyncio loop, through ``asyncio.wrap_future(pool.submit(...))``) may grade.

math-verify is imported only inside the workers, so importing this module is cheap.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import heapq
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

from cir.rewards.answers import (
    _BOX_COMMAND,
    extract_boxed,
    grading_form,
    normalize_answer,
    normalize_reference,
    plain_number,
)

# GradeOutcome.reason of a request the grader could not decide (every try failed) -> its fault.
FAULT_OF_REASON = {"grader_timeout": "grader_timeout", "grader_crashed": "grader_crash"}


@dataclass(frozen=True)
class GradeOutcome:
    """The verdict on one (prediction, reference) pair and why.

    reason: "exact_match" (fast path), "equivalent" / "not_equivalent" (math-verify, or two plain
    numbers compared exactly: detail "plain numbers"), "no_answer" (empty prediction),
    "grader_error" (math-verify raised on this answer: graded wrong), and the grader's faults,
    "grader_timeout" (no verdict within the deadline on any try) and "grader_crashed" (the worker
    died on every try, e.g. out of memory).
    """

    correct: bool
    reason: str
    detail: str = ""

    @property
    def fault(self) -> str | None:
        """ "grader_timeout" / "grader_crash" when the grader could not decide (`correct` then
        means nothing), None for a verdict."""
        return FAULT_OF_REASON.get(self.reason)


@dataclass(frozen=True)
class GraderCounters:
    """What the grading workers went through: counts since the process (or pool) started.

    retries: requests sent again after a timeout or a crash.
    timeouts / crashes: requests given up after every try (the grader faults).
    restarts: workers killed and replaced (after a timeout or a crash).
    """

    retries: int = 0
    timeouts: int = 0
    crashes: int = 0
    restarts: int = 0

    def __sub__(self, other: GraderCounters) -> GraderCounters:
        return GraderCounters(*(a - b for a, b in zip(astuple(self), astuple(other))))

    @property
    def faults(self) -> int:
        return self.timeouts + self.crashes

    def as_metrics(self, prefix: str = "grader/") -> dict[str, float]:
        """Flat metric names (``grader/retries``, ``grader/faults``, ...)."""
        return {
            f"{prefix}retries": float(self.retries),
            f"{prefix}faults": float(self.faults),
            f"{prefix}timeouts": float(self.timeouts),
            f"{prefix}crashes": float(self.crashes),
            f"{prefix}restarts": float(self.restarts),
        }


# Every pool's counts together (`grader_counters`); pools add to them under the lock.
_process_counts = {"retries": 0, "timeouts": 0, "crashes": 0, "restarts": 0}
_process_counts_lock = threading.Lock()


def grader_counters() -> GraderCounters:
    """This process's grader counts since it started, all pools together. The trainer reads one
    before and one after a step's grading: the difference (``after - before``) is the step's."""
    with _process_counts_lock:
        return GraderCounters(**_process_counts)


class GraderUnavailable(RuntimeError):
    """The grading workers cannot start (e.g. math-verify is not installed)."""


def _worker_command() -> list[str]:
    # `-c` rather than `-m cir.rewards.grader`: the worker then imports this module as a module
    # (no second copy as __main__). The worker must run the same copy of cir as this process (a
    # source checkout next to an older installed wheel has other module paths), so it imports the
    # cir package from this file's directory first, then puts sys.path back: the rest of cir is
    # found through the package, and nothing else can be shadowed by that directory.
    package_root = str(Path(__file__).resolve().parents[2])  # <root>/cir/rewards/grader.py -> <root>
    code = (
        f"import sys; sys.path.insert(0, {package_root!r}); import cir; del sys.path[0]; "
        "from cir.rewards.grader import _grader_worker_main; _grader_worker_main()"
    )
    return [sys.executable, "-c", code]


def _grader_worker_main() -> None:
    """Entry point of a grading worker: JSON lines in on stdin, JSON lines out on the original
    stdout (fd 1 is pointed at stderr so that stray prints cannot corrupt the protocol)."""
    import logging
    import signal

    # Ctrl-C in a terminal reaches the whole process group, workers included; the trainer stops
    # at the end of its step and still needs them then. The pool ends a worker by closing its
    # stdin (or killing it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    limit_mb = int(os.environ.get("CIR_GRADER_MEMORY_MB", "0") or 0)
    if limit_mb > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    from latex2sympy2_extended.math_normalization import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # math-verify's defaults but its unit list: it drops a trailing letter as a unit ("x+2c" would
    # equal "x+2", "3+4t" equal 7). Units are dropped on cir's side instead (`grading_form`).
    extraction = [
        LatexExtractionConfig(
            normalization_config=NormalizationConfig(
                basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False
            )
        ),
        ExprExtractionConfig(),
    ]
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            gold = parse("\\boxed{" + request["ref"] + "}", extraction, parsing_timeout=None)
            pred = parse("\\boxed{" + request["pred"] + "}", extraction, parsing_timeout=None)
            if not gold or not pred:
                reply = {"correct": False, "reason": "not_equivalent", "detail": "unparsable"}
            else:
                ok = bool(verify(gold, pred, timeout_seconds=None))
                reply = {"correct": ok, "reason": "equivalent" if ok else "not_equivalent", "detail": ""}
        except BaseException as exc:  # MemoryError, RecursionError, sympy internals
            reply = {"correct": False, "reason": "grader_error", "detail": f"{type(exc).__name__}: {exc}"[:300]}
        reply["id"] = request["id"]
        out.write(json.dumps(reply) + "\n")


@dataclass
class _Task:
    id: int
    prediction: str
    reference: str
    timeout_s: float
    future: concurrent.futures.Future
    tries: int = 0  # failed tries so far (timeouts, crashes)


@dataclass
class _Worker:
    proc: subprocess.Popen
    state: str = "starting"  # starting -> idle <-> busy; dead once killed
    task: _Task | None = None
    deadline: float = 0.0
    buffer: bytes = b""


class GraderPool:
    """Persistent math-verify workers with a per-request deadline.

    `submit` may be called from any thread; one dispatcher thread sends requests to idle
    workers, collects replies and kills (then replaces) a worker whose request passes its
    deadline. The deadline counts from when a worker takes the request, so a long queue does
    not time requests out. Workers are plain ``python -c`` subprocesses (no multiprocessing
    start method, so the caller's ``__main__`` is never re-imported).

    num_workers: processes kept running (default: half the cores, 2..8).
    memory_limit_mb: address-space limit of each worker; a grader exceeding it fails with
        MemoryError and the answer counts as wrong. 0: no limit.
    startup_timeout_s: how long a new worker may take to import math-verify.
    max_retries: how many more times a request whose worker timed out or died is sent (to a
        fresh worker), each after a pause of `retry_backoff_s` doubled per try; after that the
        outcome is the fault ("grader_timeout" / "grader_crashed").
    """

    def __init__(
        self,
        num_workers: int | None = None,
        *,
        memory_limit_mb: int = 2048,
        startup_timeout_s: float = 120.0,
        max_retries: int = 2,
        retry_backoff_s: float = 0.1,
    ):
        if num_workers is None:
            num_workers = min(8, max(2, (os.cpu_count() or 2) // 2))
        if num_workers < 1:
            raise ValueError(f"GraderPool needs at least one worker, got num_workers={num_workers}")
        if max_retries < 0 or retry_backoff_s < 0:
            raise ValueError(
                f"GraderPool: max_retries={max_retries} and retry_backoff_s={retry_backoff_s} must be >= 0"
            )
        self.num_workers = num_workers
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = startup_timeout_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self._counts = {"retries": 0, "timeouts": 0, "crashes": 0, "restarts": 0}  # this pool's
        self._lock = threading.Lock()
        self._pending: deque[_Task] = deque()
        # Requests waiting out their pause before a retry: a heap of (due time, id, request).
        self._retrying: list[tuple[float, int, _Task]] = []
        self._next_id = 0
        self._closed = False
        self._broken: str | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._workers: list[_Worker] = []
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._startup_failures = 0

    # -- public API --------------------------------------------------------------------------

    def submit(self, prediction: str, reference: str, timeout_s: float = 5.0) -> concurrent.futures.Future:
        """Grade one pair; the future's result is a `GradeOutcome` (the cheap paths resolve it at
        once; math-verify receives both answers' `grading_form`)."""
        fast = _fast_outcome(prediction, reference)
        future: concurrent.futures.Future = concurrent.futures.Future()
        if fast is not None:
            future.set_result(fast)
            return future
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        task_args = (grading_form(prediction), grading_form(reference), timeout_s, future)
        with self._lock:
            if self._closed:
                raise RuntimeError("GraderPool is closed")
            if self._broken:
                raise GraderUnavailable(self._broken)
            self._next_id += 1
            self._pending.append(_Task(self._next_id, *task_args))
        self.start()
        self._wake()
        return future

    def start(self) -> None:
        """Start the workers now rather than on the first request (they take ~1-2 s to import
        math-verify); returns at once."""
        with self._lock:
            if self._closed:
                raise RuntimeError("GraderPool is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._dispatch_loop, name="cir-grader", daemon=True)
                self._thread.start()

    def grade_many(self, pairs: Iterable[tuple[str, str]], timeout_s: float = 5.0) -> list[GradeOutcome]:
        """Grade pairs in parallel; identical pairs are graded once."""
        pairs = [(p, r) for p, r in pairs]
        futures: dict[tuple[str, str], concurrent.futures.Future] = {}
        for pair in pairs:
            if pair not in futures:
                futures[pair] = self.submit(pair[0], pair[1], timeout_s)
        return [futures[pair].result() for pair in pairs]

    def close(self) -> None:
        """Stop the dispatcher and the workers; pending requests fail."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._wake()
        if thread is not None:
            thread.join(timeout=10)
        for w in self._workers:
            self._kill(w)
        with self._lock:
            pending = list(self._pending) + [t for _, _, t in self._retrying]
            self._pending.clear()
            self._retrying.clear()
        for t in pending:
            if not t.future.done():
                t.future.set_exception(RuntimeError("GraderPool closed"))
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> GraderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w.state != "dead"]

    @property
    def restarts(self) -> int:
        """Workers replaced after a timeout or a crash."""
        return self._counts["restarts"]

    def counters(self) -> GraderCounters:
        """This pool's counts since it started (`grader_counters` has the whole process's)."""
        with self._lock:
            return GraderCounters(**self._counts)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1
        with _process_counts_lock:
            _process_counts[name] += 1

    # -- dispatcher --------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already woken (pipe full) or closing

    def _spawn(self) -> _Worker:
        env = dict(os.environ)
        env["CIR_GRADER_MEMORY_MB"] = str(self.memory_limit_mb)
        proc = subprocess.Popen(
            _worker_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True
        )
        worker = _Worker(proc=proc, deadline=time.monotonic() + self.startup_timeout_s)
        os.set_blocking(proc.stdout.fileno(), False)
        self._selector.register(proc.stdout.fileno(), selectors.EVENT_READ, worker)
        self._workers.append(worker)
        return worker

    def _kill(self, worker: _Worker) -> None:
        if worker.state == "dead":
            return
        worker.state = "dead"
        try:
            self._selector.unregister(worker.proc.stdout.fileno())
        except (KeyError, ValueError):
            pass
        if worker.proc.poll() is None:
            worker.proc.kill()
        worker.proc.wait()
        for stream in (worker.proc.stdin, worker.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def _replace(self, worker: _Worker) -> None:
        self._kill(worker)
        self._workers.remove(worker)
        self._count("restarts")
        if not self._closed:
            self._spawn()

    def _finish(self, worker: _Worker, outcome: GradeOutcome) -> None:
        task, worker.task = worker.task, None
        if task is not None and not task.future.done():
            task.future.set_result(outcome)

    def _retire(self, worker: _Worker, outcome: GradeOutcome) -> None:
        """Replace a worker that timed out or died; its request goes back to the front of the
        queue (after a pause) while it has tries left, else it is answered as `outcome` (a fault).
        Another worker may take it: a machine's fault (a worker killed, a CPU starved) passes."""
        task, worker.task = worker.task, None
        self._replace(worker)
        if task is None or task.future.done():
            return
        if task.tries < self.max_retries and not self._closed:
            task.tries += 1
            due = time.monotonic() + self.retry_backoff_s * 2 ** (task.tries - 1)
            with self._lock:
                heapq.heappush(self._retrying, (due, task.id, task))
            self._count("retries")
            return
        self._count("timeouts" if outcome.reason == "grader_timeout" else "crashes")
        task.future.set_result(outcome)

    def _dispatch_loop(self) -> None:
        try:
            while len(self._workers) < self.num_workers:
                self._spawn()
            while not self._closed:
                self._assign()
                now = time.monotonic()
                deadlines = [w.deadline for w in self._workers if w.state in ("starting", "busy")]
                with self._lock:  # a retry waiting out its pause wakes the loop when it is due
                    if self._retrying:
                        deadlines.append(self._retrying[0][0])
                wait = max(0.0, min(deadlines) - now) if deadlines else None
                for key, _ in self._selector.select(wait):
                    if key.data is None:
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                    else:
                        self._read(key.data)
                self._expire(time.monotonic())
        except BaseException as exc:  # never leave callers waiting forever
            self._fail_all(f"grader dispatcher failed: {type(exc).__name__}: {exc}")
            raise

    def _assign(self) -> None:
        # Pair idle workers with pending requests under the lock, write outside it (a
        # future's callbacks may call submit, which takes the lock).
        pairs: list[tuple[_Worker, _Task]] = []
        now = time.monotonic()
        with self._lock:
            due = []
            while self._retrying and self._retrying[0][0] <= now:
                due.append(heapq.heappop(self._retrying)[2])
            self._pending.extendleft(reversed(due))  # a retry goes before new requests
            for w in self._workers:
                if not self._pending:
                    break
                if w.state != "idle":
                    continue
                task = self._pending.popleft()
                # A retry's future is running already (since its first try).
                if task.tries > 0 or task.future.set_running_or_notify_cancel():
                    w.task, w.state = task, "busy"
                    pairs.append((w, task))
        for w, task in pairs:
            line = json.dumps({"id": task.id, "pred": task.prediction, "ref": task.reference}) + "\n"
            w.deadline = time.monotonic() + task.timeout_s
            try:
                w.proc.stdin.write(line.encode())
                w.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self._retire(w, GradeOutcome(False, "grader_crashed", "worker exited"))

    def _read(self, worker: _Worker) -> None:
        if worker.state == "dead":
            return
        try:
            chunk = os.read(worker.proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        if not chunk:  # the worker exited
            if worker.state == "starting":
                self._startup_failed(worker, f"grading worker exited during start-up (exit code {worker.proc.poll()})")
            else:
                self._retire(worker, GradeOutcome(False, "grader_crashed", f"exit code {worker.proc.poll()}"))
            return
        worker.buffer += chunk
        while b"\n" in worker.buffer:
            line, worker.buffer = worker.buffer.split(b"\n", 1)
            msg = json.loads(line)
            if msg.get("ready"):
                worker.state = "idle"
                self._startup_failures = 0
            elif worker.task is not None and msg.get("id") == worker.task.id:
                self._finish(worker, GradeOutcome(bool(msg["correct"]), msg["reason"], msg.get("detail", "")))
                worker.state = "idle"

    def _expire(self, now: float) -> None:
        for w in list(self._workers):
            if w.state == "busy" and now >= w.deadline:
                self._retire(w, GradeOutcome(False, "grader_timeout", f"no verdict within {w.task.timeout_s:g} s"))
            elif w.state == "starting" and now >= w.deadline:
                self._startup_failed(w, f"grading worker did not start within {self.startup_timeout_s:g} s")

    def _startup_failed(self, worker: _Worker, message: str) -> None:
        self._startup_failures += 1
        if self._startup_failures >= 3:
            self._kill(worker)
            self._workers.remove(worker)
            self._fail_all(message + " (three times in a row; is math-verify installed in this Python?)")
        else:
            self._replace(worker)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            self._broken = message
            pending = list(self._pending) + [t for _, _, t in self._retrying]
            self._pending.clear()
            self._retrying.clear()
        for w in self._workers:
            if w.task is not None and not w.task.future.done():
                w.task.future.set_exception(GraderUnavailable(message))
        for t in pending:
            if not t.future.done():
                t.future.set_exception(GraderUnavailable(message))


def _fast_outcome(prediction: str | None, reference: str) -> GradeOutcome | None:
    """The verdict when it needs no math-verify: no answer, the same normal form, or two plain
    numbers (compared exactly; math-verify would round them to 6 decimal places)."""
    if prediction is None or not prediction.strip():
        return GradeOutcome(False, "no_answer")
    if normalize_answer(prediction) == normalize_answer(reference):
        return GradeOutcome(True, "exact_match")
    ours, theirs = plain_number(prediction), plain_number(reference)
    if ours is not None and theirs is not None:
        return GradeOutcome(ours == theirs, "equivalent" if ours == theirs else "not_equivalent", "plain numbers")
    return None


_default_pool: GraderPool | None = None
_default_pool_pid = -1
_default_pool_lock = threading.Lock()


def get_grader_pool() -> GraderPool:
    """The process-wide pool, created on first use (and again in a forked child)."""
    global _default_pool, _default_pool_pid
    with _default_pool_lock:
        if _default_pool is None or _default_pool_pid != os.getpid():
            _default_pool = GraderPool()
            _default_pool_pid = os.getpid()
        return _default_pool


def shutdown_grader_pool() -> None:
    """Stop the shared pool's workers (it is re-created on the next grading call)."""
    global _default_pool
    with _default_pool_lock:
        pool, _default_pool = _default_pool, None
    if pool is not None and _default_pool_pid == os.getpid():
        pool.close()


atexit.register(shutdown_grader_pool)


def grade_outcomes(
    pairs: Sequence[tuple[str | None, str]], timeout_s: float = 5.0, pool: GraderPool | None = None
) -> list[GradeOutcome]:
    """Grade (prediction, reference) pairs in parallel, with reasons.

    prediction: the extracted answer (None or empty: wrong, reason "no_answer"). A prediction
        that still holds a box is reduced to its last box's content.
    reference: a bare answer, a ``\\boxed{X}``, or a worked solution ending in a box.
    """
    prepared: list[tuple[str, str] | GradeOutcome] = []
    for prediction, reference in pairs:
        if prediction is not None and _BOX_COMMAND.search(prediction):
            prediction = extract_boxed(prediction)
        reference = normalize_reference(reference)
        fast = _fast_outcome(prediction, reference)
        prepared.append(fast if fast is not None else (prediction, reference))
    todo = [p for p in prepared if not isinstance(p, GradeOutcome)]
    graded = iter((pool or get_grader_pool()).grade_many(todo, timeout_s) if todo else [])
    return [p if isinstance(p, GradeOutcome) else next(graded) for p in prepared]


def grade_batch(pairs: Sequence[tuple[str | None, str]], timeout_s: float = 5.0) -> list[bool]:
    """Whether each prediction matches its reference (see `grade_outcomes`)."""
    return [o.correct for o in grade_outcomes(pairs, timeout_s)]


def grade(prediction: str | None, reference: str, timeout_s: float = 5.0) -> bool:
    """Whether `prediction` (an answer) is mathematically equivalent to `reference`."""
    return grade_outcomes([(prediction, reference)], timeout_s)[0].correct
