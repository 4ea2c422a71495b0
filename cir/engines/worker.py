"""The request thread both engines run on: one skeleton, `WorkerEngine`, their base class.

An engine batches whatever requests are in flight at each step, on one thread that owns the
model. What every such engine needs lives here: the queue of new requests, the thread, the
public request API (`generate`, `submit`, `generate_batch`), cancellation, `pause`/`resume`,
commands run on the thread between two steps, `close`, failure propagation, and the time
accounting (`activity`). An engine keeps only what is its own, as hooks the thread calls:

- `_admissible(queue)`: how many requests from the front of the queue to admit now (called
  with the queue's lock held: quick, no blocking);
- `_admit(requests)`: take them into the running batch (a prefill, or handing them to vLLM);
- `_step()`: one forward pass over the running batch; resolve the requests that finished
  (`resolve`, `fail`);
- `_in_flight()`: the requests in the running batch (a sized collection);
- `_abort(requests)`: drop them from the running batch, resolving nothing;
- `_partial(request)`: what a running request has produced so far, as a `Completion` with
  `finish_reason="aborted"` (read before `_abort`);
- `_reset()`: forget the running batch after a step failed (its state is unknown);
- `_on_thread_start()`, `_on_thread_exit()`: what must be built and torn down on the thread
  itself (vLLM's engine); nothing by default.

Hooks run on the engine thread only, one at a time. Except `_admissible`, none runs with the
queue's lock held, so a hook may resolve futures (whose callbacks take that lock).

Pause. `pause()` marks the engine paused; the requests still queued resolve at once with an
empty partial completion, and the thread, at its next turn between two steps, reads each running
request's partial output, drops it from the batch and resolves it with that. `pause()` returns
once that is done, so no forward pass runs until `resume()`; commands (weight loads, sleep,
wake) still run. Requests submitted while paused wait in the queue. Every wait on the thread
(pause, close, a command, a caller waiting for the step in progress) has a timeout, so a stuck
step ends in a TimeoutError naming what waited, not in a hang.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from cir.engines.base import ABORTED, Completion, EngineActivity, SamplingParams

_log = logging.getLogger(__name__)

# The longest a pause, close, command or weight load waits for the engine thread (seconds). A
# decoding step takes milliseconds to a few seconds; a weight reload of a large model tens of
# seconds. Beyond this the step is taken to be stuck.
DEFAULT_TIMEOUT_S = 600.0


def resolve(future: concurrent.futures.Future, completion: Completion) -> bool:
    """Give `future` its completion unless it is already done (e.g. cancelled); whether it took it."""
    if future.done():
        return False
    try:
        future.set_result(completion)
    except concurrent.futures.InvalidStateError:  # cancelled meanwhile
        return False
    return True


def fail(future: concurrent.futures.Future, error: BaseException) -> None:
    """Fail `future` with `error` unless it is already done."""
    if not future.done():
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            future.set_exception(error)


@dataclass
class _Work:
    """What the thread does in one turn, taken from the shared state under the lock."""

    commands: list[tuple[Callable[[], object], concurrent.futures.Future]] = field(default_factory=list)
    cancelled: list = field(default_factory=list)
    admitted: list = field(default_factory=list)
    pause_epoch: int | None = None  # a pause to carry out: abort what is in flight, then acknowledge
    step: bool = False


class WorkerEngine:
    """Base class of the engines: the request thread and its queue (see the module docstring).

    A subclass calls `__init__` before anything that may call `close`, implements the hooks and
    `_make_request(prompt_ids, params)` (a request object with a `future` attribute, a fresh
    `concurrent.futures.Future`), and calls `_start_thread()` once it is ready to serve.
    """

    def __init__(self, name: str, *, timeout_s: float = DEFAULT_TIMEOUT_S):
        if not timeout_s > 0:
            raise ValueError(f"{name}: timeout_s must be > 0, got {timeout_s}")
        self._name = name
        self._timeout_s = float(timeout_s)
        self._cond = threading.Condition()  # guards everything below up to the accounting
        self._queue: collections.deque = collections.deque()  # submitted, not admitted yet
        self._commands: list[tuple[Callable[[], object], concurrent.futures.Future]] = []
        self._cancelled: list = []  # cancelled by their callers: to drop from the batch
        self._unresolved: dict[concurrent.futures.Future, object] = {}  # every request not resolved yet
        self._paused = False
        self._pause_epoch = 0  # pauses asked for
        self._pause_done = 0  # pauses carried out by the thread
        self._closing = False
        self._stopped = False  # the thread has ended (or never started)
        self._error: BaseException | None = None  # what stopped the thread, if it failed
        self._thread: threading.Thread | None = None
        # Held by the thread while a hook or command runs: a caller that must not overlap a
        # forward pass (HFEngine.load_weights) takes it.
        self._step_lock = threading.Lock()
        # Time accounting (see EngineActivity), under _cond.
        self._start_time = time.perf_counter()
        self._busy_s = 0.0
        self._paused_s = 0.0
        self._paused_since: float | None = None
        self._held_s = 0.0
        self._held_since: float | None = None
        self._steps = 0
        self._aborted = 0
        self._pauses = 0

    # -- hooks (see the module docstring) ------------------------------------------------------

    def _make_request(self, prompt_ids: Sequence[int], params: SamplingParams):
        raise NotImplementedError

    def _admissible(self, queue: Sequence) -> int:
        return len(queue)

    def _admit(self, requests: list) -> None:
        raise NotImplementedError

    def _step(self) -> None:
        raise NotImplementedError

    def _in_flight(self) -> Collection:
        raise NotImplementedError

    def _abort(self, requests: list) -> None:
        raise NotImplementedError

    def _partial(self, request) -> Completion:
        raise NotImplementedError

    def _reset(self) -> None:
        raise NotImplementedError

    def _on_thread_start(self) -> None:
        pass

    def _on_thread_exit(self) -> None:
        pass

    # -- requests (any thread) ---------------------------------------------------------------

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        """Continue `prompt_ids`; returns only the new tokens (and their log-probs).

        Many coroutines, on any event loops, may await this at once; their requests are batched.
        Cancelling the awaiting task drops the request from the batch. While the engine is
        paused the request waits; a pause resolves it with what it has so far ("aborted").
        """
        request = self._make_request(prompt_ids, params)
        self._submit([request])
        return await asyncio.wrap_future(request.future)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> concurrent.futures.Future:
        """Queue one request from any thread; the future resolves to its `Completion`
        (cancelling the future drops the request)."""
        request = self._make_request(prompt_ids, params)
        self._submit([request])
        return request.future

    def generate_batch(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """Synchronous helper (evaluation, tests): generate for every prompt, results in prompt order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"generate_batch: {len(prompts)} prompts but {len(params)} SamplingParams")
        requests = [self._make_request(p, sp) for p, sp in zip(prompts, params)]
        self._submit(requests)
        return [r.future.result() for r in requests]

    def _submit(self, requests: list) -> None:
        with self._cond:
            self._check_open()
            for request in requests:
                self._unresolved[request.future] = request
                request.future.add_done_callback(self._on_resolved)
            self._queue.extend(requests)
            if self._paused and self._held_since is None:
                self._held_since = time.perf_counter()
            self._cond.notify_all()

    def _on_resolved(self, future: concurrent.futures.Future) -> None:
        with self._cond:
            request = self._unresolved.pop(future, None)
            if request is not None and future.cancelled():
                self._cancelled.append(request)
                self._cond.notify_all()

    def _check_open(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"{self._name} stopped after an error: {self._error!r}") from self._error
        if self._closing:
            raise RuntimeError(f"{self._name} is closed")

    # -- pause and resume ------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self, timeout_s: float | None = None) -> None:
        """Resolve every request in flight with its partial completion (`finish_reason="aborted"`)
        and run no forward pass until `resume()`; requests submitted meanwhile wait. Returns once
        the step in progress (if any) has finished and the running requests are resolved;
        TimeoutError after `timeout_s` (default: the engine's `timeout_s`). From any thread;
        pausing a paused engine does nothing."""
        with self._cond:
            self._check_open()
            queued = []
            if not self._paused:
                self._paused = True
                self._pause_epoch += 1
                self._pauses += 1
                self._paused_since = time.perf_counter()
                queued = list(self._queue)
                self._queue.clear()
                self._cond.notify_all()
            epoch = self._pause_epoch
        empty = sum(resolve(r.future, Completion([], [], ABORTED)) for r in queued)
        with self._cond:
            self._aborted += empty
        if threading.current_thread() is self._thread:
            return  # the thread carries the pause out before its next step
        timeout = self._timeout_s if timeout_s is None else timeout_s
        with self._cond:
            done = self._cond.wait_for(lambda: self._pause_done >= epoch or self._stopped, timeout)
            if self._pause_done >= epoch:
                return
            if self._stopped:
                self._check_open()
                raise RuntimeError(f"{self._name} stopped while pausing")
        if not done:
            raise TimeoutError(
                f"{self._name}: pause waited {timeout:g} s for the step in progress to finish; "
                "the engine thread seems stuck"
            )

    def resume(self) -> None:
        """Let the waiting requests in (from any thread); resuming a running engine does nothing."""
        with self._cond:
            if not self._paused:
                return
            now = time.perf_counter()
            self._paused = False
            self._paused_s += now - self._paused_since
            self._paused_since = None
            if self._held_since is not None:
                self._held_s += now - self._held_since
                self._held_since = None
            self._cond.notify_all()

    def activity(self) -> EngineActivity:
        """Cumulative time accounting since the engine started (subtract two for an interval)."""
        with self._cond:
            now = time.perf_counter()
            paused = self._paused_s + (now - self._paused_since if self._paused_since is not None else 0.0)
            held = self._held_s + (now - self._held_since if self._held_since is not None else 0.0)
            return EngineActivity(
                wall_s=now - self._start_time,
                busy_s=self._busy_s,
                paused_s=paused,
                held_s=held,
                steps=self._steps,
                aborted=self._aborted,
                pauses=self._pauses,
            )

    # -- commands and exclusive access (any thread) ------------------------------------------

    def _call(self, fn: Callable[[], object], what: str = "a command"):
        """Run `fn` on the engine thread between two steps (paused or not) and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._check_open()
            self._commands.append((fn, future))
            self._cond.notify_all()
        concurrent.futures.wait([future], timeout=self._timeout_s)
        if not future.done():
            raise TimeoutError(
                f"{self._name}: {what} waited {self._timeout_s:g} s for the engine thread; the step in "
                "progress seems stuck"
            )
        return future.result()

    @contextlib.contextmanager
    def _between_steps(self, what: str):
        """Hold the engine thread between two steps (no forward pass runs meanwhile)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError(f"{self._name}: {what} cannot run on the engine thread (e.g. from a future's callback)")
        if not self._step_lock.acquire(timeout=self._timeout_s):
            raise TimeoutError(
                f"{self._name}: {what} waited {self._timeout_s:g} s for the step in progress to finish; "
                "the engine thread seems stuck"
            )
        try:
            yield
        finally:
            self._step_lock.release()

    # -- close ---------------------------------------------------------------------------------

    def close(self, timeout_s: float | None = None) -> None:
        """Stop the engine thread once its step in progress finishes; requests still queued or
        running fail with RuntimeError. TimeoutError if the thread has not stopped within
        `timeout_s` (default: the engine's `timeout_s`); its requests fail all the same."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        timeout = self._timeout_s if timeout_s is None else timeout_s
        thread.join(timeout)
        if thread.is_alive():
            error = RuntimeError(f"{self._name} closed while its engine thread was stuck in a step")
            with self._cond:
                stranded = list(self._unresolved)
            for future in stranded:
                fail(future, error)
            raise TimeoutError(f"{self._name}: the engine thread did not stop within {timeout:g} s (a step is stuck)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the engine thread -------------------------------------------------------------------

    def _start_thread(self) -> None:
        """Start the engine thread and wait until `_on_thread_start` has run there (its error,
        if any, is raised here)."""
        started: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(started,), name=f"cir-{self._name}", daemon=True
        )
        self._thread.start()
        try:
            started.result()
        except BaseException:
            self._thread.join()
            raise

    def _thread_main(self, started: concurrent.futures.Future) -> None:
        try:
            self._on_thread_start()
        except BaseException as error:
            with self._cond:
                self._closing = self._stopped = True
                self._cond.notify_all()
            try:
                self._on_thread_exit()
            except BaseException:
                _log.exception("%s: tearing down after a failed start failed", self._name)
            started.set_exception(error)
            return
        started.set_result(None)
        fatal = None
        try:
            while (work := self._next_work()) is not None:
                self._do(work)
        except BaseException as error:  # outside the guarded hooks: the skeleton cannot go on
            fatal = error
        finally:
            self._finish_thread(fatal)

    def _next_work(self) -> _Work | None:
        """Wait until there is something to do; None once the engine is closing."""
        with self._cond:
            while True:
                if self._closing:
                    return None
                work = _Work(commands=self._commands, cancelled=self._cancelled)
                self._commands, self._cancelled = [], []
                if self._paused and self._pause_done < self._pause_epoch:
                    work.pause_epoch = self._pause_epoch
                if not self._paused:
                    queue = self._queue
                    while queue and queue[0].future.done():  # cancelled before admission
                        queue.popleft()
                    if queue:
                        running = len(self._in_flight())
                        n = min(self._admissible(queue), len(queue))
                        if n < 1 and not running:
                            n = 1  # an empty batch always takes the first request
                        work.admitted = [queue.popleft() for _ in range(n)]
                        work.admitted = [r for r in work.admitted if not r.future.done()]
                    work.step = bool(work.admitted) or len(self._in_flight()) > 0
                if work.commands or work.cancelled or work.pause_epoch is not None or work.admitted or work.step:
                    return work
                self._cond.wait()

    def _do(self, work: _Work) -> None:
        if work.pause_epoch is not None:
            with self._step_lock:
                self._abort_in_flight()
            with self._cond:
                self._pause_done = work.pause_epoch
                self._cond.notify_all()
        if work.cancelled:
            with self._step_lock:
                self._guarded(lambda: self._abort(work.cancelled))
        for fn, future in work.commands:
            with self._step_lock:
                try:
                    result = fn()
                except BaseException as error:
                    fail(future, error)
                else:
                    future.set_result(result)
        if not (work.admitted or work.step):
            return
        start = time.perf_counter()
        with self._step_lock:
            if work.admitted:
                try:
                    self._admit(work.admitted)
                except BaseException as error:  # the running batch is the engine's to keep consistent
                    for request in work.admitted:
                        fail(request.future, error)
            stepped = len(self._in_flight()) > 0
            if stepped:
                self._guarded(self._step)
        with self._cond:
            self._busy_s += time.perf_counter() - start
            self._steps += stepped

    def _guarded(self, hook: Callable[[], None]) -> None:
        """Run a hook over the running batch; if it fails, the batch's state is unknown: drop it
        and fail its requests with the error."""
        try:
            hook()
        except BaseException as error:
            victims = list(self._in_flight())
            with contextlib.suppress(BaseException):
                self._reset()
            for request in victims:
                fail(request.future, error)

    def _abort_in_flight(self) -> None:
        """Resolve every running request with its partial completion and drop it from the batch.
        On the engine thread, between two steps (a command may call it, e.g. before vLLM sleeps)."""
        victims = list(self._in_flight())
        if not victims:
            return
        try:
            partials = [self._partial(request) for request in victims]
            self._abort(victims)
        except BaseException as error:
            with contextlib.suppress(BaseException):
                self._reset()
            for request in victims:
                fail(request.future, error)
            return
        aborted = sum(resolve(request.future, partial) for request, partial in zip(victims, partials))
        with self._cond:
            self._aborted += aborted

    def _finish_thread(self, fatal: BaseException | None) -> None:
        with self._cond:
            self._closing = True
            if fatal is not None:
                self._error = fatal
            queued = list(self._queue)
            self._queue.clear()
            commands, self._commands = self._commands, []
            if self._held_since is not None:
                self._held_s += time.perf_counter() - self._held_since
                self._held_since = None
        error = RuntimeError(f"{self._name} closed" if fatal is None else f"{self._name} failed: {fatal!r}")
        victims = []
        with contextlib.suppress(BaseException):
            victims = list(self._in_flight())
            self._reset()
        for request in [*queued, *victims]:
            fail(request.future, error)
        for _, future in commands:
            fail(future, error)
        try:
            self._on_thread_exit()
        except BaseException:  # the requests are failed already; say what went wrong
            _log.exception("%s: tearing down the engine thread failed", self._name)
        with self._cond:
            stranded = list(self._unresolved)
            self._stopped = True
            self._cond.notify_all()
        for future in stranded:  # e.g. admitted while a hook failed half-way
            fail(future, error)
