"""Per-step metrics: JSONL (always), TensorBoard (default on), wandb (when asked), and a PNG
of the main curves at the end of a run."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends one JSON object per step to ``<out_dir>/metrics.jsonl`` (flushed each step, so
    nothing is lost on a crash) and mirrors scalars to TensorBoard and wandb."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "cir",
        run_name: str | None = None,
        config: dict | None = None,
        resume: bool = False,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self._file = open(self.path, "a" if resume else "w", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
            except Exception as e:  # tensorboard is a dependency; if it breaks, keep training
                print(f"[cir] TensorBoard logging disabled: {e}")
        self._wandb = None
        if wandb:
            import wandb as _wandb  # optional dependency: pip install wandb

            self._wandb = _wandb.init(
                project=wandb_project, name=run_name, config=config, resume="allow" if resume else None
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k == "step" or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if self._tb is not None and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        if self._tb is not None:
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class NullMetricsLogger:
    """The logger of ranks other than 0: metrics are reduced over ranks and written by rank 0."""

    path = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics JSONL. A last line cut off mid-write (a crash, a full disk, a power
    cut: often a run of NUL bytes) is dropped with a message on stderr; an unreadable line
    before the last is an error naming the file and the line."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if any(rest.strip() for rest in lines[number:]):
                raise ValueError(f"{path}:{number}: not a JSON line ({exc})") from None
            print(
                f"[cir] {path}:{number}: dropped the last line, cut off mid-write ({len(line)} bytes: {exc})",
                file=sys.stderr,
                flush=True,
            )
    return rows


def write_jsonl(path: str | Path, rows) -> None:
    """Write `rows` as JSON lines, all or nothing: a crash mid-write leaves the old file (the new
    one is on disk before it takes the old one's name)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def truncate_metrics(path: str | Path, last_step: int) -> list[dict]:
    """Drop rows logged after `last_step` (used on resume, so no step appears twice), and a last
    line cut off by the crash (see `read_metrics`); returns the rows kept."""
    path = Path(path)
    if not path.is_file():
        return []
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    write_jsonl(path, keep)
    return keep


DEFAULT_CURVES = (
    ("reward/mean", "reward"),
    ("reward/accuracy", "accuracy (train samples)"),
    ("tool/calls_per_traj", "tool calls / trajectory"),
    ("tool/error_rate", "execution error rate"),
    ("response/model_tokens_mean", "response length (model tokens)"),
    ("actor/entropy", "entropy"),
)


def plot_curves(
    rows: list[dict],
    png_path: str | Path,
    curves: Iterable[tuple[str, str]] = DEFAULT_CURVES,
    title: str = "cir training",
) -> Path | None:
    """Plot the curves that exist in `rows`; eval points (keys starting with "eval/") are
    drawn as markers on the matching panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(k, label) for k, label in curves if any(k in r for r in rows)]
    if not curves:
        return None
    cols = 3
    nrows = (len(curves) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, curves):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, lw=1.2, label="train")
            if len(ys) >= 8:
                w = max(2, len(ys) // 10)
                smooth = [
                    sum(ys[max(0, i - w + 1) : i + 1]) / len(ys[max(0, i - w + 1) : i + 1]) for i in range(len(ys))
                ]
                ax.plot(xs, smooth, lw=2.0, alpha=0.8, label=f"mean of {w}")
        ekey = "eval/" + key.split("/", 1)[-1]
        epts = [(r["step"], r[ekey]) for r in rows if isinstance(r.get(ekey), (int, float))]
        if epts:
            xs, ys = zip(*epts)
            ax.plot(xs, ys, "o--", color="black", label="held-out")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(curves) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)


def step_metrics(
    trajectories,
    rewards,
    *,
    trained: int,
    stage,
    epoch: int,
    times: dict[str, float],
    dist=None,
    grader=None,
    sandbox=None,
    excluded=None,
) -> dict[str, float]:
    """The numbers of one RL step over every rank (`trajectories`: this rank's, all rolled out;
    `trained` of them kept): reward, tool use, response shape, schedule, data, faults and time.

    Reward and accuracy are those of the graded trajectories: a result with a fault
    (`RewardResult.fault`) is no verdict and is counted under ``fault/`` instead. `grader`: the
    step's `cir.rewards.GraderCounters` (``grader_counters()`` now minus at the previous step),
    logged as ``grader/retries``, ``grader/faults``, ``grader/restarts``, ... `sandbox`: the step's
    `Sandbox.counters()` (now minus at the previous step, `cir.training.faults.counter_delta`), logged
    as ``sandbox/retries``, ``sandbox/restarts``, ``sandbox/faults``, ``sandbox/faults_<reason>``,
    ... `excluded`: what faults left out of the loss (`cir.training.faults.Exclusion`), logged as
    ``fault/excluded_trajectories``, ``fault/excluded_groups``, ``fault/partial_groups``. Tool calls
    that ended in a sandbox fault are ``fault/sandbox_calls`` (of ``tool/calls``), never the
    model's errors (``tool/error_rate`` is over the calls the code itself decided).

    Counts are summed over ranks first and turned into means and rates afterwards, so a rate is
    the global one (not an average of per-rank rates); times are this rank's."""
    from cir.distributed import DistributedContext
    from cir.rollout.stats import rates, rollout_totals

    dist = dist or DistributedContext()
    local = rollout_totals(trajectories)
    graded = [r for r in rewards if r.fault is None]
    local["reward_sum"] = sum(r.reward for r in graded)
    local["correct"] = sum(bool(r.correct) for r in graded)
    local["graded"] = len(graded)
    local["fault_sandbox"] = sum(r.fault == "sandbox" for r in rewards)
    local["fault_grader"] = len(rewards) - len(graded) - local["fault_sandbox"]
    local["trained"] = trained
    grader_metrics = grader.as_metrics() if grader is not None else {}
    sandbox_metrics = {f"sandbox/{k}": float(v) for k, v in (sandbox or {}).items()}
    excluded_metrics = excluded.as_totals() if excluded is not None else {}
    local.update(grader_metrics)
    local.update(sandbox_metrics)
    local.update(excluded_metrics)
    totals = dict(zip(local, dist.sum_floats(list(local.values()))))
    stats = rates(totals)
    graded_total = max(totals["graded"], 1)
    return {
        "reward/mean": totals["reward_sum"] / graded_total,
        "reward/accuracy": totals["correct"] / graded_total,
        "fault/sandbox_trajectories": totals["fault_sandbox"],
        "fault/grader_trajectories": totals["fault_grader"],
        "fault/sandbox_calls": totals["sandbox_faults"],
        **{name: totals[name] for name in (*grader_metrics, *sandbox_metrics, *excluded_metrics)},
        "tool/calls": totals["tool_calls"],
        "tool/calls_per_traj": stats.get("tool_calls_per_traj", 0.0),
        "tool/error_rate": stats.get("exec_error_rate", 0.0),
        "tool/timeout_rate": stats.get("timeout_rate", 0.0),
        "tool/sandbox_fault_rate": stats.get("sandbox_fault_rate", 0.0),
        "response/model_tokens_mean": stats.get("model_tokens_mean", 0.0),
        "response/feedback_token_share": stats.get("feedback_token_share", 0.0),
        "response/truncated_share": stats.get("finish_length", 0.0),
        "schedule/tool_budget": stage.tool_budget,
        "schedule/max_response_tokens": stage.max_response_tokens,
        "data/trajectories": totals["trajectories"],
        "data/trajectories_trained": totals["trained"],
        "data/epoch": epoch,
        "time/rollout_s": times["rollout"],
        "time/sandbox_busy_s": sum(c.wall_ms for t in trajectories for c in t.tool_calls) / 1000.0,
        "time/reward_s": times["reward"],
        "time/update_s": times["update"],
        "time/step_s": times["step"],
        # Tokens of every rank over this rank's rollout time: the job's generation throughput.
        "perf/tokens_per_s": totals["model_tokens"] / max(times["rollout"], 1e-9),
    }
