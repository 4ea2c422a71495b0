"""`cir bench sandbox`: its corpus, ground-truth runner, baseline pool and end-to-end run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from cir.bench import sandbox as bench
from cir.bench.baseline_pool import PoolBaseline
from cir.bench.sandbox_corpus import LARGE_PRINT_CHARS, build_corpus, quick_subset
from cir.bench.sandbox_truth import Limits, Outcome, ground_truth, reference_outcomes
from cir.sandbox import classify, is_memory_error


def _corpus_digest(corpus) -> str:
    h = hashlib.sha256()
    for s in corpus:
        h.update(f"{s.id}\0{s.category}\0{s.expect}\0{s.code}\0".encode())
    return h.hexdigest()


# --- corpus ----------------------------------------------------------------------------------


def test_corpus_size_ids_and_mix():
    corpus = build_corpus()
    assert len(corpus) >= 300
    assert len({s.id for s in corpus}) == len(corpus)
    assert len({s.code for s in corpus}) == len(corpus)
    expect = Counter(s.expect for s in corpus)
    assert expect["error"] / len(corpus) >= 0.10
    assert sum(s.category == "infinite_loop" for s in corpus) >= 3
    assert expect["output_limit"] >= 3
    assert expect["memory"] >= 1
    assert expect["ok"] / len(corpus) >= 0.6
    categories = Counter(s.category for s in corpus)
    # A real mix: many categories, none dominating.
    assert len(categories) >= 20
    assert max(categories.values()) <= 0.15 * len(corpus)
    # The kinds of work the issue names are all there.
    text = "\n".join(s.code for s in corpus)
    for needle in (
        "solve(",
        "simplify(",
        "factor(",
        "summation(",
        "limit(",
        "integrate(",
        "Rational(",
        "itertools",
        "Fraction",
        "math.gcd",
        "comb(",
        "np.linalg",
        "while True",
    ):
        assert needle in text, needle


def test_corpus_snippets_compile_unless_meant_as_syntax_errors():
    for s in build_corpus():
        if s.category == "error_syntax":
            with pytest.raises(SyntaxError):
                compile(s.code, s.id, "exec")
        else:
            compile(s.code, s.id, "exec")


def test_large_prints_are_large():
    # Each large-print snippet, run for real, writes at least LARGE_PRINT_CHARS characters.
    large = [s for s in build_corpus() if s.expect == "output_limit"]
    limits = Limits(timeout_s=10, max_output_bytes=10**7)
    outs = reference_outcomes([s.code for s in large], limits, parallel=2, grace_s=5)
    for s, o in zip(large, outs):
        assert o.status == "ok", (s.id, o)
        assert len(o.stdout) >= LARGE_PRINT_CHARS, s.id


def test_corpus_is_deterministic_across_processes_and_hash_seeds():
    here = _corpus_digest(build_corpus())
    assert _corpus_digest(build_corpus()) == here
    script = (
        "import hashlib\nfrom cir.bench.sandbox_corpus import build_corpus\nh = hashlib.sha256()\n"
        "for s in build_corpus():\n    h.update(f'{s.id}\\0{s.category}\\0{s.expect}\\0{s.code}\\0'.encode())\n"
        "print(h.hexdigest())\n"
    )
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == here


def test_quick_subset_covers_every_status_in_order():
    corpus = build_corpus()
    quick = quick_subset(corpus)
    assert 8 <= len(quick) <= 20
    assert {s.expect for s in quick} == {"ok", "error", "timeout", "output_limit", "memory"}
    positions = [corpus.index(s) for s in quick]
    assert positions == sorted(positions)


# --- ground truth ----------------------------------------------------------------------------

KNOWN = {
    "ok": ("print(6 * 7)", "ok", "42\n"),
    "error": ("print('before')\n1/0", "error", "before\n"),
    "syntax": ("print((1, 2)", "error", ""),
    "timeout": ("while True:\n    pass", "timeout", ""),
    "memory": ("x = [0] * (10 ** 10)", "memory", ""),
    "numpy_memory": ("import numpy as np\nnp.zeros((10**5, 10**6))", "memory", ""),
    "output": ("print('x' * 5000)", "output_limit", "x" * 1000),
    "killed": ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "killed", ""),
    "stdin": ("print(input('n? '))", "timeout", "n? "),
    "exit0": ("import sys\nprint('done')\nsys.exit(0)", "ok", "done\n"),
    "exit3": ("import sys\nsys.exit(3)", "error", ""),
    "env": ("import os\nprint(os.environ.get('CIR_BENCH_SECRET', 'unset'))", "ok", "unset\n"),
}


@pytest.fixture(scope="module")
def known_truth():
    limits = Limits(timeout_s=1.0, memory_mb=1024, max_output_bytes=1000)
    os.environ["CIR_BENCH_SECRET"] = "visible"  # the reference interpreter must not see it
    try:
        names = list(KNOWN)
        t0 = time.monotonic()
        outs = reference_outcomes([KNOWN[n][0] for n in names], limits, parallel=2, grace_s=0.5)
        elapsed = time.monotonic() - t0
    finally:
        del os.environ["CIR_BENCH_SECRET"]
    return dict(zip(names, outs)), elapsed


@pytest.mark.parametrize("name", list(KNOWN))
def test_ground_truth_classifies_known_snippets(known_truth, name):
    outs, _ = known_truth
    _, status, stdout = KNOWN[name]
    assert outs[name].status == status, outs[name]
    assert outs[name].stdout == stdout


def test_ground_truth_error_lines_and_timeout_bound(known_truth):
    outs, elapsed = known_truth
    assert outs["error"].error_line == "ZeroDivisionError: division by zero"
    assert outs["syntax"].error_line.startswith("SyntaxError")
    assert is_memory_error(outs["numpy_memory"].error_line)
    # The infinite loop was stopped at timeout + grace, not left running.
    assert 1.4 <= outs["timeout"].wall_ms / 1000 < 5.0
    assert elapsed < 20


def test_ground_truth_kills_the_whole_process_group(tmp_path):
    marker = tmp_path / "grandchild_alive"
    grandchild = f"import time; time.sleep(1.5); open({str(marker)!r}, 'w').close()"
    code = (
        f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
        "print('spawned', flush=True)\nwhile True:\n    pass\n"
    )
    out = reference_outcomes([code], Limits(timeout_s=1.0), grace_s=0.3)[0]
    assert out.status == "timeout"
    assert out.stdout == "spawned\n"  # the grandchild existed when the group was killed
    time.sleep(2.0)
    assert not marker.exists()


def test_reference_status_order():
    # The reference is judged by the sandbox's own rule; `truncated`: more output than the cap.
    def status(exit_code, timed_out, truncated, stderr=""):
        return classify(exit_code=exit_code, stderr=stderr, timed_out=timed_out, truncated=truncated)

    assert status(-9, True, True, "MemoryError") == "timeout"
    assert status(0, False, True) == "output_limit"
    assert status(0, False, False) == "ok"
    assert status(-11, False, False) == "killed"
    assert status(1, False, False, "numpy._core._exceptions._ArrayMemoryError: Unable") == "memory"
    assert status(1, False, False, "ValueError: MemoryError mentioned in a message") == "error"


def test_ground_truth_cache_reuses_and_refreshes(tmp_path):
    limits = Limits(timeout_s=1.0)
    codes = ["print(1)", "print('a')\nraise ValueError('no')", "print(1)"]
    first, info1 = ground_truth(codes, limits, tmp_path, grace_s=0.5)
    assert info1["computed"] == 2 and info1["from_cache"] == 1
    assert [o.status for o in first] == ["ok", "error", "ok"]
    second, info2 = ground_truth(codes[:2], limits, tmp_path, grace_s=0.5)
    assert info2["computed"] == 0

    def view(outs):
        return [(o.status, o.stdout, o.error_line) for o in outs]

    assert view(second) == view(first[:2])
    third, info3 = ground_truth(codes[:1], limits, tmp_path, refresh=True, grace_s=0.5)
    assert info3["computed"] == 1 and third[0].stdout == "1\n"
    # A different limit is a different cache.
    _, info4 = ground_truth(codes[:1], Limits(timeout_s=1.5), tmp_path, grace_s=0.5)
    assert info4["computed"] == 1


# --- baseline --------------------------------------------------------------------------------

BASELINE_CASES = [
    ("print(sum(range(10)))", "ok", "45\n"),
    ("print('x')\n[][1]", "error", "x\n"),
    ("while True:\n    pass", "timeout", ""),
    ("print('y' * 3000)", "output_limit", "y" * 1000),
    ("print(2 ** 10)", "ok", "1024\n"),
]


@pytest.mark.parametrize("kind", ["pebble", "futures"])
def test_baseline_maps_statuses_and_cleans_up(kind):
    pool = PoolBaseline(2, Limits(timeout_s=0.5, max_output_bytes=1000), kind)
    before = set(bench.child_pids())
    outs = pool.run_batch([c for c, _, _ in BASELINE_CASES])
    assert [(o.status, o.stdout) for o in outs] == [(s, out) for _, s, out in BASELINE_CASES]
    assert outs[1].error_line == "IndexError: list index out of range"
    time.sleep(0.2)
    assert set(bench.child_pids()) <= before  # the stuck worker was killed, nothing left


def test_baseline_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown baseline kind"):
        PoolBaseline(2, Limits(), "threads")


# --- harness pieces --------------------------------------------------------------------------


def test_cpu_accounting_sees_children():
    before = bench.cpu_seconds_tree()
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    assert bench.cpu_seconds_tree() - before >= 0.35


def test_scoring_counts_spurious_timeouts_and_output_prefix():
    snippets = build_corpus()[:3]
    truth = [
        Outcome("ok", "1\n"),
        Outcome("error", "", "ZeroDivisionError: division by zero"),
        Outcome("output_limit", "z" * 1000),
    ]
    got = [
        Outcome("timeout", ""),
        Outcome("error", "", "ZeroDivisionError: division by zero"),
        Outcome("output_limit", "z" * 950 + "\n[output truncated]"),
    ]
    s = bench.score(snippets, truth, got, "full")
    assert s.spurious_timeouts == 1
    assert s.fidelity == pytest.approx(2 / 3)
    assert [m["id"] for m in s.mismatches] == [snippets[0].id]
    assert s.error_line_agreement == 1.0
    assert not bench.agrees(Outcome("output_limit", "z" * 1000), Outcome("output_limit", "q" * 1000))
    assert not bench.agrees(Outcome("ok", "1\n"), Outcome("ok", "1"))


def test_percentile_nearest_rank():
    values = list(range(1, 101))
    assert bench.percentile(values, 50) == 50
    assert bench.percentile(values, 99) == 99
    assert bench.percentile([3.0], 99) == 3.0
    assert bench.percentile([5, 1, 4, 2, 3], 50) == 3


def test_rss_of_self_is_positive():
    assert bench.rss_kib() > 1000


# --- end to end --------------------------------------------------------------------------------


def test_cli_quick_end_to_end(tmp_path):
    out_json = tmp_path / "bench.json"
    # One batch per run and a parent that has sympy already: the pool baseline would otherwise
    # spend most of the test importing sympy in fresh workers.
    cmd = [
        sys.executable,
        "-m",
        "cir",
        "bench",
        "sandbox",
        "--quick",
        "--timeout",
        "0.5",
        "--truth-grace",
        "1.5",
        "--n-trivial",
        "5",
        "--batch-size",
        "64",
        "--baseline",
        "pebble",
        "--warm-baseline-parent",
        "--leak-check",
        "200",
        "--truth-cache",
        str(tmp_path / "cache"),
        "--json",
        str(out_json),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert set(report) >= {"config", "machine", "ground_truth", "systems", "targets"}
    assert set(report["systems"]) == {"cir_sandbox", "baseline_pebble"}
    assert report["config"]["baseline_parent_preimported"] is True
    n = report["config"]["corpus_size"]
    assert n == len(quick_subset(build_corpus()))
    for system in report["systems"].values():
        for key in (
            "throughput_no_loops",
            "throughput_full",
            "trivial_p50_ms",
            "trivial_p99_ms",
            "cpu_s_no_loops",
            "cpu_s_full",
            "spurious_timeouts_no_loops",
            "spurious_timeouts_full",
            "fidelity",
            "fidelity_no_loops",
            "mismatches",
            "status_counts_full",
        ):
            assert key in system, key
        assert system["throughput_no_loops"] > 0 and system["cpu_s_full"] > 0
        assert sum(system["status_counts_full"].values()) == n
    ours = report["systems"]["cir_sandbox"]
    assert ours["rss_before"]["supervisor_kib"] > 0
    assert ours["leak_check"]["snippets"] == 200 and ours["leak_check"]["wrong_results"] == 0
    assert ours["leftover_children_after_close"] == 0
    assert "throughput, no infinite loops" in proc.stdout
