"""`cir bench train`: training steps per minute and trained tokens per second, synchronous
collector against asynchronous, side by side in one run.

Each mode (`--mode sync,async`) runs the real trainer (`cir.training.trainer.Trainer`: the
`transformers` engine, the sandbox, the rewards, the actor's update) from the same model, seed and
settings: `--steps` timed steps after one untimed warm-up step, each training
`prompts_per_step x group_size` trajectories (the same trained trajectories per step in both
modes). The figures: steps per minute, trained model tokens per second, and their ratio
async / sync, on two workloads:

- `long-tail`: the demo's arithmetic problems and prompt, with the demo's tiny model warm-started
  on traces with a long tail (`long_tail_traces`): reasoning text of varied length, zero, one or two
  python blocks; most blocks print at once (milliseconds), some run a CPU loop (tens to hundreds of
  milliseconds), some sleep 0.5-3 s (standing in for a heavy sympy call or a slow remote
  executor). The sampled trajectories keep that mix: most finish fast, a few hold the step.
  The warm start is long enough (`--warmup-steps`, 1000) for the mix to last through the timed
  steps: warm-started 300 steps, the 64-wide model's tool use fell from about 0.5 calls per
  trajectory to none within 14 RL steps, and with it the tail the workload is meant to have.
- `demo`: the demo itself (its model warm-started once, `--demo-warmup-steps` steps of its own
  traces; its settings but the batch and the schedule).

The asynchronous mode runs with `run.max_staleness` (`--staleness`, default 1). Both modes of a
workload run back to back in one process, alternately first (`--repeats`; the table shows each
mode's median run, the upper one of an even count), and the machine may be shared: compare the
ratio, not the absolute figures. For the synchronous mode the table also shows the share of
the collection's wall time the engine spent in forward passes (`engine/rollout_busy_share`):
on a CPU, where a forward pass costs in proportion to its batch, what the asynchronous collector
can gain is bounded by the engine's idle time (it pauses the engine for the update as the
synchronous one does, and prefills cut trajectories again under the new weights); on a GPU, an
engine decoding a small batch in the long tail is busy but underused, and batching the next
step's requests beside it costs little. `--json OUT` writes every row.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from cir.bench.rollout import latency_traces

WORKLOADS = ("long-tail", "demo")


def _long_tail_code(rng: random.Random, expression: str) -> str:
    """A block printing `expression`: mostly at once, some after a CPU loop, some after a sleep."""
    kind = rng.random()
    if kind < 0.15:
        return f"import time\ntime.sleep({rng.choice([0.5, 1.0, 2.0, 3.0])})\nprint({expression})"
    if kind < 0.3:
        return f"s = 0\nfor i in range({rng.choice([30000, 100000, 300000])}):\n    s += i % 3\nprint({expression})"
    return f"print({expression})"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", default="sync,async", help="collectors to compare, comma-separated (sync,async)")
    parser.add_argument(
        "--workload", default="long-tail,demo", help=f"workloads, comma-separated ({','.join(WORKLOADS)})"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode (default 10), after 1 warm-up step")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (default 8)")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (default 4)")
    parser.add_argument("--staleness", type=int, default=1, help="run.max_staleness of the async mode (default 1)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode, alternately first (default 1)")
    parser.add_argument(
        "--warmup-steps", type=int, default=1000, help="long-tail model's warm start steps (default 1000)"
    )
    parser.add_argument(
        "--demo-warmup-steps", type=int, default=1000, help="the demo model's warm start steps (default 1000)"
    )
    parser.add_argument(
        "--demo-model", type=Path, default=None, metavar="DIR", help="a warm-started demo model to use instead"
    )
    parser.add_argument("--hidden-size", type=int, default=64, help="long-tail model's width (default 64, the demo's)")
    parser.add_argument("--layers", type=int, default=2, help="long-tail model's decoder layers (default 2)")
    parser.add_argument(
        "--warmup-lr", type=float, default=3e-3, help="long-tail model's warm start learning rate (default 3e-3)"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where the warm start and the runs compute (default: the trainer's run.device)",
    )
    parser.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a training config override for both modes (repeatable), e.g. --set optim.lr=1e-5",
    )
    parser.add_argument(
        "--model", type=Path, default=None, metavar="DIR", help="the long-tail model saved by an earlier --save-model"
    )
    parser.add_argument(
        "--save-model", type=Path, default=None, metavar="DIR", help="save the warm-started long-tail model here"
    )
    parser.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="write the results here")


def _long_tail_model(out: Path, args, log) -> tuple[Path, int]:
    """The demo's model (`--hidden-size`, `--layers`) warm-started on long-tail traces on
    `--device`, saved as a folder for model.path; and its parameter count."""
    import torch

    from cir.rollout import RolloutConfig
    from cir.tasks import demo

    seed, hidden, steps = args.seed, args.hidden_size, args.warmup_steps
    torch.manual_seed(seed)
    tok = demo.demo_tokenizer()
    model = demo.demo_model(tok, hidden_size=hidden, num_layers=args.layers, num_heads=max(1, hidden // 32), seed=seed)
    model.to(args.device or "cpu")
    params = sum(p.numel() for p in model.parameters())
    log(f"long-tail model: {params / 1e6:.2f}M parameters, {args.layers} layers of width {hidden}")
    rng = random.Random(seed + 1)
    info = demo.warm_start(
        model,
        tok,
        steps=steps,
        batch_size=16,
        lr=args.warmup_lr,
        tool_share={"hard": 0.8, "easy": 0.8},
        easy_share=demo.DemoConfig.easy_share,
        feedback_template=RolloutConfig().feedback_template,
        seed=seed,
        exclude=set(),
        progress=False,
        make_trace=latency_traces(rng, code=_long_tail_code),
    )
    log(f"long-tail model: {steps} warm-start steps, loss {info['warmup/loss']:.3f} ({info['warmup/seconds']:.0f} s)")
    model.to("cpu").save_pretrained(out)
    tok.save_pretrained(out)
    return out, params


def _demo_model(out: Path, steps: int, seed: int, log) -> Path:
    """The demo's own model and warm start (`demo.warmup_steps` = `steps`), saved once."""
    import torch

    from cir.tasks import demo

    options = demo.DemoConfig(warmup_steps=steps)
    model, tok, info = demo.build_policy(device=torch.device("cpu"), dtype=torch.float32, seed=seed, options=options)
    log(f"demo model: {steps} warm-start steps, loss {info['warmup/loss']:.3f}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _overrides(workload: str, model_dir: Path | None, args) -> list[str]:
    """The trainer's settings for `workload`, then the user's `--set` overrides (which win)."""
    return [*_workload_overrides(workload, model_dir, args), *args.extra]


def _workload_overrides(workload: str, model_dir: Path | None, args) -> list[str]:
    common = [
        f"algo.prompts_per_step={args.prompts}",
        f"algo.group_size={args.samples}",
        f"run.seed={args.seed}",
        "run.eval_at_start=false",
        "run.eval_every=0",
        "data.eval=[]",
        "run.save_every=0",
        "run.progress=false",
        "run.tensorboard=false",
        "run.plot=false",
        "schedule=[]",
        *([f"run.device={args.device}"] if args.device else []),
    ]
    if workload == "demo":
        return [*common, f"model.path={model_dir}", "data.prompt=demo"]
    return [
        *common,
        f"model.path={model_dir}",
        "data.prompt=demo",
        "rollout.max_response_tokens=320",
        "rollout.tool_budget=2",
        "rollout.max_feedback_tokens=32",
        "sandbox.workers=8",
        "sandbox.timeout_s=5",
    ]


def _measure(workload: str, mode: str, overrides: list[str], args, out: Path, log) -> dict:
    from cir.training.config import load_train_config
    from cir.training.trainer import Trainer

    extra = ["run.collector=async", f"run.max_staleness={args.staleness}"] if mode == "async" else []
    cfg = load_train_config(None, [*overrides, *extra, f"run.out_dir={out}", f"run.steps={args.steps + 1}"])
    with Trainer(cfg) as trainer:
        trainer.step()  # warm-up: the first rollouts, the first update
        tokens = trajectories = 0.0
        metrics = []
        start = time.perf_counter()
        for _ in range(args.steps):
            m = trainer.step()
            metrics.append(m)
            tokens += m["response/model_tokens_mean"] * m["data/trajectories_trained"]
            trajectories += m["data/trajectories_trained"]
        wall = time.perf_counter() - start
    row = {
        "workload": workload,
        "mode": mode,
        "steps": args.steps,
        "wall_s": wall,
        "steps_per_min": 60 * args.steps / wall,
        "trained_tokens_per_s": tokens / wall,
        "trained_trajectories_per_step": trajectories / args.steps,
        "trained_tokens_per_step": tokens / args.steps,
        "reward_mean": sum(m["reward/mean"] for m in metrics) / len(metrics),
        "tool_calls_per_traj": sum(m["tool/calls_per_traj"] for m in metrics) / len(metrics),
    }
    if mode == "sync":  # how much idle engine time there is for the asynchronous collector to fill
        row["engine_busy_share"] = sum(m["engine/rollout_busy_share"] for m in metrics) / len(metrics)
    if mode == "async":
        row["staleness_max"] = max(m["async/staleness_max"] for m in metrics)
        row["staleness_mean"] = sum(m["async/staleness_mean"] for m in metrics) / len(metrics)
        row["sandbox_overlap_s"] = sum(m["async/sandbox_overlap_s"] for m in metrics)
    log(
        f"{workload:9s} {mode:5s}: {row['steps_per_min']:.2f} steps/min, "
        f"{row['trained_tokens_per_s']:.0f} trained tokens/s ({wall:.1f} s)"
    )
    return row


def run(args: argparse.Namespace) -> int:
    import cir.tasks  # noqa: F401  (the demo task: data, prompt, model by name)

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    modes = [m for m in args.mode.split(",") if m]
    workloads = [w for w in args.workload.split(",") if w]
    for m in modes:
        if m not in ("sync", "async"):
            raise SystemExit(f"cir bench train: --mode {m!r}: choose from sync, async")
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"cir bench train: --workload {w!r}: choose from {', '.join(WORKLOADS)}")
    if args.steps < 1 or args.repeats < 1:
        raise SystemExit("cir bench train: --steps and --repeats must be >= 1")
    if args.layers < 1 or args.hidden_size < 1 or args.warmup_steps < 1 or not args.warmup_lr > 0:
        raise SystemExit("cir bench train: --layers, --hidden-size and --warmup-steps must be >= 1, --warmup-lr > 0")
    _check_overrides(args.extra)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cir-bench-train-") as tmp:
        tmp = Path(tmp)
        model_dir, params = None, None
        if "long-tail" in workloads:
            model_dir = args.model
            if model_dir is None:
                model_dir, params = _long_tail_model(args.save_model or tmp / "long-tail-model", args, log)
        for workload in workloads:
            if workload == "demo":
                model_dir = args.demo_model or _demo_model(tmp / "demo-model", args.demo_warmup_steps, args.seed, log)
            overrides = _overrides(workload, model_dir, args)
            for r in range(args.repeats):
                order = modes if r % 2 == 0 else modes[::-1]
                for mode in order:
                    rows.append(_measure(workload, mode, overrides, args, tmp / f"{workload}-{mode}-{r}", log))
    table = _table(rows, modes, workloads)
    print(table)
    if args.json:
        report = {"rows": rows, "table": table, "long_tail_model_parameters": params}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def _check_overrides(extra: list[str]) -> None:
    """`--set` overrides that the config would refuse end the command now, before the minutes of
    a warm start, naming the key or value (exit 2)."""
    from cir.config_loader import ConfigError
    from cir.training.config import load_train_config

    try:
        load_train_config(None, list(extra))
    except ConfigError as error:
        print(f"cir bench train: --set: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def _table(rows, modes, workloads) -> str:
    lines = [
        "| workload | mode | steps/min | trained tokens/s | trained tokens/step | reward | engine busy while collecting "
        "| ratio (steps/min vs sync) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in workloads:
        per_mode = {m: [r for r in rows if r["workload"] == w and r["mode"] == m] for m in modes}
        base = _median([r["steps_per_min"] for r in per_mode["sync"]]) if per_mode.get("sync") else None
        for m in modes:
            spm = _median([r["steps_per_min"] for r in per_mode[m]])
            tps = _median([r["trained_tokens_per_s"] for r in per_mode[m]])
            tok = _median([r["trained_tokens_per_step"] for r in per_mode[m]])
            reward = _median([r["reward_mean"] for r in per_mode[m]])
            busy = [r["engine_busy_share"] for r in per_mode[m] if "engine_busy_share" in r]
            busy = f"{_median(busy):.0%}" if busy else "-"
            ratio = f"{spm / base:.2f}x" if base else "-"
            lines.append(f"| {w} | {m} | {spm:.2f} | {tps:.0f} | {tok:.0f} | {reward:.3f} | {busy} | {ratio} |")
    return "\n".join(lines)
