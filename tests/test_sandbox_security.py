"""What a snippet must not be able to do: write outside its work dir, reach the network,
see the trainer's environment or processes, keep privileges, escape its limits."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest
from test_sandbox_support import assert_clean

from cir.sandbox import Sandbox, SandboxError

SECRET_VAR = "CIR_SANDBOX_TEST_SECRET"


@pytest.fixture(scope="module")
def sb():
    # A variable of the parent, set before the sandbox starts: it must not reach snippets.
    os.environ[SECRET_VAR] = "hunter2"
    try:
        with Sandbox(workers=2, timeout_s=5.0, max_open_files=64, max_file_bytes=1 << 20) as sandbox:
            yield sandbox
    finally:
        os.environ.pop(SECRET_VAR, None)


@pytest.fixture(autouse=True)
def clean_after(sb):
    yield
    assert_clean(sb)


def run_json(sb, code):
    r = sb.run(code)
    assert r.status == "ok", r
    return json.loads(r.stdout)


def test_not_root_and_no_capabilities(sb):
    info = run_json(
        sb,
        "import os, json\n"
        "caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'CapAmb'))]\n"
        "nnp = [l.split()[1] for l in open('/proc/self/status') if l.startswith('NoNewPrivs')][0]\n"
        "print(json.dumps([os.getuid(), os.geteuid(), os.getgid(), os.getgroups(), caps, nnp]))",
    )
    uid, euid, gid, groups, caps, nnp = info
    assert uid != 0 and euid != 0 and gid != 0 and groups == []
    assert all(int(c, 16) == 0 for c in caps)
    assert nnp == "1"
    if sb.isolation_facts.get("drop_uid"):
        lo, hi = sb.isolation_facts["uid_range"]
        assert lo <= uid <= hi


def test_parent_environment_is_not_visible(sb):
    assert os.environ[SECRET_VAR] == "hunter2"
    env = run_json(sb, "import os, json\nprint(json.dumps(dict(os.environ)))")
    assert SECRET_VAR not in env
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"}
    raw = sb.run("print(open('/proc/self/environ', 'rb').read())")
    assert SECRET_VAR not in raw.stdout
    # Nor through another process: the zygote's environment is minimal too, and the
    # trainer is not visible at all in the sandbox's /proc.
    peek = sb.run(
        "import os\nfound = []\n"
        "for p in os.listdir('/proc'):\n"
        "    if p.isdigit():\n"
        "        try:\n"
        "            found.append(open(f'/proc/{p}/environ', 'rb').read())\n"
        "        except OSError:\n"
        "            pass\n"
        "print(any(b'hunter2' in e for e in found))"
    )
    assert peek.stdout == "False\n"


@pytest.mark.parametrize(
    "path",
    [
        "/tmp/cir-escape",
        "/var/tmp/cir-escape",
        "/dev/shm/cir-escape",
        "/etc/cir-escape",
        __file__ + ".escape",
        os.path.join(os.path.dirname(os.__file__), "cir_escape.py"),
    ],
)
def test_cannot_write_outside_work_dir(sb, path):
    r = sb.run(f"open({path!r}, 'w').write('x')")
    assert r.status == "error", r
    assert r.error_line.startswith(("PermissionError", "OSError", "FileNotFoundError")), r.error_line
    assert not os.path.exists(path)


def test_work_dir_is_private_writable_and_removed(sb):
    info = run_json(
        sb,
        "import os, json, tempfile\n"
        "open('data.txt', 'w').write('hello')\n"
        "with tempfile.NamedTemporaryFile(delete=False) as f:\n"
        "    f.write(b'x')\n"
        "print(json.dumps([os.getcwd(), os.listdir('.'), os.environ['HOME'], f.name]))",
    )
    cwd, listing, home, tmpname = info
    assert sorted(listing) == sorted(["data.txt", os.path.basename(tmpname)])
    assert home == cwd and tmpname.startswith(cwd)
    # Each snippet gets a fresh, empty directory.
    assert run_json(sb, "import os, json\nprint(json.dumps(os.listdir('.')))") == []


def test_cannot_read_root_only_files(sb):
    r = sb.run("print(open('/etc/shadow').read()[:10])")
    assert r.status == "error" and r.error_line.startswith(("PermissionError", "FileNotFoundError"))


def test_tcp_to_localhost_fails(sb):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    try:
        r = sb.run(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')")
        t.join()
        assert r.status == "error" and "connected" not in r.stdout
        assert r.error_line.startswith(("OSError", "ConnectionRefusedError", "PermissionError", "TimeoutError"))
        assert accepted == []
    finally:
        server.close()


def test_abstract_unix_socket_of_host_unreachable(sb):
    name = f"\0cir-sandbox-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(name)
    server.listen(1)
    try:
        r = sb.run(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({name!r})\nprint('connected')")
        if not sb.isolation_facts["namespaces"]["net"]:
            pytest.skip("abstract unix sockets are only isolated by a network namespace")
        assert r.status == "error" and r.error_line.startswith("ConnectionRefusedError")
    finally:
        server.close()


def test_no_dns_or_external_network(sb):
    r = sb.run("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)")
    assert r.status == "error"


def test_namespace_and_mount_syscalls_refused(sb):
    r = sb.run(
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.unshare(0x10000000), ctypes.get_errno() != 0)\n"  # CLONE_NEWUSER
        "print(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None), ctypes.get_errno() != 0)"
    )
    assert r.stdout == "-1 True\n-1 True\n", r


def test_host_processes_are_invisible(sb):
    if not sb.isolation_facts["filesystem"].get("private_proc"):
        pytest.skip("no private /proc on this machine")
    pids = run_json(sb, "import os, json\nprint(json.dumps([int(p) for p in os.listdir('/proc') if p.isdigit()]))")
    assert len(pids) < 10  # the zygote, its spare, this snippet (and a sibling or two)


def test_rlimits_are_applied(sb):
    limits = run_json(
        sb,
        "import resource, json\n"
        "print(json.dumps({n: resource.getrlimit(getattr(resource, n))[0] for n in "
        "('RLIMIT_NOFILE', 'RLIMIT_FSIZE', 'RLIMIT_NPROC', 'RLIMIT_CORE', 'RLIMIT_CPU', 'RLIMIT_AS')}))",
    )
    assert limits["RLIMIT_NOFILE"] == 64
    assert limits["RLIMIT_FSIZE"] == 1 << 20
    assert limits["RLIMIT_CORE"] == 0
    assert limits["RLIMIT_CPU"] == 6  # timeout 5 s + 1
    assert limits["RLIMIT_NPROC"] >= 64
    extra = sb.isolation_facts["vm_preloaded_extra_bytes"]
    assert limits["RLIMIT_AS"] == 2048 * 2**20 + extra
    big = sb.run("open('big', 'wb').write(b'x' * (2 << 20))")
    assert big.status == "error" and "File too large" in big.error_line
    fds = sb.run("files = [open('f%d' % i, 'w') for i in range(100)]")
    assert fds.status == "error" and "Too many open files" in fds.error_line


def test_file_numbers_start_at_three(sb):
    # The status pipe sits at the top of the table, so files get the numbers python -c gives.
    assert sb.run("print(open('a', 'w').fileno())").stdout == "3\n"


def test_without_namespaces_other_mechanisms_still_hold():
    """Where namespaces are not allowed (here: switched off) the sandbox refuses to start,
    unless weaker isolation is accepted explicitly: then it falls back to a seccomp filter
    for the network, the slot uid for processes and file permissions."""
    with pytest.raises(SandboxError) as refused:
        Sandbox(workers=1, preload=("math",), warmup=False, namespaces=False)
    message = str(refused.value)
    assert "\n" not in message and "namespaces=False" in message and "accept_weaker_isolation=True" in message
    # Without a mount namespace a Python installed in a private directory (like root's home)
    # is not readable by the slot uid: preload what the snippets here import.
    sandbox = Sandbox(
        workers=1, preload=("math", "socket"), warmup=False, namespaces=False, accept_weaker_isolation=True
    )
    try:
        facts = sandbox.isolation_facts
        assert not any(facts["namespaces"].values())
        assert "namespaces: none" in sandbox.isolation
        assert facts["seccomp_blocks_inet"] == facts["seccomp"] is True
        r = sandbox.run("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)")
        assert r.status == "error" and r.error_line.startswith("PermissionError")
        assert sandbox.run("import os; print(os.getuid() != 0)").stdout == "True\n"
        daemon = sandbox.run(
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n"
            "    os._exit(0)\ntime.sleep(0.2)\nprint('parent done')"
        )
        assert daemon.stdout == "parent done\n"
        assert_clean(sandbox)
        host_root = facts["host_work_root"]
        assert os.path.isdir(host_root)
    finally:
        sandbox.close()
    assert not os.path.exists(host_root)
