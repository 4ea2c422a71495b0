"""What `cir eval` hands a reader: `results.json`, a Markdown report, a PNG of pass@k, a terminal table.

All of it is built from the results dict (`cir.cli.eval` assembles it from `metrics.summarise`);
each file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# "Towards Effective Code-Integrated Reasoning" (Bai et al., 2025), Qwen2.5-Math-7B base with
# tool-augmented RL: MATH500 greedy, the others mean accuracy over 16 samples at temperature 1.
# The paper reports one OlymMATH number without naming the split; it is shown beside both.
PAPER_MODEL = "Qwen2.5-Math-7B"
PAPER_SCORES = {
    "math500": 86.4,
    "amc23": 74.2,
    "aime24": 42.3,
    "aime25": 29.2,
    "olymmath-en-easy": 31.6,
    "olymmath-en-hard": 31.6,
}
PAPER_AVERAGE = 52.4


def paper_score(benchmark: str) -> float | None:
    return PAPER_SCORES.get(Path(benchmark).stem.lower())


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_results_json(path: Path, results: dict) -> None:
    atomic_write_text(path, json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _num(x, fmt="{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def _faults(m: dict) -> str:
    """The samples the machine left ungraded: "–", or e.g. "2 (sandbox 2, grader 0)"."""
    faults = m.get("faults") or {}
    total = sum(faults.values())
    return "–" if not total else f"{total} (" + ", ".join(f"{k} {v}" for k, v in faults.items()) + ")"


def _largest_k(table: dict | None):
    if not table:
        return None, None
    k = max(table, key=int)
    return k, table[k]


def markdown_report(results: dict) -> str:
    """The report: settings, the main table (with the paper's numbers), tool use, breakdowns."""
    s = results["settings"]
    lines = [
        f"# Evaluation of `{s['model']}`",
        "",
        f"Prompt `{s['prompt']}`, tool budget {s['tool_budget']}, responses up to {s['max_response_tokens']} tokens, "
        f"engine `{s['engine']}`, seed {s['seed']}; graded on "
        + ("the whole response (interpreter output included)." if s["grade_tool_output"] else "the model's own text.")
        + " Scores in %: greedy accuracy for greedy benchmarks, else mean accuracy over the samples (avg@k)."
        + " Samples the machine left ungraded (a sandbox fault, a grader timeout or crash) are in no number"
        + " and counted under faults.",
        "",
        f"| benchmark | problems | protocol | score | paper ({PAPER_MODEL}) | pass@k | maj@k | faults |",
        "| --- | ---: | --- | ---: | ---: | --- | --- | --- |",
    ]
    benches = results["benchmarks"]
    for name, m in benches.items():
        paper = paper_score(name)
        passes = ", ".join(f"@{k} {_pct(v)}" for k, v in m["pass@k"].items())
        majs = ", ".join(f"@{k} {_pct(v)}" for k, v in (m.get("maj@k") or {}).items())
        lines.append(
            f"| {name} | {m['problems']} | {m['protocol']} | {_pct(m['score'])} | "
            f"{'–' if paper is None else f'{paper:.1f}'} | {passes} | {majs or '–'} | {_faults(m)} |"
        )
    if len(benches) > 1:
        avg = results["overall"].get("score")
        papers = [paper_score(n) for n in benches]
        paper_avg = PAPER_AVERAGE if all(p is not None for p in papers) else None
        lines.append(f"| **average** | | | {_pct(avg)} | {'–' if paper_avg is None else paper_avg} | | | |")
    lines += [
        "",
        "## Tool use and responses",
        "",
        "| benchmark | tool calls / sample | samples with a call | exec errors / call | timeouts / call "
        "| acc. with a call | acc. without | correct that called | answer only in tool output "
        "| model tokens | feedback tokens | truncated |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in benches.items():
        lines.append(
            f"| {name} | {_num(m['tool_calls'])} | {_pct(m['tool_use_rate'])} | {_pct(m['exec_error_rate'])} | "
            f"{_pct(m['timeout_rate'])} | {_pct(m['accuracy_with_tool'])} | {_pct(m['accuracy_without_tool'])} | "
            f"{_pct(m['correct_with_tool_share'])} | {_pct(m['answer_only_in_tool_output_rate'])} | "
            f"{_num(m['model_tokens'], '{:.0f}')} | {_num(m['feedback_tokens'], '{:.0f}')} | "
            f"{_pct(m['truncation_rate'])} |"
        )
    for name, m in benches.items():
        for field, values in (m.get("by") or {}).items():
            lines += [
                "",
                f"## {name} by {field}",
                "",
                f"| {field} | problems | score | tool calls / sample |",
                "| --- | ---: | ---: | ---: |",
            ]
            for value, sub in values.items():
                lines.append(f"| {value} | {sub['problems']} | {_pct(sub['score'])} | {_num(sub['tool_calls'])} |")
    if any(paper_score(n) is not None for n in benches):
        lines += [
            "",
            f"Paper: Bai et al. (2025), *Towards Effective Code-Integrated Reasoning*, {PAPER_MODEL} (MATH500 greedy, "
            "the others mean of 16 samples at temperature 1). It reports one OlymMATH number without the split; "
            "it is shown beside both OlymMATH files.",
        ]
    lines += ["", f"Per-sample records: {', '.join(f'`{Path(n).stem}.jsonl`' for n in benches)}.", ""]
    return "\n".join(lines)


def terminal_table(results: dict) -> str:
    """A few columns per benchmark, for the end of a run."""
    head = (
        f"{'benchmark':<20} {'protocol':>9} {'score':>7} {'paper':>6} {'pass@K':>8} {'maj@K':>7} "
        f"{'tools':>6} {'errors':>7} {'trunc':>6} {'faults':>6}"
    )
    lines = [head, "-" * len(head)]
    for name, m in results["benchmarks"].items():
        paper = paper_score(name)
        k, p = _largest_k(m["pass@k"])
        _, maj = _largest_k(m.get("maj@k"))
        lines.append(
            f"{Path(name).stem[:20]:<20} {m['protocol']:>9} {_pct(m['score']):>7} {'' if paper is None else f'{paper:.1f}':>6} "
            f"{_pct(p):>8} {_pct(maj):>7} {m['tool_calls']:>6.2f} {_pct(m['exec_error_rate']):>7} "
            f"{_pct(m['truncation_rate']):>6} {sum((m.get('faults') or {}).values()):>6}"
        )
    if len(results["benchmarks"]) > 1:
        lines.append(f"{'average':<20} {'':>9} {_pct(results['overall'].get('score')):>7}")
    return "\n".join(lines)


def plot_pass_at_k(path: Path, results: dict) -> Path:
    """pass@k against k (log scale), one line per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in results["benchmarks"].items():
        ks = sorted(int(k) for k in m["pass@k"])
        ax.plot(ks, [100 * m["pass@k"][str(k)] for k in ks], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("pass@k (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"pass@k: {Path(results['settings']['model']).name}")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
