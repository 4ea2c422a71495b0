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
import sys
import tempfile
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


# What a user's run looks like from the inside: the trainer runs as that user from a project
# folder in its 0700 home (cwd on sys.path, as with `python -m cir train`); the user's own
# files, 0600 ones included, are readable by the trainer. Snippets must see none of them.
_NON_ROOT_HARNESS = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, os.getcwd())  # as `python -m cir train` from the project folder has it
    from cir.sandbox import Sandbox

    home = os.environ["HOME"]
    secrets = [os.path.join(home, ".netrc"), os.path.join(home, "project", "data", "train.jsonl"),
               os.path.join(home, "project", "runs", "demo", "eval", "step_000001.jsonl")]
    report = {"trainer_reads": [open(p).read() for p in secrets], "uid": os.getuid()}
    probe = (
        "import os, json\\n"
        "out = {'uid': os.getuid(), 'read': [], 'list': []}\\n"
        "for p in PATHS:\\n"
        "    try:\\n"
        "        out['read'].append(open(p).read())\\n"
        "    except OSError as e:\\n"
        "        out['read'].append(type(e).__name__)\\n"
        "for d in DIRS:\\n"
        "    try:\\n"
        "        out['list'].append(sorted(os.listdir(d)))\\n"
        "    except OSError as e:\\n"
        "        out['list'].append(type(e).__name__)\\n"
        "print(json.dumps(out))"
    )
    dirs = [home, os.getcwd(), os.path.join(home, "project", "data")]
    code = probe.replace("PATHS", repr(secrets)).replace("DIRS", repr(dirs))
    with Sandbox(workers=1, timeout_s=5.0, preload=["math"], warmup=False) as sb:
        report["facts"] = sb.isolation_facts
        report["probe"] = json.loads(sb.run(code).stdout)
        rest = ["import socket\\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
                "import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n    if os.fork() == 0:\\n"
                "        time.sleep(60)\\n    os._exit(0)\\ntime.sleep(0.2)\\nprint('parent done')",
                "print(1)"]
        report["statuses"] = [sb.run(c).status for c in rest]
    print(json.dumps(report))
    """
)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to start a non-root run")
def test_as_a_non_root_user_nothing_of_that_user_is_visible():
    """Run by an ordinary user (uid 65534 here, through setpriv), the sandbox takes a user
    namespace to get its mount namespace, builds the snippets' root from the interpreter and
    the preloads, and snippets, which run as that very uid, see none of the user's files:
    not the home, not its 0600 files, not the project folder on sys.path, not its data or
    runs. The interpreter under root's 0700 home (pyenv) is made reachable for that uid in
    the test's own mount namespace, at its own path."""
    uid = 65534
    base = tempfile.mkdtemp(prefix="cir-user-")
    try:
        os.chmod(base, 0o755)
        home = os.path.join(base, "home")
        files = {
            ".netrc": "machine api.wandb.ai login user password SECRET-KEY\n",
            "project/data/train.jsonl": '{"problem": "1+1", "answer": "2"}\n',
            "project/runs/demo/eval/step_000001.jsonl": '{"answer": "42"}\n',
        }
        for rel, text in files.items():
            path = os.path.join(home, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o600)
        for root, _dirs, filenames in os.walk(home):
            os.chown(root, uid, uid)
            for name in filenames:
                os.chown(os.path.join(root, name), uid, uid)
        os.chmod(home, 0o700)
        expose = [sys.executable, os.path.realpath(sys.executable), sys.base_prefix, sys.prefix]
        env = {"HOME": home, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONSAFEPATH": "1"}
        done = run_contained(
            _NON_ROOT_HARNESS, timeout=180, user=uid, expose=expose, cwd=os.path.join(home, "project"), env=env
        )
        assert done.returncode == 0, f"harness failed (rc={done.returncode}):\n{done.stderr[-4000:]}"
        report = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    # The trainer (that user) can read its files; its snippets run as the same uid ...
    assert report["uid"] == uid and report["trainer_reads"] == list(files.values())
    probe = report["probe"]
    assert probe["uid"] == uid
    # ... and find none of them: they are not in the snippets' filesystem at all.
    assert probe["read"] == ["FileNotFoundError"] * 3, probe
    assert probe["list"] == ["FileNotFoundError"] * 3, probe
    facts = report["facts"]
    assert facts["namespaces"]["user"] and facts["drop_uid"] is False and facts["uid_range"] is None
    assert facts["filesystem"]["root"] == "allow-list" and facts["filesystem"]["ok"]
    assert not any(p.startswith(home) for p in facts["filesystem"]["visible"])
    assert report["statuses"] == ["error", "ok", "ok"]  # no network; detached children reaped; still works
