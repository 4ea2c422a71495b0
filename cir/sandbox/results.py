"""What a finished snippet came to: `ExecResult`, and the one rule that decides its status.

The sandbox and the fresh-interpreter reference (`cir.sandbox.reference`) both judge a
snippet with `classify`, so comparing the two compares what happened, not two rules.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "killed", "sandbox_fault")

# Why a snippet ended in "sandbox_fault" (ExecResult.reason): always the machine's doing.
FAULT_REASONS = {
    "interpreter_lost": "the warm interpreter serving it died (every attempt)",
    "start_failed": "no process could be started or set up for it",
    "host_resource": "the training process ran out of descriptors or memory to run it",
    "starved": "it waited for a CPU so long that the wall-clock guard ended it before its own time was up",
    # Set by callers (the rollout) for a call that raised SandboxError, never by the sandbox.
    "unavailable": "the sandbox could not take the call (no interpreter could be started, or it was closed)",
}


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one snippet.

    status: "ok" | "error" | "timeout" | "memory" | "output_limit" | "killed" |
        "sandbox_fault". The first six are the snippet's own doing, decided in this order of
        precedence: "timeout" (the snippet used up its own time, or its CPU-time limit),
        "memory" (MemoryError, or died by a signal after using nearly all its memory),
        "output_limit" (output cut at max_output_bytes, marked in the text), "killed" (died
        by a signal not caused by the limits above, e.g. it killed itself), "error" (non-zero
        exit, e.g. an uncaught exception: exit 1 with a traceback on stderr), "ok".
        "sandbox_fault" is the machine's doing (see `reason`): the sandbox retried the same
        code and it still failed; there is no output, and the result says nothing about the
        code.
    exit_code: as a shell reports it: 0, 1, ..., or -signal (0 for a sandbox fault).
    wall_ms, cpu_ms: wall-clock time from the start of the snippet, CPU time (user + system,
        including children it waited for).
    reason: for "sandbox_fault", which fault (a key of FAULT_REASONS); "" otherwise.
    attempts: how many times the sandbox ran the code (more than 1 after a fault of the machine).
    """

    status: str
    stdout: str
    stderr: str
    exit_code: int
    wall_ms: float
    cpu_ms: float
    reason: str = ""
    attempts: int = 1

    @property
    def fault(self) -> str | None:
        """Whose fault a result other than "ok" was: "sandbox" (the machine's) or "model"
        (the code's own); None for "ok"."""
        if self.status == "ok":
            return None
        return "sandbox" if self.status == "sandbox_fault" else "model"

    @property
    def error_line(self) -> str:
        """The last non-empty line of stderr (the exception line of a traceback), or ""."""
        return last_line(self.stderr)

    def feedback(self) -> str:
        """What the model is shown: stdout when the snippet succeeded; otherwise stdout (if
        any) followed by the error line, or by a notice for a timeout/memory/signal."""
        if self.status == "ok":
            return self.stdout
        if self.status == "sandbox_fault":
            # Never shown to a model by the rollout (the trajectory ends there instead).
            return f"SandboxFault: the sandbox could not run this code ({self.reason})"
        if self.status == "error":
            notice = self.error_line or f"Process exited with status {self.exit_code}"
        elif self.status == "timeout":
            notice = "TimeoutError: the code ran past its time limit"
        elif self.status == "memory":
            notice = self.error_line if is_memory_error(self.error_line) else "MemoryError: the code ran out of memory"
        elif self.status == "output_limit":
            notice = self.error_line if self.exit_code not in (0, -signal.SIGKILL) else ""
            if not self.stdout:
                return self.stderr
        else:  # killed
            notice = f"Process killed by {signal_name(-self.exit_code)}"
        if not self.stdout:
            return notice
        if not notice:
            return self.stdout
        return self.stdout + ("" if self.stdout.endswith("\n") else "\n") + notice


def last_line(text: str) -> str:
    """The last non-empty line of `text` without trailing whitespace, or ""."""
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.rstrip()
    return ""


# MemoryError itself or a subclass named like one, e.g. numpy's
# "numpy._core._exceptions._ArrayMemoryError: Unable to allocate ...".
_MEMORY_ERROR = re.compile(r"^(?:[\w.]+\.)?_?\w*MemoryError(?::|$)")


def is_memory_error(line: str) -> bool:
    """Whether a traceback's last line reports a MemoryError (or a subclass)."""
    return bool(_MEMORY_ERROR.match(line))


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def classify(
    *, exit_code: int, stderr: str, timed_out: bool, truncated: bool, maxrss_kb: int = 0, memory_mb: float | None = None
) -> str:
    """The status of a finished snippet (see :class:`ExecResult`). Shared by the sandbox and
    the reference runner, so both are judged by the same rule."""
    if timed_out or exit_code == -signal.SIGXCPU:
        return "timeout"
    if exit_code == 1 and is_memory_error(last_line(stderr)):
        return "memory"
    # Output past the cap is killed by us (SIGKILL): that kill says nothing about memory. (The
    # peak-RSS reading below can also be inflated by a large parent the child was forked from.)
    if truncated:
        return "output_limit"
    if (
        exit_code in (-signal.SIGSEGV, -signal.SIGABRT, -signal.SIGBUS, -signal.SIGKILL)
        and memory_mb
        and maxrss_kb >= 0.9 * memory_mb * 1024
    ):
        return "memory"
    if exit_code < 0:
        return "killed"
    if exit_code != 0:
        return "error"
    return "ok"


def truncation_marker(limit: int) -> str:
    """Appended to the stream whose output went past `limit` bytes (stdout + stderr)."""
    return f"\n[... output truncated at {limit} bytes]"
