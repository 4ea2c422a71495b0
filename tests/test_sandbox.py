"""The sandbox executor: results, errors, limits, crashes, sessions, asyncio, leaks, restart.

One sandbox (2 workers) serves the whole module; after every test the machine state is
checked: no process of the sandbox uids, no zombie, nothing under the zygote but its spare,
no leftover work directory.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from test_sandbox_support import assert_clean, sandbox_uid_processes, wait_idle

from cir.sandbox import ExecResult, Sandbox, SandboxError, classify


@pytest.fixture(scope="module")
def sb():
    with Sandbox(workers=2, timeout_s=3.0) as sandbox:
        yield sandbox


@pytest.fixture(autouse=True)
def clean_after(sb):
    yield
    assert_clean(sb)


def test_results_and_order(sb):
    codes = [f"import time; time.sleep({(7 - i % 7) * 0.01}); print({i} * {i})" for i in range(24)]
    results = sb.run_batch(codes)
    assert [r.status for r in results] == ["ok"] * 24
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(24)]
    assert all(r.exit_code == 0 and r.stderr == "" for r in results)
    assert all(r.wall_ms > 0 and r.cpu_ms >= 0 for r in results)


def test_warm_modules_work(sb):
    r = sb.run(
        "import sympy as sp\nx = sp.symbols('x')\nprint(sp.solve(x**2 - 5*x + 6, x))\n"
        "import numpy as np\nprint(int(np.linalg.det(np.array([[2, 1], [1, 3]])).round()))"
    )
    assert (r.status, r.stdout) == ("ok", "[2, 3]\n5\n")


def test_error_traceback_and_error_line(sb):
    r = sb.run("def f(x):\n    return 1 / x\n\nprint('before')\nf(0)")
    assert r.status == "error" and r.exit_code == 1
    assert r.stdout == "before\n"
    assert r.stderr.startswith("Traceback (most recent call last):\n")
    assert '  File "<string>", line 5, in <module>\n' in r.stderr
    assert '  File "<string>", line 2, in f\n' in r.stderr
    assert "zygote.py" not in r.stderr  # the runner's own frames are not shown
    assert r.error_line == "ZeroDivisionError: division by zero"
    assert r.feedback() == "before\nZeroDivisionError: division by zero"


def test_syntax_error(sb):
    r = sb.run("x = (1,\nprint(x)")
    assert r.status == "error" and r.exit_code == 1
    assert "Traceback" not in r.stderr  # compile errors have no traceback header, as with python -c
    assert r.stderr.startswith('  File "<string>", line 1')
    assert r.error_line.startswith("SyntaxError:")


@pytest.mark.parametrize(
    "code, status, exit_code, stdout, error_line",
    [
        ("import sys; sys.exit(3)", "error", 3, "", ""),
        ("import sys; print('x'); sys.exit('bad input')", "error", 1, "x\n", "bad input"),
        ("raise SystemExit", "ok", 0, "", ""),
        ("import sys; sys.exit(0)", "ok", 0, "", ""),
        ("import os; print('lost in the buffer'); os._exit(4)", "error", 4, "", ""),
        ("import os, sys; print('kept'); sys.stdout.flush(); os._exit(0)", "ok", 0, "kept\n", ""),
        ("import os; os.kill(os.getpid(), 9)", "killed", -9, "", ""),
        ("import os; os.kill(os.getpid(), 15)", "killed", -15, "", ""),
        ("import ctypes; ctypes.string_at(0)", "killed", -11, "", ""),
        ("raise KeyboardInterrupt", "killed", -2, "", "KeyboardInterrupt"),
    ],
)
def test_exit_paths(sb, code, status, exit_code, stdout, error_line):
    r = sb.run(code)
    assert (r.status, r.exit_code, r.stdout, r.error_line) == (status, exit_code, stdout, error_line), r


@pytest.mark.parametrize(
    "code",
    ["while True:\n    pass", "import time\ntime.sleep(30)", "input()", "import sys\nsys.stdin.read()"],
    ids=["busy-loop", "sleep", "input", "stdin-read"],
)
def test_timeouts(sb, code):
    r = sb.run(code, timeout_s=0.5)
    assert r.status == "timeout", r
    assert r.exit_code == -signal.SIGKILL
    assert 500 <= r.wall_ms < 2500
    assert r.feedback().startswith("TimeoutError")


def test_queueing_is_not_a_timeout(sb):
    # 40 snippets of 50 ms on 2 workers take ~1 s in total; each may run 0.5 s.
    results = sb.run_batch(["import time; time.sleep(0.05); print('done')"] * 40, timeout_s=0.5)
    assert [r.status for r in results] == ["ok"] * 40
    assert max(r.wall_ms for r in results) < 500


def test_output_flood_is_cut(sb):
    r = sb.run("print('x' * 10**6)")
    assert r.status == "output_limit"
    assert r.stdout.endswith(f"\n[... output truncated at {sb.max_output_bytes} bytes]")
    assert r.stdout.startswith("x" * 1000)
    assert len(r.stdout) == sb.max_output_bytes + len(f"\n[... output truncated at {sb.max_output_bytes} bytes]")
    endless = sb.run("while True:\n    print('y' * 100)")
    assert endless.status == "output_limit"
    assert endless.wall_ms < 2500  # killed at the limit, not at the timeout
    on_stderr = sb.run("import sys\nwhile True:\n    sys.stderr.write('z' * 1000)")
    assert on_stderr.status == "output_limit" and "[... output truncated at" in on_stderr.stderr


def test_memory_limit(sb):
    # Allocations here never touch their pages, so even a broken limit could not exhaust the
    # machine; bombs that do touch memory run under outer limits in test_sandbox_containment.
    r = sb.run("x = bytes(50 * 2**30)")
    assert r.status == "memory" and r.error_line == "MemoryError"
    assert r.feedback() == "MemoryError"
    grow = sb.run("chunks = []\nwhile True:\n    chunks.append(bytes(2**28))")
    assert grow.status == "memory", grow
    np_r = sb.run("import numpy as np\nx = np.empty((2**16, 2**16))")  # 32 GiB
    assert np_r.status == "memory" and "Unable to allocate" in np_r.error_line, np_r
    assert sb.run("x = bytes(2**30); print(len(x))").stdout == f"{2**30}\n"  # 1 GiB fits in 2 GiB


def test_kill_parent_leaves_executor_working(sb):
    r = sb.run("import os\nos.kill(os.getppid(), 9)")
    assert r.status == "error" and "PermissionError" in r.error_line
    r = sb.run(
        "import os, signal\n"
        "for target in (1, -1, os.getppid()):\n"
        "    try:\n"
        "        os.kill(target, signal.SIGKILL)\n"
        "    except OSError:\n"
        "        pass\n"
        "print('still here')"
    )
    # kill(-1) took the snippet itself down (or nothing could be killed): either way the
    # executor is fine.
    assert r.status in ("ok", "killed")
    assert sb.run("print('alive')").stdout == "alive\n"


def test_detached_descendants_are_killed(sb):
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(60)\n"  # holds stdout open; must not delay the result
        "    os._exit(0)\n"
        "time.sleep(0.2)\n"
        "print('parent done')"
    )
    r = sb.run(code)
    assert (r.status, r.stdout) == ("ok", "parent done\n")
    assert r.wall_ms < 2500
    wait_idle(sb)
    assert sandbox_uid_processes(sb) == []


def test_fork_within_limits_works(sb):
    # The interpreter itself is in the snippet's root (the host's other programs are not).
    r = sb.run(
        "import subprocess, sys\n"
        "print(subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True, text=True).stdout)"
    )
    assert (r.status, r.stdout) == ("ok", "42\n\n"), r


def test_fork_bomb_is_contained(sb):
    # Real containment (RLIMIT_NPROC per slot uid) in the shared sandbox; the stress version
    # under outer limits is in test_sandbox_containment.py.
    r = sb.run(
        "import os\nn = 0\nfor _ in range(500):\n    try:\n        if os.fork() == 0:\n"
        "            import time; time.sleep(30)\n        n += 1\n    except OSError:\n        break\nprint(n)"
    )
    assert r.status == "ok"
    assert 0 < int(r.stdout) < 64  # max_processes=64 per uid
    assert sb.run("print(1)").stdout == "1\n"


def test_session_mode(sb):
    assert sb.run("import math\nx = 21", session="traj-1").status == "ok"
    assert sb.run("print('noise')\ny = x * 2", session="traj-1").stdout == "noise\n"
    assert sb.run("z = undefined_name", session="traj-1").status == "error"  # not kept
    r = sb.run("print(y, math.pi > 3)", session="traj-1")
    assert (r.status, r.stdout) == ("ok", "42 True\n")  # earlier output is not repeated
    assert sb.run("print(y)", session="traj-2").status == "error"  # sessions are separate
    assert sb.run("print(y)").status == "error"  # stateless by default
    sb.close_session("traj-1")
    assert sb.run("print(x)", session="traj-1").status == "error"


def test_session_timeout_counts_only_the_new_cell(sb):
    sb.run("import time\ntime.sleep(0.4)\na = 1", session="slow", timeout_s=1.0)
    sb.run("time.sleep(0.4)\nb = 2", session="slow", timeout_s=1.0)
    r = sb.run("time.sleep(0.4)\nprint(a + b)", session="slow", timeout_s=1.0)  # replay 0.8 s + 0.4 s
    assert (r.status, r.stdout) == ("ok", "3\n")
    assert r.wall_ms < 1000
    sb.close_session("slow")


def test_run_batch_sessions_in_order(sb):
    codes = ["a = 1", "b = a + 1", "print(a + b)", "print('free')"]
    results = sb.run_batch(codes, sessions=["s", "s", "s", None])
    assert [r.stdout for r in results] == ["", "", "3\n", "free\n"]
    sb.close_session("s")


def test_arun_overlaps_with_other_coroutines(sb):
    async def main():
        ticks = 0
        stop = False

        async def ticker():
            nonlocal ticks
            while not stop:
                await asyncio.sleep(0.005)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        start = time.monotonic()
        results = await asyncio.gather(*(sb.arun(f"import time\ntime.sleep(0.3)\nprint({i})") for i in range(4)))
        elapsed = time.monotonic() - start
        stop = True
        await tick_task
        return results, elapsed, ticks

    results, elapsed, ticks = asyncio.run(main())
    assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]
    assert elapsed < 1.15  # 4 x 0.3 s on 2 workers: ~0.6 s, not 1.2 s
    assert ticks >= 20  # the loop kept running while the snippets did


def test_arun_cancel_kills_the_snippet(sb):
    async def main():
        task = asyncio.create_task(sb.arun("import time\ntime.sleep(30)"))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await sb.arun("print('next')")

    start = time.monotonic()
    r = asyncio.run(main())
    assert r.stdout == "next\n"
    assert time.monotonic() - start < 5


def test_thread_safety_of_run(sb):
    out: dict[int, ExecResult] = {}

    def worker(i):
        out[i] = sb.run(f"print({i})")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: r.stdout for i, r in out.items()} == {i: f"{i}\n" for i in range(16)}


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_thousand_snippets_without_leaks(sb):
    sb.run_batch([f"print({i})" for i in range(200)])  # warm the allocator
    wait_idle(sb)
    fds_before = len(os.listdir("/proc/self/fd"))
    rss_before = _rss_kb()
    results = sb.run_batch([f"print({i} + 1)" for i in range(1000)])
    assert [r.stdout for r in results] == [f"{i + 1}\n" for i in range(1000)]
    del results
    wait_idle(sb)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert _rss_kb() - rss_before < 8 * 1024  # KiB: the supervisor's memory stays flat


def test_zygote_killed_is_restarted_and_snippet_retried(sb):
    before = wait_idle(sb)
    result: list[ExecResult] = []
    t = threading.Thread(target=lambda: result.append(sb.run("import time\ntime.sleep(1.0)\nprint('survived')")))
    t.start()
    deadline = time.monotonic() + 10
    while sb.stats()["inflight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    os.kill(before["zygote_pid"], signal.SIGKILL)
    t.join(timeout=120)
    assert result and (result[0].status, result[0].stdout) == ("ok", "survived\n")
    after = wait_idle(sb)
    assert after["restarts"] == before["restarts"] + 1
    assert after["retries"] == before["retries"] + 1
    assert after["zygote_pid"] != before["zygote_pid"]
    assert not os.path.exists(f"/proc/{before['zygote_pid']}")  # reaped, not a zombie
    assert sb.run("print(2)").stdout == "2\n"


def test_stats_and_isolation_description(sb):
    s = sb.stats()
    for key in ("executed", "restarts", "queued", "inflight", "zygote_pid", "timeouts", "output_limits"):
        assert key in s
    assert s["executed"] > 0
    assert "namespaces:" in sb.isolation and "limits:" in sb.isolation


def test_bad_arguments():
    with pytest.raises(ValueError):
        Sandbox(workers=0)
    with pytest.raises(ValueError):
        Sandbox(timeout_s=0)
    with pytest.raises(TypeError):
        Sandbox(preload="sympy")


def test_closed_sandbox_refuses_work():
    sandbox = Sandbox(workers=1, preload=("math",), warmup=False)
    assert sandbox.run("print(1)").stdout == "1\n"
    facts = sandbox.isolation_facts
    host_root = facts["host_work_root"]
    # With a mount namespace nothing of the sandbox is on the host's disk; otherwise its work
    # root is, until close.
    assert (host_root is None) == facts["namespaces"]["mount"]
    zygote = sandbox.stats()["zygote_pid"]
    sandbox.close()
    with pytest.raises(SandboxError):
        sandbox.run("print(1)")
    if host_root is not None:
        assert not os.path.exists(host_root)
    assert not os.path.exists(f"/proc/{zygote}")


def test_close_fails_pending_async_calls():
    sandbox = Sandbox(workers=1, preload=("math",), warmup=False)

    async def main():
        pending = asyncio.create_task(sandbox.arun("import time\ntime.sleep(30)"))
        await asyncio.sleep(0.3)
        sandbox.close()
        with pytest.raises(SandboxError):
            await asyncio.wait_for(pending, timeout=10)

    asyncio.run(main())


def test_classify_precedence():
    assert classify(exit_code=-9, stderr="", timed_out=True, truncated=True) == "timeout"
    assert classify(exit_code=-signal.SIGXCPU, stderr="", timed_out=False, truncated=False) == "timeout"
    assert classify(exit_code=1, stderr="Traceback...\nMemoryError\n", timed_out=False, truncated=True) == "memory"
    assert classify(exit_code=-9, stderr="", timed_out=False, truncated=True) == "output_limit"
    assert classify(exit_code=-11, stderr="", timed_out=False, truncated=False) == "killed"
    assert classify(exit_code=2, stderr="", timed_out=False, truncated=False) == "error"
    assert classify(exit_code=0, stderr="warning\n", timed_out=False, truncated=False) == "ok"
    big = classify(exit_code=-6, stderr="", timed_out=False, truncated=False, maxrss_kb=2000 * 1024, memory_mb=2048)
    assert big == "memory"
    # Killed for its output: the peak RSS (which a child forked from a large process inherits)
    # does not make it a memory failure.
    flood = classify(exit_code=-9, stderr="", timed_out=False, truncated=True, maxrss_kb=8000 * 1024, memory_mb=2048)
    assert flood == "output_limit"


def test_feedback_texts():
    ok = ExecResult("ok", "4\n", "", 0, 1.0, 1.0)
    assert ok.feedback() == "4\n" and ok.error_line == ""
    err = ExecResult("error", "", "Traceback (most recent call last):\n  ...\nValueError: bad\n\n", 1, 1.0, 1.0)
    assert err.error_line == "ValueError: bad" and err.feedback() == "ValueError: bad"
    killed = ExecResult("killed", "partial", "", -11, 1.0, 1.0)
    assert killed.feedback() == "partial\nProcess killed by SIGSEGV"
    mem = ExecResult("memory", "", "Traceback...\nMemoryError\n", 1, 1.0, 1.0)
    assert mem.feedback() == "MemoryError"


def test_from_config_and_the_one_preload_default():
    from cir.sandbox import DEFAULT_PRELOAD, SandboxConfig

    cfg = SandboxConfig()
    assert (cfg.workers, cfg.timeout_s, cfg.memory_mb, cfg.max_output_bytes) == (2, 5.0, 2048, 16384)
    assert cfg.preload == list(DEFAULT_PRELOAD) and cfg.preload is not SandboxConfig().preload
    assert inspect.signature(Sandbox).parameters["preload"].default == DEFAULT_PRELOAD
    small = SandboxConfig(workers=1, timeout_s=0.5, memory_mb=1024, max_output_bytes=100, preload=["math"])
    sandbox = Sandbox.from_config(small)
    try:
        assert sandbox.workers == 1 and sandbox.max_output_bytes == 100
        assert sandbox._limits.timeout_s == 0.5 and sandbox._limits.memory_mb == 1024
        assert sandbox.run("import math; print(math.factorial(5))").stdout == "120\n"
        assert sandbox.run("print('x' * 200)").status == "output_limit"
        assert sandbox.run("while True: pass").status == "timeout"
    finally:
        sandbox.close()
    assert sandbox.stats()["executed"] == 3  # the counters as they were at close


def test_importing_the_package_stays_light():
    # The zygote imports cir.sandbox.zygote: nothing of the client may come with it. And
    # `cir sandbox run` never imports torch.
    script = textwrap.dedent(
        """
        import sys
        before = set(sys.modules)
        import cir.sandbox.zygote
        lean = not {"asyncio", "logging", "typing", "cir.sandbox.client"} & (set(sys.modules) - before)
        from cir.sandbox import (DEFAULT_PRELOAD, ExecResult, Sandbox, SandboxConfig, SandboxError, classify,
                                 launch_settings, run_fresh)
        print(lean, "torch" in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]


# A script that leaves a sandbox behind while a daemon thread still runs Python (as progress
# monitors, loggers and servers do). The interpreter never frees what such a thread can reach:
# here the script's globals, through its function, or the thread's own arguments.
_DAEMON_EXIT_SCRIPT = textwrap.dedent(
    """
    import socket, sys, threading
    from cir.sandbox import Sandbox

    def accept_forever(server, sandbox=None):
        while True:
            try:
                server.accept()
            except socket.timeout:
                pass

    def main(close):
        sandbox = Sandbox(workers=1, preload=("math",), warmup=False)
        assert sandbox.run("print(1)").stdout == "1\\n"
        if close:
            sandbox.close()
        return sandbox

    close, holder = sys.argv[1] == "close", sys.argv[2]
    SANDBOX = main(close)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.1)
    args = (server, SANDBOX) if holder == "thread" else (server,)
    threading.Thread(target=accept_forever, args=args, daemon=True).start()
    if holder == "thread":
        del SANDBOX
    """
)


@pytest.mark.parametrize("close, holder", [("close", "module"), ("open", "module"), ("open", "thread")])
def test_no_leak_report_at_exit_with_a_daemon_thread(tmp_path, close, holder):
    script = tmp_path / "daemon_at_exit.py"
    script.write_text(_DAEMON_EXIT_SCRIPT)
    done = subprocess.run([sys.executable, str(script), close, holder], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "nanobind: leaked" not in done.stderr, done.stderr
