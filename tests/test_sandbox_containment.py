"""Dangerous snippets under outer limits.

Each test runs its own small sandbox inside a subprocess that is itself contained: its own
pid namespace (everything dies with it), pids and memory cgroups where the machine has
them, RLIMIT_AS and a wall-clock timeout. If the sandbox's own containment had a bug, the
damage stops there instead of taking down the machine running the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from test_sandbox_support import run_contained

# Runs inside the contained subprocess: a fresh sandbox, the snippets, and a report on
# what is left afterwards.
_HARNESS = textwrap.dedent(
    """
    import json, os, sys, time
    from cir.sandbox import Sandbox

    def uid_processes(sb):
        rng = sb.isolation_facts.get("uid_range")
        if not rng:
            return []
        found = []
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    uid = int([l for l in open(f"/proc/{p}/status") if l.startswith("Uid:")][0].split()[1])
                except (OSError, IndexError):
                    continue
                if rng[0] <= uid <= rng[1]:
                    found.append(int(p))
        return found

    def zygote_descendants(zpid):
        kids = {}
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    ppid = int([l for l in open(f"/proc/{p}/status") if l.startswith("PPid:")][0].split()[1])
                except (OSError, IndexError):
                    continue
                kids.setdefault(ppid, []).append(int(p))
        out, todo = [], [zpid]
        while todo:
            for c in kids.get(todo.pop(), []):
                out.append(c)
                todo.append(c)
        return out

    config = json.loads(sys.argv[1])
    report = {"results": []}
    with Sandbox(**config["sandbox"]) as sb:
        report["facts"] = sb.isolation_facts
        for code in config["codes"]:
            r = sb.run(code)
            report["results"].append({"status": r.status, "stdout": r.stdout[-2000:], "error_line": r.error_line,
                                      "exit_code": r.exit_code, "wall_ms": r.wall_ms})
        deadline = time.monotonic() + 20
        while sb.stats()["occupied_slots"] and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        report["uid_processes"] = uid_processes(sb)
        report["zygote_descendants"] = zygote_descendants(sb.stats()["zygote_pid"])
        report["after"] = sb.run("print('still works')").stdout
        report["stats"] = sb.stats()
    print(json.dumps(report))
    """
)


def contained_run(sandbox_kwargs: dict, codes: list[str], *, timeout: float = 120, **limits) -> dict:
    config = json.dumps({"sandbox": sandbox_kwargs, "codes": codes})
    script = _HARNESS.replace("json.loads(sys.argv[1])", f"json.loads({config!r})")
    done = run_contained(script, timeout=timeout, **limits)
    assert done.returncode == 0, f"harness failed (rc={done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


FAST_START = {"preload": ["math"], "warmup": False}


def test_fork_bomb_is_contained():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    report = contained_run({"workers": 1, "timeout_s": 2.0, "max_processes": 32, **FAST_START}, [bomb], pids_max=300)
    (r,) = report["results"]
    assert r["status"] == "timeout"
    assert report["uid_processes"] == []
    assert len(report["zygote_descendants"]) <= 1  # only the spare
    assert report["after"] == "still works\n"


def test_memory_bomb_is_contained():
    codes = [
        "chunks = []\nwhile True:\n    chunks.append('a' * 10**7)",  # touches every page
        "x = bytearray(10**12)",
        "import numpy as np\nx = np.zeros((1 << 14, 1 << 14)) + 1",  # 2 GiB of float64, touched
    ]
    report = contained_run(
        {"workers": 1, "timeout_s": 20.0, "memory_mb": 512, "preload": ["math", "numpy"], "warmup": False},
        codes,
        memory_bytes=3 << 30,
    )
    assert [r["status"] for r in report["results"]] == ["memory"] * 3, report["results"]
    assert report["uid_processes"] == []
    assert report["after"] == "still works\n"


def test_flood_and_crash_storm_leaves_nothing():
    codes = [
        "import os\nfor _ in range(20):\n    if os.fork() == 0:\n        os.setsid()\n        import time; time.sleep(60)\nprint('forked')",
        "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
        "import ctypes; ctypes.string_at(0)",
        "import os; os.kill(os.getpid(), 9)",
        "import threading, time\nfor _ in range(10):\n    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\nprint('threads')",
    ]
    report = contained_run({"workers": 2, "timeout_s": 3.0, **FAST_START}, codes)
    assert [r["status"] for r in report["results"]] == ["ok", "output_limit", "killed", "killed", "ok"]
    assert report["uid_processes"] == []
    assert len(report["zygote_descendants"]) <= 1
    assert report["after"] == "still works\n"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to start a non-root run")
def test_degrades_gracefully_without_root():
    """As an ordinary user: no uid to drop to, so snippets share the trainer's uid; the
    sandbox says so and still isolates what the kernel allows (here: a user namespace)."""
    codes = [
        "import os; print(os.getuid())",
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n    os._exit(0)\ntime.sleep(0.2)\nprint('parent done')",
        "print(1)",
    ]
    # The run needs the installed package to be readable by that uid, which it is not when
    # the checkout sits in a private (0700) folder, as a `mktemp -d` clone does.
    probe = subprocess.run(
        [
            shutil.which("setpriv"),
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            "import cir._sandbox",
        ],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.skip(
            f"uid 65534 cannot import this installation of cir ({probe.stderr.strip().splitlines()[-1:]}); the non-root path is not exercised here"
        )
    report = contained_run({"workers": 1, "timeout_s": 3.0, **FAST_START}, codes, user=65534)
    facts = report["facts"]
    assert facts["drop_uid"] is False and facts["uid_range"] is None
    statuses = [r["status"] for r in report["results"]]
    assert statuses == ["ok", "error", "ok", "ok"], report["results"]
    assert report["results"][0]["stdout"] == "65534\n"
    # Everything the double-forking snippet left behind is gone: only the spare remains.
    assert len(report["zygote_descendants"]) <= 1, report
    assert report["after"] == "still works\n"
