"""Helpers shared by the sandbox tests (imported by the other tests/test_sandbox_*.py files).

They look at the real machine state: /proc for processes and zombies, the sandbox's work
root for leftover directories, and cgroups / pid namespaces to run dangerous snippets
(fork and memory bombs) under outer limits, so a containment bug cannot take the test
machine down.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    uid: int
    state: str
    name: str


def proc_table() -> list[Proc]:
    """Every process visible in /proc (host view)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # exited meanwhile
        out.append(
            Proc(
                pid=int(entry),
                ppid=int(fields["PPid"]),
                uid=int(fields["Uid"].split()[0]),
                state=fields["State"].split()[0],
                name=fields["Name"].strip(),
            )
        )
    return out


def sandbox_uid_processes(sb) -> list[Proc]:
    lo_hi = sb.isolation_facts.get("uid_range")
    if not lo_hi:
        return []
    lo, hi = lo_hi
    return [p for p in proc_table() if lo <= p.uid <= hi]


def zygote_children(zygote_pid: int) -> list[int]:
    try:
        with open(f"/proc/{zygote_pid}/task/{zygote_pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def work_root_entries(sb) -> list[str]:
    """Per-snippet directories currently present in the sandbox's work root (seen through
    the zygote's own mount namespace when it has one; with a tmpfs per worker slot, the
    entries inside each slot's)."""
    facts = sb.isolation_facts
    zygote = sb.stats()["zygote_pid"]
    fs = facts.get("filesystem") or {}
    if facts.get("host_work_root") is None:
        path = f"/proc/{zygote}/root{facts['work_root']}"
    else:
        path = facts["work_root"]
    if not fs.get("slot_tmpfs"):
        return sorted(os.listdir(path))
    return sorted(f"{slot}/{entry}" for slot in os.listdir(path) for entry in os.listdir(os.path.join(path, slot)))


def wait_idle(sb, timeout: float = 20.0) -> dict:
    """Waits until no snippet is queued, running or being torn down."""
    deadline = time.monotonic() + timeout
    while True:
        s = sb.stats()
        if s["queued"] == 0 and s["inflight"] == 0 and s["occupied_slots"] == 0 and s["ready"]:
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"sandbox not idle after {timeout} s: {s}")
        time.sleep(0.01)


def assert_clean(sb, timeout: float = 10.0) -> None:
    """No process of the sandbox uids, nothing under the zygote but its spare, no zombie
    child of the zygote or of this process, no leftover work directory."""
    wait_idle(sb)
    deadline = time.monotonic() + timeout
    while True:
        problems = []
        zygote = sb.stats()["zygote_pid"]
        strays = sandbox_uid_processes(sb)
        if strays:
            problems.append(f"processes of sandbox uids: {strays}")
        kids = zygote_children(zygote)
        if len(kids) > 1:
            problems.append(f"zygote has {len(kids)} children (only the spare expected): {kids}")
        zombies = [p for p in proc_table() if p.state == "Z" and p.ppid in (zygote, os.getpid())]
        if zombies:
            problems.append(f"zombies: {zombies}")
        leftovers = work_root_entries(sb)
        if leftovers:
            problems.append(f"work dirs left: {leftovers}")
        if not problems:
            return
        if time.monotonic() > deadline:
            raise AssertionError("; ".join(problems))
        time.sleep(0.05)


# -- outer limits for dangerous tests --------------------------------------------------------


def _cgroup_dir(controller: str) -> str | None:
    """Our cgroup directory for a v1 controller, if that hierarchy is mounted and writable."""
    base = f"/sys/fs/cgroup/{controller}"
    if not os.path.isdir(base):
        return None
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controller in controllers.split(","):
                    full = os.path.join(base, path.lstrip("/"))
                    return full if os.access(full, os.W_OK) else None
    except OSError:
        return None
    return None


@contextlib.contextmanager
def outer_cgroups(pids_max: int, memory_bytes: int):
    """Fresh v1 pids/memory cgroups (where available) that a test subprocess joins."""
    made: list[str] = []
    settings = {"pids": {"pids.max": str(pids_max)}, "memory": {"memory.limit_in_bytes": str(memory_bytes)}}
    for controller, files in settings.items():
        parent = _cgroup_dir(controller)
        if parent is None:
            continue
        path = os.path.join(parent, f"cir-sandbox-test-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.mkdir(path)
            for name, value in files.items():
                with open(os.path.join(path, name), "w") as f:
                    f.write(value)
        except OSError:
            with contextlib.suppress(OSError):
                os.rmdir(path)
            continue
        made.append(path)
    try:
        yield made
    finally:
        for path in made:
            # Anything still in there is a leak of the test itself: kill it, then remove.
            for _ in range(50):
                try:
                    with open(os.path.join(path, "cgroup.procs")) as f:
                        pids = [int(x) for x in f.read().split()]
                except OSError:
                    break
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)
            with contextlib.suppress(OSError):
                os.rmdir(path)


@dataclass(frozen=True)
class Contained:
    returncode: int
    stdout: str
    stderr: str
    cgroups: tuple[str, ...]


# Run as root inside the contained run's own mount namespace, before it drops to `user`:
# makes each path in argv[1] (JSON) reachable by every uid at the path it has, past parent
# directories that others cannot enter (a 0700 home holding pyenv, a `mktemp -d` checkout).
# Each such directory is covered by an empty traversable tmpfs into which only the needed
# entries are bound back; everything else in it stays out of sight. Then it execs argv[2:].
_EXPOSE = """
import json, os, sys, tempfile

def blocked(path):
    cur = "/"
    for part in [p for p in path.split("/") if p]:
        if not os.stat(cur).st_mode & 0o001:
            return cur, part
        cur = os.path.join(cur, part)
    return None

targets = [os.path.realpath(p) for p in json.loads(sys.argv[1])]
stage = tempfile.mkdtemp(prefix="cir-expose-")
for _ in range(16):
    need = {}
    for t in targets:
        b = blocked(t)
        if b:
            need.setdefault(b[0], set()).add(b[1])
    if not need:
        break
    for directory, children in need.items():
        moved = []
        for child in sorted(children):
            src = os.path.join(directory, child)
            aside = os.path.join(stage, str(len(os.listdir(stage))))
            if os.path.isdir(src):
                os.mkdir(aside)
            else:
                open(aside, "w").close()
            os.system(f"mount --rbind '{src}' '{aside}'")
            moved.append((aside, src))
        os.system(f"mount -t tmpfs -o mode=0755 cir-expose '{directory}'")
        for aside, dst in moved:
            os.mkdir(dst) if os.path.isdir(aside) else open(dst, "w").close()
            os.system(f"mount --move '{aside}' '{dst}'")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def run_contained(
    script: str,
    *,
    timeout: float,
    pids_max: int = 400,
    memory_bytes: int = 6 << 30,
    as_bytes: int = 6 << 30,
    user: int | None = None,
    expose: list[str] | None = None,
    cwd: str = "/tmp",
    env: dict[str, str] | None = None,
) -> Contained:
    """Runs `python -c script` under outer limits: its own pid namespace (everything dies
    with it on timeout), a pids and a memory cgroup where the machine has them, RLIMIT_AS,
    and a wall-clock timeout. With `user`, as that uid (through setpriv); with `expose`, in its
    own mount namespace where those paths are reachable by every uid (see _EXPOSE)."""
    import json
    import resource

    cmd = [sys.executable, "-c", script]
    if user is not None:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv is needed to run as another user"
        cmd = [setpriv, f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    unshare = shutil.which("unshare")
    if expose:
        assert unshare and os.geteuid() == 0, "exposing paths to another uid needs root and unshare"
        cmd = [unshare, "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private"]
        cmd += [sys.executable, "-c", _EXPOSE, json.dumps(expose)]
        cmd += [setpriv, f"--reuid={user}", f"--regid={user}", "--clear-groups", sys.executable, "-c", script]
    elif unshare and os.geteuid() == 0:
        cmd = [unshare, "--pid", "--fork", "--kill-child", *cmd]
    with outer_cgroups(pids_max, memory_bytes) as groups:

        def enter_limits() -> None:
            for g in groups:
                with open(os.path.join(g, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
            resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))

        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=env,
            preexec_fn=enter_limits,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as timed_out:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(
                f"contained run timed out after {timeout} s\nstdout:\n{out}\nstderr:\n{err}"
            ) from timed_out
    return Contained(proc.returncode, out, err, tuple(groups))
