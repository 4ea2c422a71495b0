"""``cir bench sandbox``: the C++ sandbox against a process-pool baseline, one run, same machine.

Both systems run the same corpus (:mod:`cir.bench.sandbox_corpus`, in one fixed shuffled
order, in batches of ``--batch-size``) with the same workers, timeout, memory limit and output
cap, and are scored against the same fresh-interpreter ground truth
(:mod:`cir.bench.sandbox_truth`). Measured for each system:

* throughput (snippets/s) on the corpus without its infinite loops (and stdin reads, which
  never end either), and on the full corpus;
* latency of a trivial ``print(1)`` submitted alone, one after another (p50/p99). For the
  baseline that is a batch of one, so its pool is rebuilt each time, as that pattern does
  (at most ``BASELINE_TRIVIAL_MAX`` samples); the latency through a pool kept warm is reported
  beside it;
* CPU time (user+sys) of this process and all its descendants during each throughput run;
* spurious timeouts (a ``timeout`` where the ground truth is not one) and fidelity (share of
  snippets whose status and stdout equal the ground truth), with every mismatch listed;
* for the sandbox: start-up time, resident memory of the supervising process (this one) and of
  its zygote(s) before and after, and with ``--leak-check N`` the same memory sampled while N
  trivial snippets run (flat means no leak).

The baseline (:mod:`cir.bench.baseline_pool`) is by default a pebble pool rebuilt for every
batch of 64 whose workers are forked from this process, which has not imported sympy or numpy
(a rollout process usually has not): each new worker imports what its first snippets import.
``--warm-baseline-parent`` imports the preload modules here first, so workers inherit them;
``--batch-size`` sets how many snippets share one pool; ``--baseline futures`` uses
``ProcessPoolExecutor`` instead. All three change its numbers a lot: report which was used.

Timing is wall-clock on a machine that may be shared: the load average at start and end is
recorded in the JSON so a reader can judge.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cir.bench.baseline_pool import BASELINE_KINDS, PoolBaseline, exec_snippet
from cir.bench.sandbox_corpus import Snippet, build_corpus, quick_subset
from cir.bench.sandbox_truth import DEFAULT_GRACE_S, Limits, Outcome, ground_truth, to_outcome
from cir.sandbox.config import DEFAULT_PRELOAD, SandboxConfig

ORDER_SEED = "cir-bench-sandbox-order"
TRIVIAL_CODE = "print(1)\n"
# The baseline rebuilds its pool for each print(1) (a batch of one), ~0.1 s a time: fewer samples
# keep the run short and still give a p99.
BASELINE_TRIVIAL_MAX = 200
# A supervisor or zygote whose RSS grows by no more than this over the leak check is "flat".
FLAT_RSS_TOLERANCE_KIB = 2048
# When both sides hit the output cap, the kept output must share at least this fraction of the
# reference's kept output as a common prefix (the executor may keep a little less and append a
# truncation marker).
OUTPUT_LIMIT_PREFIX_SHARE = 0.9


def register(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--workers", type=int, default=2, help="snippets run at once, both systems (default 2)")
    add("--timeout", type=float, default=2.0, help="wall-clock limit per snippet, seconds (default 2.0)")
    add("--memory-mb", type=int, default=2048, help="address-space limit per snippet, MiB (default 2048)")
    add("--max-output-bytes", type=int, default=65536, help="stdout cap per snippet (default 65536)")
    add("--n-trivial", type=int, default=None, help="sequential print(1) round trips (default 500; 20 with --quick)")
    add(
        "--batch-size",
        type=int,
        default=64,
        help="snippets per run_batch call, both systems; the baseline builds a new pool per batch (default 64)",
    )
    add(
        "--baseline",
        choices=[*BASELINE_KINDS, "both"],
        default="pebble",
        help="pool flavour of the baseline (default pebble; see cir.bench.baseline_pool)",
    )
    add(
        "--repeats",
        type=int,
        default=3,
        help="runs of the corpus without infinite loops per system; throughput and CPU are the medians "
        "(a run lasts ~1-4 s, so one run is noisy), fidelity and spurious timeouts the worst (default 3)",
    )
    add("--no-baseline", action="store_true", help="measure the sandbox only")
    add("--no-sandbox", action="store_true", help="measure the baseline only")
    add(
        "--warm-baseline-parent",
        action="store_true",
        help="import the preload modules in this process before the baseline forks its workers, so they inherit "
        "them (default: workers import what a snippet imports, as in a rollout process without sympy)",
    )
    add(
        "--leak-check",
        type=int,
        nargs="?",
        const=10000,
        default=0,
        metavar="N",
        help="run N trivial snippets (default N 10000) and sample the sandbox's RSS",
    )
    add("--quick", action="store_true", help="a small corpus subset and few trivial runs (a smoke test)")
    add("--json", type=Path, default=None, metavar="OUT.json", help="write all results here")
    add(
        "--truth-cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="where ground-truth results are cached (default ~/.cache/cir)",
    )
    add("--refresh-truth", action="store_true", help="recompute the ground truth even if cached")
    add("--truth-parallel", type=int, default=2, help="fresh interpreters run at once for the ground truth (default 2)")
    add(
        "--truth-grace",
        type=float,
        default=DEFAULT_GRACE_S,
        help="extra wall-clock seconds a fresh reference interpreter gets for its own start-up and imports "
        f"(default {DEFAULT_GRACE_S})",
    )
    add(
        "--preload",
        default=",".join(DEFAULT_PRELOAD),
        help=f"modules the sandbox imports once in its zygote (default {','.join(DEFAULT_PRELOAD)})",
    )


# ---------------------------------------------------------------------------------------------
# process accounting (Linux /proc; no extra dependency)
# ---------------------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards), or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def child_pids(parent: int | None = None) -> list[int]:
    """Live direct children of ``parent`` (default: this process)."""
    parent = os.getpid() if parent is None else parent
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == parent:
                out.append(int(entry))
    return sorted(out)


def cpu_seconds_tree() -> float:
    """User+sys seconds used so far by this process and every descendant.

    This process (all threads) + children already reaped (RUSAGE_CHILDREN) + each live child's
    own time and that of the descendants it has reaped (/proc utime, stime, cutime, cstime).
    Differences of two readings give the CPU used in between.
    """
    me = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = me.ru_utime + me.ru_stime + reaped.ru_utime + reaped.ru_stime
    for pid in child_pids():
        fields = _stat_fields(pid)
        if fields is not None:
            total += sum(int(fields[k]) for k in (11, 12, 13, 14)) / _CLK_TCK
    return total


def rss_kib(pid: int | None = None) -> int | None:
    """Resident set size of ``pid`` (default: this process) in KiB, or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------------------------
# the systems under test
# ---------------------------------------------------------------------------------------------


class SandboxSystem:
    """``cir.sandbox.Sandbox`` behind the interface the harness measures."""

    def __init__(self, workers: int, limits: Limits, preload: Sequence[str]) -> None:
        from cir.sandbox.client import Sandbox

        self.name = "cir_sandbox"
        self.label = "cir.sandbox"
        self.limits = limits
        config = SandboxConfig(
            workers=workers,
            timeout_s=limits.timeout_s,
            memory_mb=limits.memory_mb,
            max_output_bytes=limits.max_output_bytes,
            preload=list(preload),
        )
        t0 = time.perf_counter()
        self._sandbox = Sandbox.from_config(config)
        self.startup_s = time.perf_counter() - t0

    def run_batch(self, codes: Sequence[str], on_done: Callable[[int], None] | None = None) -> list[Outcome]:
        results = [to_outcome(r, self.limits) for r in self._sandbox.run_batch(list(codes))]
        if on_done is not None:
            on_done(len(codes))
        return results

    def run_one(self, code: str) -> Outcome:
        return to_outcome(self._sandbox.run(code), self.limits)

    def helper_pids(self) -> list[int]:
        """The long-lived process the sandbox keeps: its zygote (from ``stats()``)."""
        pid = self._sandbox.stats().get("zygote_pid")
        return [int(pid)] if pid else []

    def close(self) -> None:
        self._sandbox.close()


class BaselineSystem:
    """:class:`PoolBaseline` behind the same interface; ``run_one`` is a batch of one."""

    def __init__(self, workers: int, limits: Limits, kind: str) -> None:
        self.name = f"baseline_{kind}"
        self.label = f"baseline ({kind})"
        self.kind = kind
        self.workers = workers
        self.limits = limits
        t0 = time.perf_counter()
        self._pool = PoolBaseline(workers, limits, kind)
        self.startup_s = time.perf_counter() - t0

    def run_batch(self, codes: Sequence[str], on_done: Callable[[int], None] | None = None) -> list[Outcome]:
        return self._pool.run_batch(codes, on_done)

    def run_one(self, code: str) -> Outcome:
        return self._pool.run_batch([code])[0]

    def helper_pids(self) -> list[int]:
        return []

    def close(self) -> None:
        pass

    def warm_pool_latencies(self, n: int) -> list[float]:
        """print(1) round trips through one pool kept open (what a persistent pool would give)."""
        cap = self.limits.max_output_bytes
        lat: list[float] = []
        if self.kind == "pebble":
            import pebble

            with pebble.ProcessPool(max_workers=self.workers) as pool:
                pool.schedule(exec_snippet, args=(TRIVIAL_CODE, cap)).result()  # start the workers
                for _ in range(n):
                    t0 = time.perf_counter()
                    pool.schedule(exec_snippet, args=(TRIVIAL_CODE, cap), timeout=self.limits.timeout_s).result()
                    lat.append((time.perf_counter() - t0) * 1000.0)
        else:
            import concurrent.futures

            with concurrent.futures.ProcessPoolExecutor(max_workers=self.workers) as pool:
                pool.submit(exec_snippet, TRIVIAL_CODE, cap).result()
                for _ in range(n):
                    t0 = time.perf_counter()
                    pool.submit(exec_snippet, TRIVIAL_CODE, cap).result(timeout=self.limits.timeout_s)
                    lat.append((time.perf_counter() - t0) * 1000.0)
        return lat


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------


def stdout_matches(truth: Outcome, got: Outcome) -> bool:
    """Exact equality, except when both hit the output cap: then a long common prefix."""
    if truth.status == "output_limit" and got.status == "output_limit":
        need = int(len(truth.stdout) * OUTPUT_LIMIT_PREFIX_SHARE)
        return got.stdout[:need] == truth.stdout[:need]
    return truth.stdout == got.stdout


def agrees(truth: Outcome, got: Outcome) -> bool:
    return truth.status == got.status and stdout_matches(truth, got)


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[:n] + f"...(+{len(text) - n} chars)"


def describe_mismatch(snippet: Snippet, truth: Outcome, got: Outcome, run: str) -> dict:
    diff_at = next(
        (i for i, (a, b) in enumerate(zip(truth.stdout, got.stdout)) if a != b), min(len(truth.stdout), len(got.stdout))
    )
    return {
        "id": snippet.id,
        "category": snippet.category,
        "run": run,
        "expected_status": truth.status,
        "got_status": got.status,
        "stdout_equal": stdout_matches(truth, got),
        "first_stdout_difference_at": None if stdout_matches(truth, got) else diff_at,
        "expected_stdout": _clip(truth.stdout),
        "got_stdout": _clip(got.stdout),
        "expected_error_line": truth.error_line,
        "got_error_line": got.error_line,
        "code": snippet.code,
    }


@dataclass
class RunScore:
    fidelity: float
    spurious_timeouts: int
    mismatches: list[dict] = field(default_factory=list)
    error_line_agreement: float | None = None


def score(snippets: Sequence[Snippet], truth: Sequence[Outcome], got: Sequence[Outcome], run: str) -> RunScore:
    if not snippets:
        return RunScore(1.0, 0)
    matches = sum(agrees(t, g) for t, g in zip(truth, got))
    spurious = sum(g.status == "timeout" and t.status != "timeout" for t, g in zip(truth, got))
    mismatches = [describe_mismatch(s, t, g, run) for s, t, g in zip(snippets, truth, got) if not agrees(t, g)]
    both_err = [(t, g) for t, g in zip(truth, got) if t.status == "error" and g.status == "error"]
    err_agree = sum(t.error_line == g.error_line for t, g in both_err) / len(both_err) if both_err else None
    return RunScore(matches / len(snippets), spurious, mismatches, err_agree)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------


class Progress:
    """A one-line counter on stderr, redrawn at most ten times a second, only on a terminal."""

    def __init__(self, label: str, total: int, enabled: bool | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._t0 = time.perf_counter()
        self._last = 0.0
        self._drawn = False

    def advance(self, k: int = 1) -> None:
        self.set(self.done + k)

    def set(self, done: int) -> None:
        self.done = done
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or done >= self.total):
            self._last = now
            self._drawn = True
            rate = done / max(now - self._t0, 1e-9)
            sys.stderr.write(f"\r  {self.label}: {done}/{self.total} ({rate:.1f}/s)   ")
            sys.stderr.flush()

    def close(self) -> None:
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------


def run_corpus(system, snippets: Sequence[Snippet], batch_size: int, label: str) -> tuple[list[Outcome], float, float]:
    """Run ``snippets`` through ``system`` in batches; returns (outcomes, wall s, CPU s)."""
    progress = Progress(f"{system.label} {label}", len(snippets))
    outcomes: list[Outcome] = []
    cpu0, t0 = cpu_seconds_tree(), time.perf_counter()
    for start in range(0, len(snippets), batch_size):
        batch = [s.code for s in snippets[start : start + batch_size]]
        base = len(outcomes)
        outcomes.extend(system.run_batch(batch, lambda k, base=base: progress.set(base + k)))
    wall, cpu = time.perf_counter() - t0, cpu_seconds_tree() - cpu0
    progress.close()
    return outcomes, wall, cpu


def trivial_latencies(system, n: int) -> tuple[list[float], int]:
    """``n`` sequential print(1) round trips; returns (latencies in ms, wrong answers)."""
    progress = Progress(f"{system.label} print(1)", n)
    lat, wrong = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        out = system.run_one(TRIVIAL_CODE)
        lat.append((time.perf_counter() - t0) * 1000.0)
        wrong += not (out.status == "ok" and out.stdout == "1\n")
        progress.advance()
    progress.close()
    return lat, wrong


def helper_rss_kib(system) -> int | None:
    sizes = [rss_kib(pid) for pid in system.helper_pids()]
    sizes = [s for s in sizes if s is not None]
    return sum(sizes) if sizes else None


def leak_check(system, n: int, samples: int = 20) -> dict:
    """Run ``n`` trivial snippets in ``samples`` chunks and record memory, fds and children after each."""
    chunk = max(1, n // samples)
    rows = []
    progress = Progress(f"{system.label} leak check", n)
    done = 0
    while done < n:
        k = min(chunk, n - done)
        outs = system.run_batch([TRIVIAL_CODE] * k)
        bad = sum(not (o.status == "ok" and o.stdout == "1\n") for o in outs)
        done += k
        rows.append(
            {
                "snippets": done,
                "supervisor_rss_kib": rss_kib(),
                "zygote_rss_kib": helper_rss_kib(system),
                "open_fds": open_fd_count(),
                "children": len(child_pids()),
                "wrong_results": bad,
            }
        )
        progress.set(done)
    progress.close()
    # Growth is measured from the first sample, i.e. after the first chunk warmed everything up.
    first, last = rows[0], rows[-1]
    sup_growth = last["supervisor_rss_kib"] - first["supervisor_rss_kib"]
    zyg_growth = (
        last["zygote_rss_kib"] - first["zygote_rss_kib"]
        if last["zygote_rss_kib"] is not None and first["zygote_rss_kib"] is not None
        else None
    )
    flat = (
        sup_growth <= FLAT_RSS_TOLERANCE_KIB
        and (zyg_growth is None or zyg_growth <= FLAT_RSS_TOLERANCE_KIB)
        and last["open_fds"] <= first["open_fds"]
    )
    return {
        "snippets": n,
        "samples": rows,
        "supervisor_rss_growth_kib": sup_growth,
        "zygote_rss_growth_kib": zyg_growth,
        "fd_growth": last["open_fds"] - first["open_fds"],
        "wrong_results": sum(r["wrong_results"] for r in rows),
        "flat": flat,
        "tolerance_kib": FLAT_RSS_TOLERANCE_KIB,
    }


def measure(
    system,
    corpus: Sequence[Snippet],
    truth: Sequence[Outcome],
    batch_size: int,
    n_trivial: int,
    leak_n: int = 0,
    repeats: int = 1,
) -> dict:
    """Every metric of one system (see the module docstring)."""
    no_loop_idx = [i for i, s in enumerate(corpus) if not s.is_infinite]
    no_loop = [corpus[i] for i in no_loop_idx]
    no_loop_truth = [truth[i] for i in no_loop_idx]
    result: dict = {"label": system.label, "startup_s": round(system.startup_s, 4)}
    rss_before = {"supervisor_kib": rss_kib(), "zygote_kib": helper_rss_kib(system)}

    runs_nl = []
    for r in range(max(1, repeats)):
        label = "corpus without infinite loops" + (f" ({r + 1}/{repeats})" if repeats > 1 else "")
        outs, wall, cpu = run_corpus(system, no_loop, batch_size, label)
        runs_nl.append((wall, cpu, score(no_loop, no_loop_truth, outs, "no_loops")))
    by_wall = sorted(runs_nl, key=lambda run: run[0])
    wall_nl = by_wall[len(by_wall) // 2][0]
    cpu_nl = sorted(run[1] for run in runs_nl)[len(runs_nl) // 2]
    s_nl = min((run[2] for run in runs_nl), key=lambda sc: (sc.fidelity, -sc.spurious_timeouts))
    outs_full, wall_full, cpu_full = run_corpus(system, corpus, batch_size, "full corpus")
    if isinstance(system, BaselineSystem):
        n_trivial = min(n_trivial, BASELINE_TRIVIAL_MAX)
    lat, wrong = trivial_latencies(system, n_trivial) if n_trivial > 0 else ([], 0)
    rss_after = {"supervisor_kib": rss_kib(), "zygote_kib": helper_rss_kib(system)}

    s_full = score(corpus, truth, outs_full, "full")
    result.update(
        {
            "snippets_no_loops": len(no_loop),
            "snippets_full": len(corpus),
            "throughput_no_loops": len(no_loop) / wall_nl,
            "throughput_no_loops_runs": [len(no_loop) / run[0] for run in runs_nl],
            "throughput_full": len(corpus) / wall_full,
            "wall_s_no_loops": wall_nl,
            "wall_s_full": wall_full,
            "cpu_s_no_loops": cpu_nl,
            "cpu_s_full": cpu_full,
            "cpu_ms_per_snippet_no_loops": 1000.0 * cpu_nl / max(1, len(no_loop)),
            "trivial_n": len(lat),
            "trivial_p50_ms": percentile(lat, 50) if lat else None,
            "trivial_p99_ms": percentile(lat, 99) if lat else None,
            "trivial_mean_ms": sum(lat) / len(lat) if lat else None,
            "trivial_wrong": wrong,
            "spurious_timeouts_no_loops": s_nl.spurious_timeouts,
            "spurious_timeouts_full": s_full.spurious_timeouts,
            "fidelity": s_full.fidelity,
            "fidelity_no_loops": s_nl.fidelity,
            "error_line_agreement": s_full.error_line_agreement,
            "status_counts_full": dict(Counter(o.status for o in outs_full)),
            "rss_before": rss_before,
            "rss_after": rss_after,
            "mismatches": s_nl.mismatches + s_full.mismatches,
        }
    )
    if isinstance(system, BaselineSystem) and n_trivial > 0:
        warm = system.warm_pool_latencies(n_trivial)
        result["trivial_warm_pool_p50_ms"] = percentile(warm, 50)
        result["trivial_warm_pool_p99_ms"] = percentile(warm, 99)
    if leak_n > 0:
        result["leak_check"] = leak_check(system, leak_n)
    return result


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

# (label, key, format, ratio?)
_ROWS: list[tuple[str, str, str, bool]] = [
    ("throughput, no infinite loops (snippets/s)", "throughput_no_loops", "{:.1f}", True),
    ("throughput, full corpus (snippets/s)", "throughput_full", "{:.1f}", True),
    ("print(1) round trip p50 (ms)", "trivial_p50_ms", "{:.2f}", True),
    ("print(1) round trip p99 (ms)", "trivial_p99_ms", "{:.2f}", True),
    ("print(1) p50, pool kept warm (ms)", "trivial_warm_pool_p50_ms", "{:.2f}", False),
    ("CPU, run without loops (s)", "cpu_s_no_loops", "{:.2f}", True),
    ("CPU per snippet, without loops (ms)", "cpu_ms_per_snippet_no_loops", "{:.2f}", True),
    ("CPU, full-corpus run (s)", "cpu_s_full", "{:.2f}", True),
    ("spurious timeouts, run without loops", "spurious_timeouts_no_loops", "{:d}", False),
    ("spurious timeouts, full-corpus run", "spurious_timeouts_full", "{:d}", False),
    ("fidelity, full corpus (status+stdout)", "fidelity", "{:.1%}", False),
    ("fidelity, run without loops", "fidelity_no_loops", "{:.1%}", False),
    ("error line = reference (both error)", "error_line_agreement", "{:.1%}", False),
    ("start-up (s)", "startup_s", "{:.2f}", False),
]


def _fmt(fmt: str, value) -> str:
    if value is None:
        return "-"
    return fmt.format(value)


def render_table(report: dict) -> str:
    systems = list(report["systems"].values())
    ours = report["systems"].get("cir_sandbox")
    baselines = [s for k, s in report["systems"].items() if k != "cir_sandbox"]
    header = ["metric"] + [s["label"] for s in systems]
    if ours is not None:
        header += [f"ours/{b['label']}" for b in baselines]
    rows = [header]
    for label, key, fmt, ratio in _ROWS:
        if all(s.get(key) is None for s in systems):
            continue
        row = [label] + [_fmt(fmt, s.get(key)) for s in systems]
        if ours is not None:
            for b in baselines:
                a, c = ours.get(key), b.get(key)
                row.append(f"{a / c:.2f}x" if ratio and a is not None and c else "")
        rows.append(row)
    if ours is not None:
        for key, label in (
            ("supervisor_kib", "supervisor RSS before -> after (MiB)"),
            ("zygote_kib", "zygote RSS before -> after (MiB)"),
        ):
            before, after = ours["rss_before"].get(key), ours["rss_after"].get(key)
            cell = f"{_mib(before)} -> {_mib(after)}"
            rows.append([label] + [cell if s is ours else "" for s in systems] + [""] * len(baselines))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def render_report(report: dict) -> str:
    cfg, gt = report["config"], report["ground_truth"]
    out = [
        f"cir bench sandbox: {cfg['corpus_size']} snippets ({cfg['no_loop_size']} without infinite loops), "
        f"workers={cfg['workers']}, timeout={cfg['timeout_s']} s, memory={cfg['memory_mb']} MiB, "
        f"output cap={cfg['max_output_bytes']} B, batch={cfg['batch_size']}",
        f"machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, "
        f"load average {report['machine']['loadavg_start']} -> {report['machine']['loadavg_end']}",
        f"ground truth: {gt['computed']} computed, {gt['from_cache']} from cache ({gt['cache_file']})"
        + (
            f"; finished after more than the timeout (status ambiguous): {', '.join(gt['near_timeout'])}"
            if gt["near_timeout"]
            else ""
        ),
        "",
        render_table(report),
    ]
    leak = report["systems"].get("cir_sandbox", {}).get("leak_check")
    if leak:
        s = leak["samples"]
        out += [
            "",
            f"leak check ({leak['snippets']} print(1) snippets): supervisor RSS "
            f"{_mib(s[0]['supervisor_rss_kib'])} -> {_mib(s[-1]['supervisor_rss_kib'])} MiB, zygote RSS "
            f"{_mib(s[0]['zygote_rss_kib'])} -> {_mib(s[-1]['zygote_rss_kib'])} MiB, open fds "
            f"{s[0]['open_fds']} -> {s[-1]['open_fds']}, wrong results {leak['wrong_results']}: "
            f"{'flat' if leak['flat'] else 'GROWING'}",
        ]
    for system in report["systems"].values():
        mm = system["mismatches"]
        if not mm:
            continue
        out += ["", f"{system['label']}: {len(mm)} mismatches against the ground truth"]
        for m in mm[:40]:
            out.append(
                f"  [{m['run']}] {m['id']} ({m['category']}): expected {m['expected_status']} "
                f"{m['expected_stdout']!r}, got {m['got_status']} {m['got_stdout']!r}"
                + (f" / error {m['got_error_line']!r}" if m["got_error_line"] else "")
            )
        if len(mm) > 40:
            out.append(f"  ... {len(mm) - 40} more in the JSON")
    if report.get("targets"):
        out += ["", "issue targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in report["targets"].items())]
    if gt["expect_disagreements"]:
        out += ["", "corpus note: the ground truth differs from what these templates meant to produce:"]
        out += [f"  {d['id']}: meant {d['expect']}, got {d['status']}" for d in gt["expect_disagreements"]]
    return "\n".join(out)


def _targets(report: dict) -> dict:
    ours = report["systems"].get("cir_sandbox")
    if ours is None:
        return {}
    t = {
        "throughput_no_loops_at_least_200": ours["throughput_no_loops"] >= 200,
        "trivial_p50_under_5ms": ours["trivial_p50_ms"] is not None and ours["trivial_p50_ms"] < 5.0,
        "fidelity_100": ours["fidelity"] == 1.0 and ours["fidelity_no_loops"] == 1.0,
        "zero_spurious_timeouts": ours["spurious_timeouts_no_loops"] == 0 and ours["spurious_timeouts_full"] == 0,
    }
    for key, b in report["systems"].items():
        if key != "cir_sandbox":
            t[f"at_least_10x_{key}"] = ours["throughput_no_loops"] >= 10 * b["throughput_no_loops"]
    if "leak_check" in ours:
        t["rss_flat"] = ours["leak_check"]["flat"]
    return t


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def benchmark_order(corpus: Sequence[Snippet]) -> list[Snippet]:
    """The corpus in the one fixed shuffled order both systems see (kinds mixed, as in a rollout)."""
    order = list(corpus)
    random.Random(ORDER_SEED).shuffle(order)
    return order


def _check_args(args: argparse.Namespace) -> None:
    for name in ("workers", "batch_size", "truth_parallel"):
        if getattr(args, name) < 1:
            raise SystemExit(f"cir bench sandbox: --{name.replace('_', '-')} must be >= 1")
    if args.truth_grace < 0:
        raise SystemExit("cir bench sandbox: --truth-grace must be >= 0")
    if args.no_sandbox and args.no_baseline:
        raise SystemExit("cir bench sandbox: --no-sandbox and --no-baseline leave nothing to measure")
    if args.n_trivial is not None and args.n_trivial < 0:
        raise SystemExit("cir bench sandbox: --n-trivial must be >= 0")
    if args.leak_check < 0:
        raise SystemExit("cir bench sandbox: --leak-check must be >= 0")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    try:
        limits = Limits(args.timeout, args.memory_mb, args.max_output_bytes)
    except ValueError as exc:
        raise SystemExit(f"cir bench sandbox: {exc}") from None
    preload = tuple(m.strip() for m in args.preload.split(",") if m.strip())
    n_trivial = args.n_trivial if args.n_trivial is not None else (20 if args.quick else 500)
    corpus = build_corpus()
    if args.quick:
        corpus = quick_subset(corpus)
    corpus = benchmark_order(corpus)
    codes = [s.code for s in corpus]
    loadavg_start = [round(x, 2) for x in os.getloadavg()]

    say(f"ground truth for {len(corpus)} snippets (fresh interpreter each)...")
    progress = Progress("ground truth", len(corpus))

    def on_truth(done: int, total: int) -> None:
        progress.total = total  # only the snippets missing from the cache are run
        progress.set(done)

    truth, truth_info = ground_truth(
        codes, limits, args.truth_cache, args.refresh_truth, args.truth_parallel, on_truth, grace_s=args.truth_grace
    )
    progress.close()
    truth_info["status_counts"] = dict(Counter(t.status for t in truth))
    truth_info["expect_disagreements"] = [
        {"id": s.id, "expect": s.expect, "status": t.status} for s, t in zip(corpus, truth) if s.expect != t.status
    ]
    # A reference run that finished but took longer than the limit itself: its status is ambiguous.
    truth_info["near_timeout"] = [
        s.id for s, t in zip(corpus, truth) if t.status != "timeout" and t.wall_ms > 1000 * limits.timeout_s
    ]

    report: dict = {
        "config": {
            "workers": args.workers,
            "timeout_s": limits.timeout_s,
            "memory_mb": limits.memory_mb,
            "max_output_bytes": limits.max_output_bytes,
            "batch_size": args.batch_size,
            "n_trivial": n_trivial,
            "quick": bool(args.quick),
            "preload": list(preload),
            "corpus_size": len(corpus),
            "no_loop_size": sum(not s.is_infinite for s in corpus),
            "leak_check": args.leak_check,
            "baseline": None if args.no_baseline else args.baseline,
            "baseline_parent_preimported": not args.no_baseline and args.warm_baseline_parent,
            "categories": dict(Counter(s.category for s in corpus)),
        },
        "machine": {
            "platform": f"{platform.system()} {platform.machine()}",
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "loadavg_start": loadavg_start,
        },
        "ground_truth": truth_info,
        "systems": {},
    }
    exit_code = 0

    ours = None
    if not args.no_sandbox:
        try:
            say(f"cir.sandbox: starting {args.workers} workers (preload: {', '.join(preload)})...")
            ours = SandboxSystem(args.workers, limits, preload)
        except ImportError as exc:
            say(f"cir.sandbox is not importable ({exc}); measuring the baseline only")
            exit_code = 1
    if ours is not None:
        try:
            report["systems"]["cir_sandbox"] = measure(
                ours,
                corpus,
                truth,
                args.batch_size,
                n_trivial,
                args.leak_check,
                repeats=1 if args.quick else args.repeats,
            )
        finally:
            ours.close()
        report["systems"]["cir_sandbox"]["leftover_children_after_close"] = len(child_pids())

    if not args.no_baseline:
        if args.warm_baseline_parent:
            # As in a trainer process that already imported these (a reward checker that uses
            # sympy, say): pool workers forked from it inherit them.
            for module in preload:
                with contextlib.suppress(ImportError):
                    importlib.import_module(module)
        kinds = list(BASELINE_KINDS) if args.baseline == "both" else [args.baseline]
        for kind in kinds:
            say(f"baseline: {kind} pool of {args.workers} workers, rebuilt per batch of {args.batch_size}...")
            base = BaselineSystem(args.workers, limits, kind)
            report["systems"][base.name] = measure(
                base, corpus, truth, args.batch_size, n_trivial, repeats=1 if args.quick else args.repeats
            )

    report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["targets"] = _targets(report)
    print(render_report(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float))
        say(f"wrote {args.json}")
    return exit_code
