"""Stopping a run cleanly: Ctrl-C (SIGINT) or SIGTERM asks the run to stop at the next step
boundary, where every rank saves the same checkpoint together and `--resume` continues exactly.

Why not raise `KeyboardInterrupt` where the signal lands: under `torchrun` the launcher
forwards the signal to every rank, and each rank is somewhere else (one inside a collective
another has left, one mid-rollout), so a save right there would mismatch collectives and hang
until the launcher kills the job. A mid-step save would also hold a half-applied update. A flag
that the ranks agree on at the end of a step has neither problem. A second signal aborts at
once without saving.

`torchrun` kills workers 30 s after forwarding a signal unless given `--shutdown-timeout`
(seconds); set it above the length of one step for the checkpoint to be written.
"""

from __future__ import annotations

import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A flag the signal handlers set; used as a context manager around the training loop."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        print(
            f"[cir] {name}: stopping after this step and saving a checkpoint (send it again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )

    def agreed(self, dist) -> bool:
        """Whether any rank was asked to stop, as every rank learns it at this step boundary (the
        launcher may signal them at different moments): they stop together, after the same step.
        `dist`: the run's `DistributedContext` (a collective: every rank calls this)."""
        return bool(dist.max_int(int(self.requested)))

    def __enter__(self) -> StopRequest:
        # Python runs signal handlers on the main thread only, and only it may install them.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
