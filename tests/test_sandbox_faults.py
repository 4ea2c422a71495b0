"""Faults of the machine are the machine's, not the model's.

Real faults, made from outside: the warm interpreter killed under a snippet (once: retried,
the snippet's own result; every time: "sandbox_fault", never "Process killed"), its
executable gone so that restarts fail (SandboxError while it cannot start, then recovery on
its own once it can), the training process out of descriptors, and a CPU starved by busy
processes beside the sandbox (the snippet's own time is what runs out, not the wall clock;
the wall-clock guard makes a starved snippet a fault, never a timeout). The counters
`Sandbox.counters()` reports follow each of them.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
from test_sandbox_support import assert_clean, wait_idle

from cir.sandbox import Sandbox, SandboxError
from cir.sandbox.results import FAULT_REASONS, STATUSES

FAST = {"preload": ("math",), "warmup": False}
SLEEPER = "import time\ntime.sleep(0.8)\nprint('slept')"


def sleeping_children(zygote_pid: int) -> list[int]:
    """Host pids of the zygote's children asleep in time.sleep (the spare waits on a socket)."""
    try:
        with open(f"/proc/{zygote_pid}/task/{zygote_pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    out = []
    for pid in kids:
        try:
            with open(f"/proc/{pid}/wchan") as f:
                if "nanosleep" in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


@contextmanager
def zygote_killer(sb: Sandbox, times: int):
    """Kills the zygote whenever a snippet sleeps under it, up to `times` times."""
    done, kills = threading.Event(), []

    def loop():
        while not done.is_set() and len(kills) < times:
            zygote = sb.stats()["zygote_pid"]
            if zygote > 0 and sleeping_children(zygote):
                os.kill(zygote, signal.SIGKILL)
                kills.append(zygote)
                while not done.is_set() and sb.stats()["zygote_pid"] in (zygote, -1):
                    time.sleep(0.005)
            time.sleep(0.005)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield kills
    finally:
        done.set()
        thread.join()


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def test_fault_statuses_and_reasons_are_published():
    assert "sandbox_fault" in STATUSES
    assert {"interpreter_lost", "start_failed", "host_resource", "starved"} <= set(FAULT_REASONS)


def test_interpreter_killed_once_is_retried_and_the_snippet_gets_its_own_result():
    with Sandbox(workers=1, timeout_s=5, retry_backoff_s=0.01, **FAST) as sb:
        before = sb.counters()
        with zygote_killer(sb, times=1) as kills:
            r = sb.run(SLEEPER)
        assert len(kills) == 1
        assert (r.status, r.stdout, r.attempts, r.fault) == ("ok", "slept\n", 2, None)
        assert delta(before, sb.counters()) == {"submitted": 1, "executed": 1, "retries": 1, "restarts": 1}
        assert_clean(sb)


def test_interpreter_killed_every_time_is_a_sandbox_fault_not_a_kill():
    with Sandbox(workers=1, timeout_s=5, fault_attempts=3, retry_backoff_s=0.01, **FAST) as sb:
        before = sb.counters()
        with zygote_killer(sb, times=3) as kills:
            r = sb.run(SLEEPER)
        assert len(kills) == 3
        assert (r.status, r.reason, r.attempts, r.fault) == ("sandbox_fault", "interpreter_lost", 3, "sandbox")
        assert (r.stdout, r.exit_code) == ("", 0)
        assert "killed" not in r.feedback().lower()
        assert delta(before, sb.counters()) == {
            "submitted": 1,
            "retries": 2,
            "restarts": 3,
            "faults": 1,
            "faults_interpreter_lost": 1,
        }
        assert sb.run("print('after')").stdout == "after\n"  # and it goes on
        assert_clean(sb)


def test_failing_restarts_raise_sandbox_error_until_a_start_succeeds(tmp_path, monkeypatch):
    """The interpreter's executable disappears (a virtual environment rebuilt under a
    running trainer, say): restarts fail, and after three in a row every snippet gets a
    SandboxError (one line: why, and when it tries again) instead of waiting. The sandbox
    keeps trying with backoff; once the executable is back it runs snippets again."""
    import cir.sandbox.client as client

    exe = tmp_path / "python"
    exe.symlink_to(os.path.realpath(sys.executable))
    monkeypatch.setattr(client, "_interpreter_path", lambda: str(exe))
    with Sandbox(workers=1, timeout_s=5, restart_backoff_s=(0.05, 0.4), **FAST) as sb:
        assert sb.run("print(1)").stdout == "1\n"
        before = sb.counters()
        exe.unlink()
        os.kill(sb.stats()["zygote_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while sb.stats()["available"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not sb.stats()["available"]
        with pytest.raises(SandboxError) as unavailable:
            sb.run("print(2)")
        message = str(unavailable.value)
        assert "unavailable" in message and "No such file" in message and "\n" not in message
        exe.symlink_to(os.path.realpath(sys.executable))
        deadline = time.monotonic() + 30
        while not sb.stats()["ready"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sb.run("print(3)").stdout == "3\n"
        after = sb.counters()
        assert after["start_failures"] - before["start_failures"] >= 3
        assert after["restarts"] - before["restarts"] >= 4  # the failed starts and the good one
        assert after["unavailable"] - before["unavailable"] == 1
        assert after["faults"] == before["faults"]
        assert_clean(sb)


def test_out_of_descriptors_in_the_trainer_is_a_host_resource_fault():
    with Sandbox(workers=1, timeout_s=5, fault_attempts=2, retry_backoff_s=0.01, **FAST) as sb:
        assert sb.run("print(1)").stdout == "1\n"
        wait_idle(sb)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use, hard))  # no room for the snippet's pipes
        try:
            r = sb.run("print(2)")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert (r.status, r.reason, r.attempts) == ("sandbox_fault", "host_resource", 2)
        assert sb.run("print(3)").stdout == "3\n"
        assert sb.counters()["faults_host_resource"] == 1


# -- a starved CPU ----------------------------------------------------------------------------

# Busy for `CPU_S` seconds of its own CPU time, however long that takes on the wall clock.
CPU_S = 0.3
BUSY = f"import time\nt = time.process_time()\nwhile time.process_time() - t < {CPU_S}:\n    pass\nprint('done')"


@contextmanager
def one_cpu_shared_with(hogs: int):
    """This process (and the sandbox it starts) and `hogs` busy processes on one CPU."""
    saved = os.sched_getaffinity(0)
    cpu = min(saved)
    os.sched_setaffinity(0, {cpu})
    # Each in a session of its own, as a snippet is: with the scheduler's autogroups, CPU
    # is shared between sessions first.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass"],
            start_new_session=True,
        )
        for _ in range(hogs)
    ]
    try:
        time.sleep(0.2)
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        os.sched_setaffinity(0, saved)


def test_a_starved_snippet_does_not_time_out_and_sleep_still_does():
    """With four busy processes on its CPU a snippet needing 0.3 s of CPU takes well over its
    0.6 s limit on the wall clock, yet it is not the model's timeout: it waited for the CPU.
    time.sleep(100) still is, at the limit."""
    with one_cpu_shared_with(hogs=4):
        with Sandbox(workers=1, timeout_s=0.6, **FAST) as sb:
            busy = sb.run(BUSY)
            sleep = sb.run("import time\ntime.sleep(100)")
            counters = sb.counters()
    assert (busy.status, busy.stdout) == ("ok", "done\n"), busy
    assert busy.wall_ms > 600 and busy.attempts == 1  # past the limit on the wall clock
    assert sleep.status == "timeout" and 600 <= sleep.wall_ms < 1500, sleep
    assert counters["timeouts"] == 1 and counters["faults"] == 0


def test_the_wall_clock_guard_on_a_starved_snippet_is_a_fault_not_a_timeout():
    """With the guard at the limit + 0.5 s and eight busy processes beside it, the starved
    snippet (its 0.3 s of CPU take about 3 s of wall clock) is ended at 1.1 s having had a
    fraction of its own time: the machine's fault, retried, then "sandbox_fault"
    ("starved"). A snippet that sleeps through its limit is still the model's timeout, before
    the guard."""
    with one_cpu_shared_with(hogs=8):
        with Sandbox(
            workers=1, timeout_s=0.6, wall_guard=(1.0, 0.5), fault_attempts=2, retry_backoff_s=0.01, **FAST
        ) as sb:
            busy = sb.run(BUSY)
            sleep = sb.run("import time\ntime.sleep(100)")
            counters = sb.counters()
    assert (busy.status, busy.reason, busy.attempts) == ("sandbox_fault", "starved", 2), busy
    assert sleep.status == "timeout" and sleep.wall_ms < 1100, sleep
    assert counters["faults_starved"] == 1 and counters["retries"] == 1 and counters["timeouts"] == 1
