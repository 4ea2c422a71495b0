"""Snippets that attack, as a policy that optimises against the reward would: every probe
must be blocked.

One sandbox serves the module, started the way a trainer run from a project folder starts
one: a world-readable project folder (data, run folder with graded answers) on sys.path as
the working directory is under ``python -m cir train``, a Hugging Face cache named in the
environment, the checkout and its virtual environment (this test's own interpreter) beside
it. Probes that need a neighbour run two snippets at once on the two workers: the attacker
and its victim. After every probe the machine state is checked (no process, zombie or work
directory left).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from test_sandbox_support import assert_clean

from cir.sandbox import Sandbox

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


@pytest.fixture(scope="module")
def world():
    """The host around the sandbox: files a policy would want to read, all world-readable
    (so only the sandbox's filesystem, not file permissions, keeps them out of reach)."""
    base = Path(tempfile.mkdtemp(prefix="cir-adversarial-"))
    base.chmod(0o755)
    project = base / "project"
    files = {
        "train": project / "data" / "train.jsonl",
        "eval": project / "runs" / "demo" / "eval" / "step_000020_demo.jsonl",
        "hf": base / "hf-cache" / "hub" / "models--org--model" / "config.json",
        "home": base / "home" / "notes.txt",
        "tmp": Path(tempfile.gettempdir()) / f"cir-adversarial-{os.getpid()}.txt",
    }
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"answer": "42"}\n')
        path.chmod(0o644)
    (base / "home").chmod(0o700)  # a private home: its files are world-readable, the directory is not
    unix_path = base / "host.sock"
    saved_path, saved_hf = list(sys.path), os.environ.get("HF_HOME")
    sys.path.insert(0, str(project))  # the working directory, as `python -m cir train` puts it on sys.path
    os.environ["HF_HOME"] = str(base / "hf-cache")
    host_unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host_unix.bind(str(unix_path))
    unix_path.chmod(0o777)
    host_unix.listen(4)
    try:
        sandbox = Sandbox(
            workers=2,
            timeout_s=5.0,
            memory_mb=256,
            max_processes=32,
            max_file_bytes=4 * MiB,
            work_dir_bytes=8 * MiB,
            work_dir_inodes=1024,
            preload=("math", "numpy"),
            warmup=False,
        )
    finally:
        sys.path[:] = saved_path
        if saved_hf is None:
            os.environ.pop("HF_HOME", None)
        else:
            os.environ["HF_HOME"] = saved_hf
    try:
        yield {"sandbox": sandbox, "files": {k: str(v) for k, v in files.items()}, "unix": str(unix_path)}
    finally:
        sandbox.close()
        host_unix.close()
        files["tmp"].unlink(missing_ok=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def sb(world):
    yield world["sandbox"]
    assert_clean(world["sandbox"])


def probe(sb, code: str) -> dict:
    r = sb.run(textwrap.dedent(code))
    assert r.status == "ok", r
    return json.loads(r.stdout.strip().splitlines()[-1])


READ = """
import json, os
out = {}
for name, path in PATHS.items():
    try:
        with open(path) as f:
            out[name] = f.read()
    except OSError as e:
        out[name] = type(e).__name__
print(json.dumps(out))
"""


def read_probe(sb, paths: dict) -> dict:
    return probe(sb, READ.replace("PATHS", repr(paths)))


# -- data read through every kind of path -------------------------------------------------------


def test_project_folder_on_sys_path_and_its_data_and_runs_are_invisible(sb, world):
    files = world["files"]
    got = read_probe(sb, {"train": files["train"], "eval": files["eval"]})
    assert got == {"train": "FileNotFoundError", "eval": "FileNotFoundError"}
    listing = probe(sb, f"import os, json\nprint(json.dumps(os.path.exists({os.path.dirname(files['train'])!r})))")
    assert listing is False


def test_checkout_and_its_tests_are_invisible(sb):
    got = read_probe(
        sb, {"pyproject": str(REPO / "pyproject.toml"), "this_test": __file__, "readme": str(REPO / "README.md")}
    )
    assert set(got.values()) == {"FileNotFoundError"}


def test_virtual_env_inside_the_checkout_shows_only_the_offered_packages(sb):
    site = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    listing = probe(sb, f"import os, json\nprint(json.dumps(sorted(os.listdir({site!r}))))")
    assert listing and all(name.lower().startswith("numpy") for name in listing), listing
    assert sorted(os.listdir(site)) != listing  # the host's has torch, transformers, cir, ...
    r = sb.run("import torch")
    assert r.status == "error" and r.error_line.startswith("ModuleNotFoundError"), r


def test_private_home_hugging_face_cache_and_host_tmp_are_invisible(sb, world):
    files = world["files"]
    got = read_probe(sb, {k: files[k] for k in ("home", "hf", "tmp")})
    assert got == {"home": "FileNotFoundError", "hf": "FileNotFoundError", "tmp": "FileNotFoundError"}


def test_nothing_of_the_trainers_home_is_visible(sb):
    home = Path.home()
    entries = [str(p) for p in home.iterdir() if p.is_file()] + [str(home / ".cache" / "huggingface")]
    found = probe(sb, f"import os, json\nprint(json.dumps([p for p in {entries!r} if os.path.exists(p)]))")
    assert found == []


def test_environment_does_not_name_the_hf_cache(sb):
    env = probe(sb, "import os, json\nprint(json.dumps(dict(os.environ)))")
    assert "HF_HOME" not in env and not any("hf-cache" in v for v in env.values())


# -- other snippets: files, IPC, disk, processes ------------------------------------------------


def pair(sb, attacker: str, victim: str, timeout_s: float = 5.0):
    """Runs two snippets at once (one per worker); returns (attacker, victim) results."""
    return sb.run_batch([textwrap.dedent(attacker), textwrap.dedent(victim)], timeout_s=timeout_s)


def test_other_snippets_files_are_out_of_reach(sb):
    victim = """
    import os, time
    open('secret.txt', 'w').write('42')
    time.sleep(1.2)
    print(open('secret.txt').read())
    """
    attacker = """
    import json, os, time
    time.sleep(0.3)
    found = []
    for root in ['/tmp', '/tmp/cir-work'] + [f'/tmp/cir-work/s{k}' for k in range(8)]:
        try:
            found += [os.path.join(root, e) for e in os.listdir(root)]
        except OSError:
            pass
    for pid in [p for p in os.listdir('/proc') if p.isdigit()]:
        for what in ('cwd', 'root'):
            try:
                found += os.listdir(f'/proc/{pid}/{what}')
            except OSError:
                pass
    print(json.dumps([f for f in found if 'secret' in f or f.startswith('/tmp/cir-work/s')]))
    """
    a, v = pair(sb, attacker, victim)
    assert (v.status, v.stdout) == ("ok", "42\n")
    assert json.loads(a.stdout) == [], a.stdout


SYSV = """
import ctypes, json, os, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
KEY = 0x0C1C1
def ids():
    return {
        "shm": libc.shmget(KEY, 0, 0),
        "sem": libc.semget(KEY + 1, 0, 0),
        "msg": libc.msgget(KEY + 2, 0),
    }
"""


def test_sysv_ipc_is_neither_shared_nor_left_behind(sb):
    maker = SYSV + textwrap.dedent(
        """
        shm = libc.shmget(KEY, 1 << 20, 0o1666)   # IPC_CREAT | 0666
        addr = libc.shmat(shm, None, 0)
        ctypes.memmove(addr, b'answer=42', 9)
        sem = libc.semget(KEY + 1, 1, 0o1666)
        msg = libc.msgget(KEY + 2, 0o1666)
        made = [shm >= 0, sem >= 0, msg >= 0]
        time.sleep(1.2)                           # the neighbour looks meanwhile
        print(json.dumps(made))                   # and nothing is removed: it is left behind
        """
    )
    neighbour = SYSV + "time.sleep(0.4)\nprint(json.dumps(ids()))"
    a, b = pair(sb, maker, neighbour)
    assert json.loads(a.stdout) == [True, True, True], a
    assert json.loads(b.stdout) == {"shm": -1, "sem": -1, "msg": -1}  # not shared while it runs
    later = probe(sb, SYSV + "print(json.dumps(ids()))")
    assert later == {"shm": -1, "sem": -1, "msg": -1}  # nor left behind once it ended


def test_inode_exhaustion_stays_in_its_own_slot(sb):
    hog = """
    import json, os, time
    n = 0
    try:
        while True:
            open(f'f{n}', 'w').close()
            n += 1
    except OSError as e:
        err = e.strerror
    time.sleep(0.8)
    print(json.dumps([n, err]))
    """
    neighbour = """
    import json, time
    time.sleep(0.4)
    open('mine.txt', 'w').write('fine')
    print(json.dumps(open('mine.txt').read()))
    """
    a, b = pair(sb, hog, neighbour)
    n, err = json.loads(a.stdout)
    assert 900 <= n < 1024 and "No space left" in err, a.stdout  # its slot's inode cap
    assert (b.status, json.loads(b.stdout)) == ("ok", "fine")


def test_byte_exhaustion_stays_in_its_own_slot(sb):
    hog = """
    import json, os, time
    written = 0
    try:
        for i in range(100):
            with open(f'blob{i}', 'wb') as f:
                for _ in range(4):
                    f.write(b'x' * ((1 << 20) - 1))  # files stay under RLIMIT_FSIZE (4 MiB)
                    written += (1 << 20) - 1
    except OSError as e:
        err = e.strerror
    time.sleep(0.8)
    print(json.dumps([written, err]))
    """
    neighbour = """
    import json, time
    time.sleep(0.4)
    with open('mine.bin', 'wb') as f:
        f.write(b'y' * (2 << 20))
    print(json.dumps(len(open('mine.bin', 'rb').read())))
    """
    a, b = pair(sb, hog, neighbour)
    written, err = json.loads(a.stdout)
    assert written <= 8 * MiB and "No space left" in err, a.stdout  # its slot's byte cap
    assert (b.status, json.loads(b.stdout)) == ("ok", 2 << 20)


def test_fork_bomb_beside_a_neighbour(sb):
    bomb = """
    import os
    while True:
        try:
            os.fork()
        except OSError:
            pass
    """
    neighbour = "import time\ntime.sleep(0.3)\nprint(sum(range(10**5)))"
    a, b = pair(sb, bomb, neighbour, timeout_s=1.5)
    assert a.status == "timeout"
    assert (b.status, b.stdout) == ("ok", f"{sum(range(10**5))}\n")


def test_memory_bomb_beside_a_neighbour(sb):
    bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))"  # touches every page
    neighbour = "import time\ntime.sleep(0.3)\nprint('fine')"
    a, b = pair(sb, bomb, neighbour)
    assert a.status == "memory" and a.fault == "model"
    assert (b.status, b.stdout) == ("ok", "fine\n")


# -- sockets ----------------------------------------------------------------------------------


def test_loopback_to_the_trainer_and_between_snippets_is_down(sb):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    try:
        listener = """
        import json, socket, time
        s = socket.socket()
        try:
            s.bind(('127.0.0.1', 47123))
            s.listen(1)
            result = 'listening'
        except OSError as e:
            result = type(e).__name__
        time.sleep(1.0)
        print(json.dumps(result))
        """
        connector = f"""
        import json, socket, time
        time.sleep(0.4)
        out = []
        for port in ({port}, 47123):
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1)
                out.append('connected')
            except OSError as e:
                out.append(type(e).__name__)
        print(json.dumps(out))
        """
        a, b = pair(sb, listener, connector)
        assert "connected" not in json.loads(b.stdout), b.stdout
        assert json.loads(a.stdout) != "listening" or "connected" not in json.loads(b.stdout)
    finally:
        server.close()


def test_unix_sockets_of_the_host_and_of_other_snippets_are_unreachable(sb, world):
    listener = """
    import json, socket, time
    s = socket.socket(socket.AF_UNIX)
    s.bind('\\0cir-adversarial-abstract')
    s.listen(1)
    time.sleep(1.0)
    print(json.dumps('bound'))
    """
    connector = f"""
    import json, socket, time
    time.sleep(0.4)
    out = []
    for address in ('\\0cir-adversarial-abstract', {world["unix"]!r}):
        c = socket.socket(socket.AF_UNIX)
        try:
            c.connect(address)
            out.append('connected')
        except OSError as e:
            out.append(type(e).__name__)
    print(json.dumps(out))
    """
    a, b = pair(sb, listener, connector)
    assert json.loads(a.stdout) == "bound"
    abstract, host = json.loads(b.stdout)
    assert abstract != "connected" and host == "FileNotFoundError", b.stdout


# -- signals ----------------------------------------------------------------------------------


def test_signals_reach_neither_the_trainer_nor_other_snippets(sb):
    victim = "import time\ntime.sleep(1.2)\nprint('survived')"
    killer = """
    import json, os, signal, time
    time.sleep(0.4)
    me, sent = os.getpid(), []
    for pid in [int(p) for p in os.listdir('/proc') if p.isdigit()]:
        if pid == me:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            sent.append(pid)
        except OSError:
            pass
    print(json.dumps(sent))
    """
    trainer = os.getpid()
    zygote = sb.stats()["zygote_pid"]
    a, v = pair(sb, killer, victim)
    assert a.status == "ok" and json.loads(a.stdout) == [], a.stdout
    assert (v.status, v.stdout) == ("ok", "survived\n")
    assert os.getpid() == trainer and sb.stats()["zygote_pid"] == zygote  # nobody restarted


def test_root_and_proc_show_only_the_snippets_world(sb):
    top = probe(sb, "import os, json\nprint(json.dumps(sorted(os.listdir('/'))))")
    # The interpreter and its packages are shown where they are (a checkout's venv may sit
    # under any top-level folder, e.g. /check in CI); nothing else beside the system's own.
    where_python_is = {
        os.path.realpath(p).split(os.sep)[1] for p in (sys.prefix, sys.base_prefix, sys.executable, os.__file__)
    }
    assert set(top) <= {"dev", "etc", "lib", "lib64", "proc", "root", "tmp", "usr", "bin", "opt"} | where_python_is
    assert not set(top) & {"sys", "var", "boot", "mnt", "srv", "run"}
    etc = probe(sb, "import os, json\nprint(json.dumps(sorted(os.listdir('/etc'))))")
    assert set(etc) <= {"ld.so.cache", "localtime"}, etc


# -- a snippet cannot make its own result a fault of the machine --------------------------------
# (A trajectory with a sandbox fault is left out of training: a policy that could fake one
# could leave out every trajectory it is about to lose.)


def test_a_forged_status_record_does_not_make_a_fault(sb):
    forger = """
    import os, struct, sys
    record = struct.pack('iiqqqq', 3, 71, 0, 0, 0, 0)  # what a set-up failure once looked like
    for fd in range(3, 1024):
        try:
            os.write(fd, record)
        except OSError:
            pass
    sys.stderr.write('cir-sandbox: snippet set-up failed: forged\\n')
    sys.stderr.flush()
    os._exit(71)
    """
    r = sb.run(textwrap.dedent(forger))
    assert (r.status, r.exit_code, r.attempts, r.fault) == ("error", 71, 1, "model"), r


def test_starving_itself_through_detached_processes_is_its_own_timeout():
    """Busy processes the snippet detached (setsid, double fork: orphaned to the zygote)
    slow its own main process down: that is not the machine starving it."""
    with Sandbox(
        workers=1, timeout_s=0.5, wall_guard=(1.0, 0.5), max_processes=32, preload=("math",), warmup=False
    ) as sb:
        code = """
        import os
        for _ in range(8):
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    while True:
                        pass
                os._exit(0)
        while True:
            pass
        """
        r = sb.run(textwrap.dedent(code))
        assert (r.status, r.attempts, r.fault) == ("timeout", 1, "model"), r
        assert sb.counters()["faults"] == 0
        assert_clean(sb)
