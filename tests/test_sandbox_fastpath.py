"""The sandbox's fast paths against its plain reference path.

The fast paths (``native_fork``, ``huge_pages``, ``fill_free_blocks``; all on by default)
only change how cheaply a snippet process starts and ends. Here they are checked against
the reference path (all three off, forking through ``os.fork``) on the same snippets, and
their parts are checked on their own: the direct reseeding of ``random`` and numpy equals
the Python-level seeding, every child gets fresh seeds, the arena pool hands out and takes
back arenas, and native fork refuses to run where it cannot tell that it is safe.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import numpy
import pytest
from test_sandbox_support import assert_clean

from cir import _sandbox
from cir.sandbox import Sandbox

REFERENCE = {"native_fork": False, "huge_pages": False, "fill_free_blocks": False}

# What must look the same whichever way the snippet process was made. Outputs that differ
# from run to run (work dir names, random draws) are printed as facts about them.
SNIPPETS = [
    "print(1)",
    "import sys\nprint(sys.argv, __name__, sys.path[0] == '')",
    "import os\nprint(list(os.environ))",
    "import os, tempfile\nprint(tempfile.gettempdir() == os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'])",
    "import os\nprint(sorted(os.listdir('.')))\nopen('f.txt', 'w').write('x')\nprint(sorted(os.listdir('.')))",
    "import signal\nprint(signal.getsignal(signal.SIGINT) is signal.default_int_handler)",
    "import sys\nprint(sys.excepthook is sys.__excepthook__, sys.displayhook is sys.__displayhook__)",
    "import gc\nx = []\nprint(any(r is globals() for r in gc.get_referrers(x)))",
    "import threading, time\n"
    "def work():\n    time.sleep(0.05)\n    print('thread done', flush=True)\n"
    "threading.Thread(target=work).start()\nprint('main done', flush=True)",
    "import threading\nprint(threading.current_thread() is threading.main_thread(), threading.active_count())",
    "import atexit, threading\natexit.register(lambda: print('at exit', threading.active_count()))\nprint('body')",
    "import logging\nlogging.basicConfig(level=logging.INFO)\nlogging.getLogger('x').info('logged')\nprint('ok')",
    "import random\nrandom.seed(5)\nprint(random.random(), random.gauss(0, 1))",
    "import numpy as np\nnp.random.seed(5)\nprint(np.random.rand(3), np.random.normal())",
    "import numpy as np\ns = np.random.get_state()\nprint(s[0], s[2], s[3], s[4])",
    "import sympy as sp\nx = sp.symbols('x')\nprint(sp.factor(x**4 - 1), sp.solve(x**2 - 2, x))",
    "import numpy as np\nprint(np.linalg.inv([[1.0, 2.0], [3.0, 4.0]]))",
    "big = [str(i) * 10 for i in range(200000)]\nprint(len(big), big[-1][:6])",
    "d = {i: [i] * 20 for i in range(50000)}\nprint(sum(len(v) for v in d.values()))",
    "1 / 0",
    "import sys\nsys.exit(3)",
    "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)",
    "raise KeyboardInterrupt",
    "import os\nos._exit(4)",
    "while True:\n    pass",
]


@pytest.fixture(scope="module")
def fast():
    with Sandbox(workers=2, timeout_s=1.0) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def reference():
    with Sandbox(workers=2, timeout_s=1.0, **REFERENCE) as sandbox:
        yield sandbox


def observable(result) -> tuple:
    return (result.status, result.exit_code, result.stdout, result.error_line)


def test_fast_and_reference_paths_agree(fast, reference):
    for run in ("one at a time", "batch"):
        if run == "batch":  # spares and on-demand forks both in play
            ours, theirs = fast.run_batch(SNIPPETS), reference.run_batch(SNIPPETS)
        else:
            ours = [fast.run(code) for code in SNIPPETS]
            theirs = [reference.run(code) for code in SNIPPETS]
        mismatches = [
            f"{code[:60]!r}:\n  fast      {observable(a)}\n  reference {observable(b)}"
            for code, a, b in zip(SNIPPETS, ours, theirs)
            if observable(a) != observable(b)
        ]
        assert not mismatches, f"{run}:\n" + "\n".join(mismatches)
    statuses = {r.status for r in ours}
    assert statuses >= {"ok", "error", "killed", "timeout"}, statuses
    assert_clean(fast)
    assert_clean(reference)


def test_isolation_facts_name_the_paths_taken(fast, reference):
    f, r = fast.isolation_facts, reference.isolation_facts
    assert f["fork"] == "native" and "native_fork_unavailable" not in f
    assert f["native_reseeding"] == ["random", "numpy"]
    assert f["aligned_arena_bytes"] > 0 and f["filled_blocks"] > 0
    assert r["fork"] == "os.fork" and "native_reseeding" not in r
    assert r["huge_page_bytes"] == 0 and "aligned_arena_bytes" not in r and "filled_blocks" not in r
    for facts in (f, r):
        if facts["seccomp"]:
            assert facts["seccomp_installed"] == "once, in the zygote"


@pytest.mark.parametrize("which", ["fast", "reference"])
def test_every_child_gets_fresh_seeds(which, fast, reference):
    sb = fast if which == "fast" else reference
    code = (
        "import random, numpy\nprint(random.getrandbits(64), numpy.random.randint(2**31), numpy.random.get_state()[2])"
    )
    outs = [sb.run(code).stdout for _ in range(4)] + [r.stdout for r in sb.run_batch([code] * 8)]
    draws = [line.split() for line in outs]
    assert all(len(d) == 3 for d in draws), outs
    assert len({d[0] for d in draws}) == len(draws), f"random repeats across children: {outs}"
    assert len({d[1] for d in draws}) == len(draws), f"numpy repeats across children: {outs}"


def _key_to_int(key: list[int]) -> int:
    return int.from_bytes(b"".join(w.to_bytes(4, "little") for w in key), "little")


@pytest.mark.parametrize("trial", range(3))
def test_direct_seeding_equals_python_seeding(trial):
    rng = random.Random(1000 + trial)
    key = [rng.getrandbits(32) for _ in range(624)]
    key[-1] |= 1  # all 624 words count in random.seed(int)
    seed = rng.getrandbits(32)

    direct = random.Random(0)
    _sandbox.seed_generators_directly(direct, None, key, 0)
    expected = random.Random(_key_to_int(key))
    assert direct.getstate()[:2] == expected.getstate()[:2]
    assert [direct.random() for _ in range(50)] == [expected.random() for _ in range(50)]

    state = numpy.random.RandomState(0)
    _sandbox.seed_generators_directly(None, state._bit_generator.capsule, [], seed)
    reference = numpy.random.RandomState(seed)
    got, want = state.get_state(legacy=False), reference.get_state(legacy=False)
    assert got["state"]["pos"] == want["state"]["pos"] == 624
    assert numpy.array_equal(got["state"]["key"], want["state"]["key"])
    assert numpy.array_equal(state.randint(0, 2**31, 100), reference.randint(0, 2**31, 100))


def test_direct_seeding_short_key_and_refusals():
    key = [7, 11, 13]
    direct = random.Random(0)
    _sandbox.seed_generators_directly(direct, None, key, 0)
    assert direct.getstate()[:2] == random.Random(_key_to_int(key)).getstate()[:2]
    with pytest.raises(ValueError):
        _sandbox.seed_generators_directly(direct, None, [], 0)
    with pytest.raises(ValueError):  # only the interpreter's generator objects are written to
        _sandbox.seed_generators_directly(object(), None, key, 0)


def _run_python(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh interpreter: what it changes stays out of this process."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_arena_pool_serves_aligned_chunks_then_plain_arenas():
    proc = _run_python(
        """
        import json
        from cir import _sandbox
        _sandbox.start_aligned_arenas()
        data = [(i, str(i)) for i in range(300_000)]   # tens of 1 MiB arenas
        during = _sandbox.aligned_arena_stats()
        assert sum(i for i, _ in data) == sum(range(300_000)) and data[123_456][1] == "123456"
        held = _sandbox.stop_aligned_arenas()
        after_stop = _sandbox.aligned_arena_stats()
        more = [(i, str(i)) for i in range(300_000)]   # served by plain mmap now
        later = _sandbox.aligned_arena_stats()
        assert more[-1] == (299_999, "299999")
        del data, more
        freed = _sandbox.aligned_arena_stats()
        print(json.dumps({"during": during, "held": held, "after_stop": after_stop, "later": later, "freed": freed}))
        """
    )
    r = __import__("json").loads(proc.stdout)
    during, later, freed = r["during"], r["later"], r["freed"]
    assert during["active"] and during["arenas"] >= 10 and during["chunks"] * 2 >= during["arenas"]
    assert r["held"] == r["after_stop"]["chunks"] * (2 << 20) > 0
    assert not later["active"]
    assert later["fallback_arenas"] >= during["fallback_arenas"] + 10  # new arenas, plain mmap
    assert later["chunks"] <= r["after_stop"]["chunks"]  # chunks are never handed out again
    assert freed["arenas"] < during["arenas"]  # emptied arenas went back (whole chunks unmapped)


def test_native_fork_plan_accepts_the_usual_handlers_only():
    proc = _run_python(
        """
        import json, os, random, threading, logging
        from cir.sandbox import zygote
        ok, hooks, why = zygote._native_fork_plan(True)
        usual = {"ok": ok, "hooks": [repr(h) for h in hooks], "why": why}
        off = zygote._native_fork_plan(False)
        os.register_at_fork(before=lambda: None)
        unknown = zygote._native_fork_plan(True)
        stop = threading.Event()
        t = threading.Thread(target=stop.wait)
        t.start()
        threaded = zygote._native_fork_plan(True)
        stop.set()
        t.join()
        print(json.dumps({"usual": usual, "off": off[0], "unknown": unknown[2], "threaded": threaded[2]}))
        """
    )
    r = __import__("json").loads(proc.stdout)
    assert r["usual"]["ok"] and r["usual"]["why"] == ""
    # random's reseeding is the one handler a child still needs (the others are redundant
    # in a single-threaded process).
    assert len(r["usual"]["hooks"]) == 1 and "Random.seed" in r["usual"]["hooks"][0]
    assert r["off"] is False
    assert r["unknown"].startswith("unknown at-fork handler (before)")
    assert r["threaded"] == "the zygote has more than one thread"
