"""Rewards: extract the final boxed answer, grade it against the reference, shape the reward.

Three layers, each usable alone:

* **Extraction** (`extract_boxed`, `extract_all_boxed`): the content of ``\\boxed{...}`` /
  ``\\fbox{...}`` (nested braces handled, escaped braces ``\\{ \\}`` ignored) or of
  ``\\boxed 5`` (a single token after a space).
* **Grading** (`grade`, `grade_batch`, `grade_outcomes`): symbolic equivalence with
  `math-verify`, after a cheap exact-match fast path. math-verify bounds its own work with
  ``signal.alarm``, which works only on a process's main thread and cannot interrupt a long
  C-level computation (``9^{9^{9}}`` as a Python integer). cir therefore turns those alarms
  off and grades in a small persistent pool of worker processes (`GraderPool`): each request
  has a deadline, and a worker that misses it is killed and replaced, the answer counting as
  wrong with ``reason="grader_timeout"``. The pool is created on first use and shared; any
  thread (or an asyncio loop, through ``asyncio.wrap_future(pool.submit(...))``) may grade.
* **Rewards** registered by name (`register_reward`, `get_reward`, `compute_rewards`). The
  built-in ``"math"`` reward is the paper's +1 / -1 with optional format and overlong
  penalties configured by `RewardConfig`.

Registering your own reward::

    from cir.rewards import RewardResult, register_reward

    @register_reward("exact_word")
    def exact_word(response_text, reference, *, trajectory_info):
        correct = response_text.strip().split()[-1:] == [reference]
        return RewardResult(reward=1.0 if correct else 0.0, correct=correct, info={})

    # then train with reward.name=exact_word

A reward function may also accept a ``config`` keyword (it then receives the run's
`RewardConfig`), and may register a batch form with `register_batch_reward` when it can
grade many responses faster together (the built-in ``"math"`` reward grades a batch in
parallel in the worker pool).

``trajectory_info`` keys the built-in reward reads (build them with
`reward_info_from_trajectory`): ``response_length`` (model-sampled tokens of the response),
``max_response_length`` (the current response-length limit, needed for the overlong
penalty), ``finish_reason``, ``budget_exhausted`` (the model tried to run code after its
tool budget was spent) and optionally ``unclosed_code`` (overrides the text check).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import inspect
import json
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

# ---------------------------------------------------------------------------------------------
# Extraction

# \boxed or \fbox not followed by another letter (so \boxedfoo is not a box).
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _scan_boxes(text: str) -> list[str | None]:
    """Every box in `text`, left to right: its content, or None when its braces never close.

    A balanced box is consumed whole (a box nested inside it is part of its content); after an
    unbalanced one the scan goes on right after the command, so a later balanced box is found.
    """
    found: list[str | None] = []
    pos = 0
    while True:
        m = _BOX_COMMAND.search(text, pos)
        if m is None:
            return found
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _matching_brace(text, i)
            if end is None:
                found.append(None)
                pos = m.end()
                continue
            found.append(_unwrap_box(text[i + 1 : end].strip()))
            pos = end + 1
        elif i > m.end() and i < len(text):
            # "\boxed 5": one token, up to white space or the end of the math ($).
            j = i
            while j < len(text) and not text[j].isspace() and text[j] != "$":
                j += 1
            token = text[i:j].rstrip(".,;:")
            found.append(token or None)
            pos = j
        else:
            found.append(None)  # "\boxed" at the end of the text, or "\boxed}" and the like
            pos = m.end()


def _matching_brace(text: str, open_index: int) -> int | None:
    """Index of the brace closing the one at `open_index`; escaped braces (\\{ \\}) do not count."""
    depth = 0
    i = open_index
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # skip the escaped character (\{, \}, \\)
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _unwrap_box(content: str) -> str:
    """``\\boxed{\\boxed{3}}`` -> ``3``: a box whose whole content is another box."""
    while True:
        m = _BOX_COMMAND.match(content)
        if m is None:
            return content
        i = m.end()
        if i < len(content) and content[i] == "{":
            end = _matching_brace(content, i)
            if end == len(content) - 1:
                content = content[i + 1 : end].strip()
                continue
        return content


def extract_all_boxed(text: str) -> list[str]:
    """The contents of all balanced boxes in `text`, in order (nested boxes count once)."""
    return [c for c in _scan_boxes(text) if c is not None]


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed X`` in `text`.

    None when there is no box, or when the last box is never closed (a response cut off
    inside its final answer has no answer, even if an earlier box exists).
    """
    boxes = _scan_boxes(text)
    return boxes[-1] if boxes else None


# ---------------------------------------------------------------------------------------------
# Normalisation (the fast path and multi-box counting only; math-verify does the real work)

_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_FRAC_VARIANTS = re.compile(r"\\[dt]frac(?![A-Za-z])")


def normalize_answer(answer: str) -> str:
    """A light canonical form for exact comparison: no spacing, ``$``, ``\\left``/``\\right``;
    ``\\dfrac``/``\\tfrac`` as ``\\frac``; no trailing period. Never makes two different
    answers equal except by dropping layout."""
    s = answer.strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s.strip("$")
    s = _LEFT_RIGHT.sub("", s)
    s = _FRAC_VARIANTS.sub(r"\\frac", s)
    s = _SPACING.sub("", s)
    s = "".join(s.split())
    return s.rstrip(".")


def normalize_reference(text: str) -> str:
    """The answer held by a reference: the last box of a solution that has one, else the text
    itself (a bare answer), without surrounding ``$``."""
    text = text.strip()
    if _BOX_COMMAND.search(text):
        boxed = extract_boxed(text)
        if boxed is not None:
            return boxed
    if len(text) >= 2 and text[0] == "$" and text[-1] == "$":
        text = text.strip("$").strip()
    return text


# ---------------------------------------------------------------------------------------------
# Grading in worker processes


@dataclass(frozen=True)
class GradeOutcome:
    """The verdict on one (prediction, reference) pair and why.

    reason: "exact_match" (fast path), "equivalent" / "not_equivalent" (math-verify),
    "no_answer" (empty prediction), "grader_timeout", "grader_error" (math-verify raised),
    "grader_crashed" (the worker died, e.g. out of memory).
    """

    correct: bool
    reason: str
    detail: str = ""


class GraderUnavailable(RuntimeError):
    """The grading workers cannot start (e.g. math-verify is not installed)."""


def _worker_command() -> list[str]:
    # `-c` rather than `-m cir.rewards`: the worker then imports this module as a module (no
    # second copy as __main__), and the package root is appended to sys.path so a source
    # checkout works even when cir is not installed.
    package_root = str(Path(__file__).resolve().parents[1])
    code = (
        "import sys; sys.path.append(%r); "
        "from cir.rewards import _grader_worker_main; _grader_worker_main()" % package_root
    )
    return [sys.executable, "-c", code]


def _grader_worker_main() -> None:
    """Entry point of a grading worker: JSON lines in on stdin, JSON lines out on the original
    stdout (fd 1 is pointed at stderr so that stray prints cannot corrupt the protocol)."""
    import logging

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    limit_mb = int(os.environ.get("CIR_GRADER_MEMORY_MB", "0") or 0)
    if limit_mb > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    from math_verify import parse, verify

    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            gold = parse("\\boxed{" + request["ref"] + "}", parsing_timeout=None)
            pred = parse("\\boxed{" + request["pred"] + "}", parsing_timeout=None)
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
    """

    def __init__(self, num_workers: int | None = None, *, memory_limit_mb: int = 2048, startup_timeout_s: float = 120.0):
        if num_workers is None:
            num_workers = min(8, max(2, (os.cpu_count() or 2) // 2))
        if num_workers < 1:
            raise ValueError(f"GraderPool needs at least one worker, got num_workers={num_workers}")
        self.num_workers = num_workers
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = startup_timeout_s
        self.restarts = 0  # workers replaced after a timeout or crash (for metrics)
        self._lock = threading.Lock()
        self._pending: deque[_Task] = deque()
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
        """Grade one pair; the future's result is a `GradeOutcome` (fast path resolved at once)."""
        fast = _fast_outcome(prediction, reference)
        future: concurrent.futures.Future = concurrent.futures.Future()
        if fast is not None:
            future.set_result(fast)
            return future
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        with self._lock:
            if self._closed:
                raise RuntimeError("GraderPool is closed")
            if self._broken:
                raise GraderUnavailable(self._broken)
            self._next_id += 1
            self._pending.append(_Task(self._next_id, prediction, reference, timeout_s, future))
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
            pending = list(self._pending)
            self._pending.clear()
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
        self.restarts += 1
        if not self._closed:
            self._spawn()

    def _finish(self, worker: _Worker, outcome: GradeOutcome) -> None:
        task, worker.task = worker.task, None
        if task is not None and not task.future.done():
            task.future.set_result(outcome)

    def _retire(self, worker: _Worker, outcome: GradeOutcome) -> None:
        """Replace a worker that timed out or died, then answer its request as `outcome`."""
        task, worker.task = worker.task, None
        self._replace(worker)
        if task is not None and not task.future.done():
            task.future.set_result(outcome)

    def _dispatch_loop(self) -> None:
        try:
            while len(self._workers) < self.num_workers:
                self._spawn()
            while not self._closed:
                self._assign()
                now = time.monotonic()
                deadlines = [w.deadline for w in self._workers if w.state in ("starting", "busy")]
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
        with self._lock:
            for w in self._workers:
                if not self._pending:
                    break
                if w.state != "idle":
                    continue
                task = self._pending.popleft()
                if task.future.set_running_or_notify_cancel():
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
            pending = list(self._pending)
            self._pending.clear()
        for w in self._workers:
            if w.task is not None and not w.task.future.done():
                w.task.future.set_exception(GraderUnavailable(message))
        for t in pending:
            if not t.future.done():
                t.future.set_exception(GraderUnavailable(message))


def _fast_outcome(prediction: str | None, reference: str) -> GradeOutcome | None:
    if prediction is None or not prediction.strip():
        return GradeOutcome(False, "no_answer")
    if normalize_answer(prediction) == normalize_answer(reference):
        return GradeOutcome(True, "exact_match")
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


# ---------------------------------------------------------------------------------------------
# Rewards


@dataclass
class RewardResult:
    reward: float
    correct: bool
    info: dict = field(default_factory=dict)


RewardFn = Callable[..., RewardResult]  # (response_text, reference, *, trajectory_info) -> RewardResult
BatchRewardFn = Callable[..., list[RewardResult]]  # (responses, references, infos, config) -> list


@dataclass
class RewardConfig:
    """The reward: which function, and the built-in ``"math"`` reward's knobs.

    Penalties are non-negative amounts subtracted from the reward (0 turns them off).

    name: registered reward function (``"math"``, or one registered with `register_reward`).
    correct_reward / wrong_reward: reward for a correct / wrong (or missing) final answer.
    no_box_penalty: the response has no boxed answer.
    multi_box_penalty: the response boxes more than one distinct answer (the last one counts).
    unclosed_code_penalty: the response ends inside an unclosed python block.
    tool_budget_penalty: the model tried to run code after its tool budget was spent.
    overlong_buffer / overlong_penalty: soft overlong penalty. With the length limit L
        (``trajectory_info["max_response_length"]``) and buffer B, a response of n model
        tokens loses nothing for n <= L - B, then linearly more, up to `overlong_penalty`
        at n >= L. Off when either is 0.
    grader_timeout_s: per-answer grading deadline; a slower grader counts the answer wrong.
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

    def __post_init__(self) -> None:
        for name in ("no_box_penalty", "multi_box_penalty", "unclosed_code_penalty", "tool_budget_penalty", "overlong_penalty"):
            if getattr(self, name) < 0:
                raise ValueError(f"RewardConfig.{name} is an amount subtracted from the reward and must be >= 0, got {getattr(self, name)}")
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
    under `name` (see the module docstring for an example)."""

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
    per response (None: empty dicts). Uses the reward's batch form when it has one.
    """
    config = config or RewardConfig()
    name = name or config.name
    if name not in _REWARDS:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(_REWARDS)}")
    infos = list(infos) if infos is not None else [{} for _ in responses]
    if not len(responses) == len(references) == len(infos):
        raise ValueError(f"{len(responses)} responses, {len(references)} references and {len(infos)} infos: lengths differ")
    entry = _REWARDS[name]
    if entry.batch_fn is not None:
        results = entry.batch_fn(list(responses), list(references), infos, config)
        if len(results) != len(responses):
            raise RuntimeError(f"reward {name!r} returned {len(results)} results for {len(responses)} responses")
        return results
    extra = {"config": config} if entry.takes_config else {}
    return [entry.fn(r, ref, trajectory_info=info, **extra) for r, ref, info in zip(responses, references, infos)]


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
    }


def _math_shaping(response_text: str, trajectory_info: dict, config: RewardConfig) -> tuple[str | None, dict[str, float], int]:
    """The final answer, the penalties that apply (name -> amount) and the number of distinct boxes."""
    boxes = _scan_boxes(response_text)
    answer = boxes[-1] if boxes else None
    distinct = {normalize_answer(b) for b in boxes if b is not None}
    penalties: dict[str, float] = {}
    if answer is None and config.no_box_penalty:
        penalties["no_box"] = config.no_box_penalty
    if len(distinct) > 1 and config.multi_box_penalty:
        penalties["multi_box"] = config.multi_box_penalty
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
    return answer, penalties, len(distinct)


def _math_result(answer: str | None, outcome: GradeOutcome, penalties: dict[str, float], num_boxes: int, config: RewardConfig) -> RewardResult:
    base = config.correct_reward if outcome.correct else config.wrong_reward
    info = {
        "answer": answer,
        "reason": outcome.reason,
        "num_distinct_boxes": num_boxes,
        "penalties": penalties,
    }
    if outcome.detail:
        info["detail"] = outcome.detail
    return RewardResult(reward=base - sum(penalties.values()), correct=outcome.correct, info=info)


@register_reward("math")
def math_reward(response_text: str, reference: str, *, trajectory_info: dict, config: RewardConfig | None = None) -> RewardResult:
    """+`correct_reward` when the last boxed answer equals the reference, else `wrong_reward`,
    minus the configured format and overlong penalties."""
    return math_reward_batch([response_text], [reference], [trajectory_info], config or RewardConfig())[0]


@register_batch_reward("math")
def math_reward_batch(responses: list[str], references: list[str], infos: list[dict], config: RewardConfig) -> list[RewardResult]:
    shaped = [_math_shaping(r, info or {}, config) for r, info in zip(responses, infos)]
    outcomes = grade_outcomes([(s[0], ref) for s, ref in zip(shaped, references)], config.grader_timeout_s)
    return [_math_result(a, o, p, n, config) for (a, p, n), o in zip(shaped, outcomes)]
