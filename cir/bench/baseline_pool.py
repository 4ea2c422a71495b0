"""The baseline of ``cir bench sandbox``: code execution as tool-RL trainers commonly do it.

A Python process pool whose workers ``exec()`` each snippet in a fresh globals dict with stdout
captured through ``contextlib.redirect_stdout`` into a ``StringIO``, a per-task timeout, and the
pool built anew for every batch (the pattern of the executor the paper's code uses, and of many
math tool-RL trainers). Two flavours, both as they are usually written:

* ``pebble``: ``pebble.ProcessPool(max_workers=N)``, one ``schedule(fn, args, timeout=T)`` per
  snippet. Pebble counts the timeout from the moment a worker starts the task and terminates
  (then replaces) a worker whose task runs past it.
* ``futures``: ``concurrent.futures.ProcessPoolExecutor(max_workers=N)``, ``submit`` every
  snippet, then ``future.result(timeout=T)`` in order. A running task cannot be stopped: a
  worker stuck in an infinite loop stays stuck until the batch ends (its processes are then
  killed, since ``shutdown`` would wait for ever), and ``result``'s timeout also counts time
  spent waiting in the queue.

Nothing here is tuned for the benchmark: no rlimits, no warm-up, no isolation, just what the
pattern does. Results are mapped to the sandbox's status vocabulary so they can be scored the
same way: a raised ``MemoryError`` -> ``memory``, another exception -> ``error`` (with the
traceback's last line), a pool timeout -> ``timeout``, a worker that died -> ``killed``, more
captured stdout than the cap -> ``output_limit``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import os
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool

from cir.bench.sandbox_truth import Limits, Outcome

BASELINE_KINDS = ("pebble", "futures")


def exec_snippet(code: str, max_output_bytes: int) -> tuple[str, str, str]:
    """The worker function: run ``code`` with ``exec`` and captured stdout.

    Returns ``(status, stdout, error_line)``. Like the common executors it catches
    ``Exception`` (so ``SystemExit`` escapes to the pool, as it does there).
    """
    buffer = io.StringIO()
    status, error_line = "ok", ""
    try:
        with contextlib.redirect_stdout(buffer):
            exec(code, {"__name__": "__main__"})
    except MemoryError as exc:
        status, error_line = "memory", _error_line(exc)
    except Exception as exc:  # noqa: BLE001 - the common executors catch exactly this
        status, error_line = "error", _error_line(exc)
    out = buffer.getvalue()
    encoded = out.encode("utf-8", errors="replace")
    if len(encoded) > max_output_bytes:
        status = "output_limit"
        out = encoded[:max_output_bytes].decode("utf-8", errors="replace")
    return status, out, error_line


def _error_line(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


def _from_remote_exception(exc: BaseException) -> Outcome:
    """Map what ``future.result()`` raised (other than a timeout) to an outcome."""
    if isinstance(exc, SystemExit):
        # The snippet called sys.exit(); its captured stdout was lost with the exception.
        ok = exc.code is None or exc.code == 0
        return Outcome("ok" if ok else "error", "", "" if ok else f"SystemExit: {exc.code}")
    if isinstance(exc, BrokenProcessPool) or type(exc).__name__ == "ProcessExpired":
        return Outcome("killed", "", _error_line(exc))
    if isinstance(exc, MemoryError):
        return Outcome("memory", "", _error_line(exc))
    return Outcome("error", "", _error_line(exc))


class PoolBaseline:
    """``run_batch(codes)`` builds a pool of ``workers`` processes, runs the batch, tears it down.

    ``kind`` is ``"pebble"`` or ``"futures"`` (see the module docstring). Wall time per snippet
    is not observable through a pool, so outcomes carry ``wall_ms`` of the whole batch / size.
    """

    def __init__(self, workers: int, limits: Limits, kind: str = "pebble") -> None:
        if kind not in BASELINE_KINDS:
            raise ValueError(f"unknown baseline kind {kind!r}; choose one of {BASELINE_KINDS}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if kind == "pebble":
            try:
                import pebble  # noqa: F401
            except ImportError as exc:  # pebble is in the 'bench' and 'test' extras
                raise RuntimeError("the pebble baseline needs `pip install pebble`") from exc
        self.workers = workers
        self.limits = limits
        self.kind = kind

    def run_batch(self, codes: Sequence[str], on_done: Callable[[int], None] | None = None) -> list[Outcome]:
        if not codes:
            return []
        t0 = time.perf_counter()
        run = self._run_pebble if self.kind == "pebble" else self._run_futures
        outcomes = run(list(codes), on_done)
        per = (time.perf_counter() - t0) * 1000.0 / len(codes)
        for o in outcomes:
            o.wall_ms = per
        return outcomes

    def _run_pebble(self, codes: list[str], on_done: Callable[[int], None] | None) -> list[Outcome]:
        import pebble

        cap, timeout = self.limits.max_output_bytes, self.limits.timeout_s
        outcomes: list[Outcome] = []
        with pebble.ProcessPool(max_workers=self.workers) as pool:
            futures = [pool.schedule(exec_snippet, args=(c, cap), timeout=timeout) for c in codes]
            for k, fut in enumerate(futures):
                try:
                    status, out, err = fut.result()
                    outcomes.append(Outcome(status, out, err))
                except concurrent.futures.TimeoutError:
                    outcomes.append(Outcome("timeout", ""))
                except BaseException as exc:  # noqa: BLE001 - mapped, see _from_remote_exception
                    outcomes.append(_from_remote_exception(exc))
                if on_done is not None:
                    on_done(k + 1)
        return outcomes

    def _run_futures(self, codes: list[str], on_done: Callable[[int], None] | None) -> list[Outcome]:
        cap, timeout = self.limits.max_output_bytes, self.limits.timeout_s
        outcomes: list[Outcome] = []
        executor = concurrent.futures.ProcessPoolExecutor(max_workers=self.workers)
        try:
            futures = [executor.submit(exec_snippet, c, cap) for c in codes]
            for k, fut in enumerate(futures):
                try:
                    status, out, err = fut.result(timeout=timeout)
                    outcomes.append(Outcome(status, out, err))
                except concurrent.futures.TimeoutError:
                    outcomes.append(Outcome("timeout", ""))
                except BaseException as exc:  # noqa: BLE001 - mapped, see _from_remote_exception
                    outcomes.append(_from_remote_exception(exc))
                if on_done is not None:
                    on_done(k + 1)
        finally:
            # shutdown(wait=True) would wait for ever on a worker stuck in a loop: kill the
            # workers, as trainers using this pattern have to.
            workers = list(getattr(executor, "_processes", {}).values())
            executor.shutdown(wait=False, cancel_futures=True)
            for proc in workers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(proc.pid, signal.SIGKILL)
            for proc in workers:
                proc.join(timeout=5)
        return outcomes
