"""`cir bench rollout`: asynchronous per-trajectory rollout against a turn-synchronous loop.

Both schedules run the same model, tokenizer, problems, seeds and sandbox in one process
(after a short warm-up rollout), `--repeats` times each, alternating which goes first so slow
drift of a shared machine hits both alike; the run with the median wall time stands for each:

- `async` (cir's `rollout_async`): every trajectory is its own coroutine; while one waits on
  the sandbox, the engine keeps decoding the others (continuous batching).
- `turn_sync` (`rollout_turn_sync`, the loop common research code uses): all live
  trajectories generate until their fence or EOS, then all blocks execute, then the next turn:
  at every turn everyone waits for the longest generation and the slowest execution.

Each generate call is seeded from (trajectory seed, turn), so both schedules sample the same
trajectories (checked and reported): the only difference is scheduling. The figures are
model tokens generated per wall second and trajectories per wall second, and their ratio.

The model. By default the demo task's tiny Qwen2 and byte tokenizer (`cir.tasks.demo`),
warm-started for a few hundred steps by the demo's `warm_start` on the demo's arithmetic
problems, with traces more varied than the demo's: some answer directly, some write one or two
```` ```python ```` blocks; reasoning text of varied length; most blocks are quick, some sleep
(0.1-0.8 s, standing in for heavy sympy calls or a remote executor) and some run a CPU-bound
loop. Sampled at temperature 1, it produces a realistic mix of generation lengths and execution
latencies. `--model DIR` uses a `transformers` checkpoint (with its tokenizer) instead. Either
way the prompts are the demo's (`PROMPT`, through `cir.prompts.prompt_token_ids`) on problems
drawn by `demo_problems`, none of them seen in the warm start. The engine comes from
`cir.engines.make_engine` (`--engine`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

# Share of warm-start traces that write code (one block in 3 of 4 of them, two in the others):
# with those 20% that answer directly, a mix of zero, one and two executions per trajectory.
TOOL_SHARE = 0.8

# Sentences of the warm-start traces' reasoning text (varied lengths of generation).
_FILLER = (
    "First, read the problem carefully.",
    "The numbers are large, so mental arithmetic is error-prone.",
    "Let us break the expression into parts.",
    "Multiplication comes before addition.",
    "We should double check the result.",
    "A quick estimate helps to catch mistakes.",
    "Keep every digit.",
    "The order of operations matters here.",
)


def _code(rng: random.Random, expression: str) -> str:
    """A block printing `expression`, with a latency profile: mostly quick, some sleep, some loop."""
    kind = rng.random()
    if kind < 0.25:
        delay = rng.choice([0.1, 0.2, 0.4, 0.8])
        return f"import time\ntime.sleep({delay})\nprint({expression})"
    if kind < 0.4:
        n = rng.choice([100000, 300000, 1000000])
        return f"s = 0\nfor i in range({n}):\n    s += i % 3\nprint({expression})"
    return f"print({expression})"


def latency_traces(rng: random.Random):
    """A `make_trace` for the demo's `warm_start` (same arguments as `cir.tasks.demo.make_trace`,
    which builds the trajectory) whose traces carry the benchmark's mix: reasoning text of varied
    length, one or two blocks when the tool is used, and blocks that sleep or loop."""
    from cir.tasks import demo

    def make_trace(tokenizer, problem, use_tool: bool, feedback_template: str):
        reasoning = " ".join(rng.choice(_FILLER) for _ in range(rng.randint(0, 5)))
        blocks = (1 if rng.random() < 0.75 else 2) if use_tool else 0
        code = [_code(rng, problem.problem) for _ in range(blocks)]
        # What the model writes before each block and before the answer.
        text = ["Let me verify it another way.\n" if i else "" for i in range(blocks)] + ["The answer is "]
        text[0] = (reasoning + "\n" if reasoning else "") + text[0]
        return demo.make_trace(tokenizer, problem, use_tool, feedback_template, code=code, text=text)

    return make_trace


def register(parser: argparse.ArgumentParser) -> None:
    from cir.engines import engine_names

    parser.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="a transformers checkpoint (model and tokenizer) to use instead of the warm-started tiny model",
    )
    parser.add_argument(
        "--save-model",
        default=None,
        metavar="DIR",
        help="save the warm-started model and tokenizer here (reuse them later with --model DIR)",
    )
    parser.add_argument("--hidden-size", type=int, default=128, help="tiny model width (default 128)")
    parser.add_argument("--layers", type=int, default=2, help="tiny model layers (default 2)")
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="supervised warm-up steps (default 300; 60 with --quick)"
    )
    parser.add_argument(
        "--warmup-batch", type=int, default=16, help="traces per warm-up step, each on a new problem (default 16)"
    )
    parser.add_argument(
        "--problems", type=int, default=None, help="trajectories per schedule (default 48; 12 with --quick)"
    )
    parser.add_argument("--tool-budget", type=int, default=2, help="executions per trajectory (default 2)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="response token limit, within the model's context (default 512; 256 with --quick)",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument(
        "--workers", type=int, default=8, help="sandbox workers (default 8; sleeping snippets use no CPU)"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="sandbox time limit per snippet, s (default 5)")
    parser.add_argument("--engine", choices=engine_names(), default="hf", help="generation engine (default hf)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="engine batch size (default 64)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of problems, model init and sampling (default 0)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs per schedule, alternating which goes first; medians are reported (default 3)",
    )
    parser.add_argument("--show", type=int, default=0, metavar="N", help="print N sampled trajectories (stderr)")
    parser.add_argument("--quick", action="store_true", help="small model warm-up and few problems (a smoke test)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="write the results here")


def _load_model(args, problems, log):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa").to(device).eval()
        return model, tokenizer, {"model": args.model}
    from cir.rollout import RolloutConfig
    from cir.tasks import demo

    tokenizer = demo.demo_tokenizer()
    model = demo.demo_model(tokenizer, args.hidden_size, args.layers, max(1, args.hidden_size // 32), seed=args.seed)
    steps = args.warmup_steps if args.warmup_steps is not None else (60 if args.quick else 300)
    log(
        f"warm-starting the demo's tiny Qwen2 (hidden {args.hidden_size}, {args.layers} layers, byte tokenizer) "
        f"for {steps} steps of {args.warmup_batch} traces"
    )
    # On the CPU wherever the benchmark runs, so every device measures the same model.
    info = demo.warm_start(
        model,
        tokenizer,
        steps=steps,
        batch_size=args.warmup_batch,
        lr=3e-3,
        tool_share={"hard": TOOL_SHARE, "easy": TOOL_SHARE},
        easy_share=demo.DemoConfig.easy_share,
        feedback_template=RolloutConfig().feedback_template,
        seed=args.seed,
        exclude={p.problem for p in problems},
        progress=sys.stderr.isatty(),
        make_trace=latency_traces(random.Random(args.seed + 1)),
    )
    log(f"  warm-up loss {info['warmup/loss']:.3f} ({info['warmup/seconds']:.0f} s)")
    if args.save_model:
        model.save_pretrained(args.save_model)
        tokenizer.save_pretrained(args.save_model)
        log(f"saved the warm-started model to {args.save_model}")
    model.to(device)
    model_info = {
        "model": "tiny-qwen2",
        "hidden_size": args.hidden_size,
        "layers": args.layers,
        "params": sum(p.numel() for p in model.parameters()),
        "warmup_steps": steps,
        "warmup_loss": info["warmup/loss"],
        "warmup_s": info["warmup/seconds"],
    }
    return model, tokenizer, model_info


def _measure(mode: str, engine, sandbox, prompts, config, seeds) -> tuple[dict, list]:
    from cir.rollout import rollout, rollout_stats

    tokens_before = engine.stats.tokens_generated if hasattr(engine, "stats") else None
    start = time.perf_counter()
    trajectories = rollout(engine, sandbox, prompts, config, mode=mode, seeds=seeds)
    wall = time.perf_counter() - start
    model_tokens = sum(t.num_model_tokens for t in trajectories)
    calls = [c for t in trajectories for c in t.tool_calls if c.executed]
    row = {
        "mode": mode,
        "wall_s": wall,
        "trajectories": len(trajectories),
        "model_tokens": model_tokens,
        "tokens_per_s": model_tokens / wall,
        "trajectories_per_s": len(trajectories) / wall,
        "executions": len(calls),
        "exec_ms_mean": sum(c.wall_ms for c in calls) / len(calls) if calls else 0.0,
        "exec_ms_max": max((c.wall_ms for c in calls), default=0.0),
        **rollout_stats(trajectories),
    }
    if tokens_before is not None:
        row["engine_tokens"] = engine.stats.tokens_generated - tokens_before
    return row, trajectories


def run(args: argparse.Namespace) -> int:
    import torch

    from cir.engines import make_engine
    from cir.prompts import prompt_token_ids
    from cir.rollout import RolloutConfig
    from cir.sandbox import Sandbox
    from cir.tasks import demo

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    n_problems = args.problems if args.problems is not None else (12 if args.quick else 48)
    max_tokens = args.max_tokens if args.max_tokens is not None else (256 if args.quick else 512)
    if n_problems < 1 or max_tokens < 1:
        raise SystemExit("cir bench rollout: --problems and --max-tokens must be >= 1")

    problems = demo.demo_problems(n_problems, seed=args.seed + 2, easy_share=demo.DemoConfig.easy_share)
    model, tokenizer, model_info = _load_model(args, problems, log)
    device = str(next(model.parameters()).device)
    prompts = [prompt_token_ids(demo.PROMPT, p.problem, tokenizer) for p in problems]
    seeds = [args.seed * 1_000_003 + i for i in range(n_problems)]
    config = RolloutConfig(max_response_tokens=max_tokens, tool_budget=args.tool_budget, temperature=args.temperature)

    results: dict = {}
    # share_model: nothing trains this model, so the engine needs no copy of it.
    engine = make_engine(
        args.engine, model, tokenizer, max_batch_size=args.max_batch_size, seed=args.seed, share_model=True
    )
    with Sandbox(workers=args.workers, timeout_s=args.timeout) as sandbox, engine:
        log("warm-up rollout ...")
        _measure("async", engine, sandbox, prompts[: min(4, n_problems)], config, seeds[:4])
        runs: dict[str, list[dict]] = {"async": [], "turn_sync": []}
        trajs: dict[str, list] = {}
        for r in range(max(1, args.repeats)):
            for mode in ("async", "turn_sync") if r % 2 == 0 else ("turn_sync", "async"):
                log(f"run {r + 1}/{args.repeats}: {mode}, {n_problems} trajectories ...")
                row, trajs[mode] = _measure(mode, engine, sandbox, prompts, config, seeds)
                runs[mode].append(row)
    same = all(
        a.response_ids == b.response_ids and a.loss_mask == b.loss_mask
        for a, b in zip(trajs["async"], trajs["turn_sync"])
    )
    for traj in trajs["async"][: args.show]:
        log("-" * 60 + "\n" + tokenizer.decode(traj.prompt_ids) + tokenizer.decode(traj.response_ids))
    # The run with the median wall time stands for each schedule.
    rows = {mode: sorted(rs, key=lambda row: row["wall_s"])[len(rs) // 2] for mode, rs in runs.items()}
    ratio_tokens = rows["async"]["tokens_per_s"] / rows["turn_sync"]["tokens_per_s"]
    ratio_trajs = rows["async"]["trajectories_per_s"] / rows["turn_sync"]["trajectories_per_s"]
    results = {
        "device": device,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "model": model_info,
        "config": {
            "problems": n_problems,
            "max_response_tokens": max_tokens,
            "tool_budget": args.tool_budget,
            "temperature": args.temperature,
            "sandbox_workers": args.workers,
            "seed": args.seed,
            "engine": args.engine,
        },
        "rows": [rows["async"], rows["turn_sync"]],
        "runs": runs,
        "ratios_per_repeat": [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["async"], runs["turn_sync"])],
        "identical_trajectories": same,
        "ratio_tokens_per_s": ratio_tokens,
        "ratio_trajectories_per_s": ratio_trajs,
    }
    _print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        log(f"wrote {args.json}")
    return 0


def _print_table(results: dict) -> None:
    cols = [
        ("mode", "{}"),
        ("wall_s", "{:.2f}"),
        ("model_tokens", "{}"),
        ("tokens_per_s", "{:.1f}"),
        ("trajectories_per_s", "{:.2f}"),
        ("tool_calls_per_traj", "{:.2f}"),
        ("exec_error_rate", "{:.2f}"),
        ("exec_ms_mean", "{:.0f}"),
        ("exec_ms_max", "{:.0f}"),
    ]
    table = [[name for name, _ in cols]] + [[fmt.format(row[name]) for name, fmt in cols] for row in results["rows"]]
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    for r in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))
    cfg = results["config"]
    print(
        f"\n{cfg['problems']} problems, tool budget {cfg['tool_budget']}, max {cfg['max_response_tokens']} tokens, "
        f"device {results['device']}; same trajectories in both modes: {results['identical_trajectories']}"
    )
    print(
        f"async / turn-sync (medians of {len(results['ratios_per_repeat'])} runs): "
        f"tokens/s x{results['ratio_tokens_per_s']:.2f}, trajectories/s x{results['ratio_trajectories_per_s']:.2f} "
        f"(per run: {', '.join(f'{r:.2f}' for r in results['ratios_per_repeat'])})"
    )
