"""Evaluation numbers as pure functions of graded samples: pass@k, maj@k, avg@k, tool use.

Nothing here runs a model or a grader: the inputs are per-sample rows (the JSONL `cir eval`
writes) and, for maj@k, each sample's answer group (`cir.evaluation.grading.answer_groups`), so
every number in a report can be recomputed from the files.

A row whose ``fault`` is set (the sandbox could not run a tool call, or the grader could not
decide: `cir.rewards.RewardResult.fault`) was not graded: it is left out of every number here,
never scored as wrong, and counted apart under ``faults`` (``sandbox`` / ``grader`` samples).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from math import comb

# Problem fields a benchmark is broken down by when its rows carry them (MATH500: subject and
# level; OlymMATH: subject; the demo task: category).
BREAKDOWN_FIELDS = ("category", "subject", "level", "difficulty", "type")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from `n` samples of which `c` are correct:
    1 - C(n-c, k) / C(n, k), the chance that k samples drawn without replacement hold a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def ks_up_to(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n, and n itself."""
    if n < 1:
        raise ValueError(f"need at least one sample, got {n}")
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def majority_correct(groups: Sequence[int | None], correct: Sequence[bool], k: int) -> bool:
    """maj@k of one problem: the answer group most frequent among the first `k` samples wins
    (a tie goes to the group that appeared first); correct when its answer is.

    groups: each sample's answer group (equal labels: equivalent answers; None: no answer).
    """
    if not 1 <= k <= len(groups) or len(groups) != len(correct):
        raise ValueError(f"maj@{k} of {len(groups)} samples with {len(correct)} grades")
    first = list(groups[:k])
    counts = Counter(g for g in first if g is not None)
    if not counts:
        return False
    best = max(counts.values())
    winner = next(i for i, g in enumerate(first) if g is not None and counts[g] == best)
    return bool(correct[winner])


def _per_problem(rows: Sequence[dict]) -> dict[str, list[dict]]:
    problems: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        problems[str(row["id"])].append(row)
    for samples in problems.values():
        samples.sort(key=lambda r: r["sample"])
    return problems


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def fault_counts(rows: Sequence[dict]) -> dict[str, int]:
    """Samples left ungraded by the machine: sandbox faults, and the grader's (timeouts, crashes)."""
    faulted = [r["fault"] for r in rows if r.get("fault")]
    sandbox = sum(fault == "sandbox" for fault in faulted)
    return {"sandbox": sandbox, "grader": len(faulted) - sandbox}


def scored_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows that were graded (no fault): the ones every number is computed from."""
    return [r for r in rows if not r.get("fault")]


def summarise(rows: Sequence[dict], *, temperature: float, groups: dict[str, list[int | None]] | None = None) -> dict:
    """The numbers of one benchmark (or one subject of it) from its per-sample rows.

    groups: problem id -> answer group of each sample (sample order), for maj@k; without it
    maj@k is left out. A problem's samples are its graded rows in sample order (faulted rows are
    left out, with their groups, and counted in ``faults``); pass@k and maj@k use k up to the
    fewest graded samples any problem has, and a problem none of whose samples was graded is
    not counted.
    """
    faults = fault_counts(rows)
    if groups is not None:
        groups = {
            pid: [g for g, r in zip(groups[pid], samples) if not r.get("fault")]
            for pid, samples in _per_problem(rows).items()
        }
    rows = scored_rows(rows)
    problems = _per_problem(rows)
    if not problems:
        return {"problems": 0, "samples": 0, "faults": faults}
    n_min = min(len(s) for s in problems.values())
    ks = ks_up_to(n_min)
    calls = sum(r["tool_calls"] for r in rows)
    used_tool = [r for r in rows if r["tool_calls"] > 0]
    no_tool = [r for r in rows if r["tool_calls"] == 0]
    correct = [r for r in rows if r["correct"]]
    accuracy = _mean(r["correct"] for r in rows)
    out = {
        "problems": len(problems),
        "samples": n_min,
        "temperature": temperature,
        "protocol": "greedy" if temperature == 0 else f"avg@{n_min}",
        # The headline number: greedy accuracy when greedy, else the mean accuracy over samples.
        "score": accuracy,
        "accuracy": accuracy,
        f"avg@{n_min}": _mean(_mean(r["correct"] for r in s) for s in problems.values()),
        "pass@k": {
            str(k): _mean(pass_at_k(len(s), sum(r["correct"] for r in s), k) for s in problems.values()) for k in ks
        },
    }
    if groups is not None:
        out["maj@k"] = {
            str(k): _mean(majority_correct(groups[pid], [r["correct"] for r in s], k) for pid, s in problems.items())
            for k in ks
        }
    out.update(
        {
            "tool_calls": calls / len(rows),
            "tool_use_rate": len(used_tool) / len(rows),
            "exec_error_rate": sum(r["exec_errors"] for r in rows) / calls if calls else 0.0,
            "timeout_rate": sum(r["timeouts"] for r in rows) / calls if calls else 0.0,
            "accuracy_with_tool": _mean(r["correct"] for r in used_tool) if used_tool else None,
            "accuracy_without_tool": _mean(r["correct"] for r in no_tool) if no_tool else None,
            "correct_with_tool_share": _mean(r["tool_calls"] > 0 for r in correct) if correct else None,
            "answer_only_in_tool_output_rate": _mean(r["answer_only_in_tool_output"] for r in rows),
            "no_answer_rate": _mean(r["extracted_answer"] is None for r in rows),
            "model_tokens": _mean(r["model_tokens"] for r in rows),
            "feedback_tokens": _mean(r["feedback_tokens"] for r in rows),
            "truncation_rate": _mean(r["finish_reason"] == "length" for r in rows),
            "faults": faults,
        }
    )
    return out


def breakdowns(rows: Sequence[dict], *, temperature: float, groups=None) -> dict[str, dict[str, dict]]:
    """`summarise` per value of each `BREAKDOWN_FIELDS` field the rows' `meta` carries."""
    out: dict[str, dict[str, dict]] = {}
    for name in BREAKDOWN_FIELDS:
        by_value: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            value = (row.get("meta") or {}).get(name)
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                by_value[str(value)].append(row)
        if by_value:
            out[name] = {
                value: summarise(subset, temperature=temperature, groups=groups)
                for value, subset in sorted(by_value.items(), key=lambda kv: _natural(kv[0]))
            }
    return out


def _natural(value: str):
    return (0, float(value), "") if value.replace(".", "", 1).isdigit() else (1, 0.0, value)


def overall(summaries: dict[str, dict]) -> dict:
    """The mean over benchmarks (each benchmark weighs the same, as papers average) of every
    number all of them have."""
    if not summaries:
        return {}
    keys = [
        k
        for k, v in next(iter(summaries.values())).items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and k not in ("problems", "samples", "temperature")
        and all(isinstance(s.get(k), (int, float)) for s in summaries.values())
    ]
    out = {k: _mean(s[k] for s in summaries.values()) for k in keys}
    out["benchmarks"] = len(summaries)
    return out


def trainer_summary(rows: Sequence[dict], prefix: str = "") -> dict[str, float]:
    """The few numbers the trainer logs per held-out set (flat keys, `prefix` in front): those of
    the graded rows, and how many were left ungraded by a sandbox or a grader fault."""
    faults = fault_counts(rows)
    rows = scored_rows(rows)
    n = len(rows)
    if n == 0:
        return (
            {f"{prefix}faults_{kind}": float(count) for kind, count in faults.items()} if any(faults.values()) else {}
        )
    calls = sum(r["tool_calls"] for r in rows)
    return {
        f"{prefix}accuracy": sum(r["correct"] for r in rows) / n,
        f"{prefix}reward": sum(r["reward"] for r in rows) / n,
        f"{prefix}tool_calls": calls / n,
        f"{prefix}exec_error_rate": (sum(r["exec_errors"] for r in rows) / calls) if calls else 0.0,
        f"{prefix}model_tokens": sum(r["model_tokens"] for r in rows) / n,
        f"{prefix}count": float(n),
        f"{prefix}faults_sandbox": float(faults["sandbox"]),
        f"{prefix}faults_grader": float(faults["grader"]),
    }
