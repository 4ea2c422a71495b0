"""Evaluation with the code interpreter: `evaluate(...)` for the trainer and `cir eval`.

Each problem is rolled out `samples` times with the same loop as training (stop at the
closing fence, execute, feed the output back), graded with the math reward, and summarised:
accuracy (mean over samples), tool calls per problem, execution errors per call, response
length, broken down by the problem's `meta["category"]` when it has one. Benchmarks are
reported as in the paper: MATH500 greedy, the others mean accuracy over 16 samples.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from cir.data import Problem
from cir.metrics import write_jsonl
from cir.prompts import prompt_token_ids
from cir.rewards import RewardConfig, compute_rewards, reward_info_from_trajectory
from cir.rollout import RolloutConfig, rollout
from cir.trajectory import Trajectory


@dataclass
class EvalResult:
    metrics: dict[str, float]
    rows: list[dict] = field(default_factory=list)  # one per (problem, sample)


def _summarise(trajs: Sequence[Trajectory], rewards, prefix: str = "") -> dict[str, float]:
    n = len(trajs)
    if n == 0:
        return {}
    calls = sum(t.num_tool_calls for t in trajs)
    return {
        f"{prefix}accuracy": sum(r.correct for r in rewards) / n,
        f"{prefix}reward": sum(r.reward for r in rewards) / n,
        f"{prefix}tool_calls": calls / n,
        f"{prefix}exec_error_rate": (sum(t.num_exec_errors for t in trajs) / calls) if calls else 0.0,
        f"{prefix}model_tokens": sum(t.num_model_tokens for t in trajs) / n,
        f"{prefix}count": float(n),
    }


def evaluate(
    engine,
    sandbox,
    problems: Sequence[Problem],
    *,
    template,
    rollout_config: RolloutConfig,
    reward_config: RewardConfig | None = None,
    samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
    mode: str = "async",
    progress=None,
) -> EvalResult:
    tokenizer = engine.tokenizer
    cfg = replace(rollout_config, temperature=temperature)
    reward_config = reward_config or RewardConfig()
    prompts, seeds, metas = [], [], []
    for i, p in enumerate(problems):
        ids = prompt_token_ids(template, p.problem, tokenizer)
        for s in range(samples):
            prompts.append(ids)
            seeds.append(seed * 1_000_003 + i * 101 + s)
            metas.append(p)
    trajs = rollout(engine, sandbox, prompts, cfg, mode=mode, seeds=seeds, problems=[{"id": p.id} for p in metas], progress=progress)
    texts = [t.text(tokenizer) for t in trajs]
    infos = [reward_info_from_trajectory(t, cfg.max_response_tokens) for t in trajs]
    rewards = compute_rewards(None, texts, [p.answer for p in metas], infos, reward_config)
    metrics = _summarise(trajs, rewards)
    by_cat: dict[str, list[int]] = defaultdict(list)
    for k, p in enumerate(metas):
        cat = p.meta.get("category") if isinstance(p.meta, dict) else None
        if cat:
            by_cat[str(cat)].append(k)
    for cat, idx in sorted(by_cat.items()):
        metrics.update(_summarise([trajs[k] for k in idx], [rewards[k] for k in idx], prefix=f"{cat}/"))
    rows = [
        {
            "id": p.id,
            "problem": p.problem,
            "answer": p.answer,
            "response": text,
            "correct": r.correct,
            "reward": r.reward,
            "tool_calls": t.num_tool_calls,
            "exec_errors": t.num_exec_errors,
            "finish_reason": t.finish_reason,
            "model_tokens": t.num_model_tokens,
        }
        for p, t, text, r in zip(metas, trajs, texts, rewards)
    ]
    return EvalResult(metrics=metrics, rows=rows)


# ---------------------------------------------------------------------------------------------
# `cir eval`

# The paper's protocol: MATH500 greedy, the others mean over 16 samples at temperature 1.
PAPER_PROTOCOL = {"math500": (1, 0.0), "aime24": (16, 1.0), "aime25": (16, 1.0), "amc23": (16, 1.0), "olymmath-en-easy": (16, 1.0), "olymmath-en-hard": (16, 1.0)}


def register(parser) -> None:
    parser.add_argument("--model", required=True, help="a Hugging Face model directory or a cir checkpoint (…/checkpoints/step_N)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument("--benchmarks", default="math500,aime24,aime25,amc23,olymmath-en-easy,olymmath-en-hard", help="comma-separated benchmark names, JSONL paths or HF dataset names")
    parser.add_argument("--benchmark-dir", default=None, help="folder holding the benchmark JSONL files (default: $CIR_BENCHMARK_DIR)")
    parser.add_argument("--samples", type=int, default=None, help="samples per problem (default: the paper's protocol per benchmark)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the paper's protocol)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many problems per benchmark")
    parser.add_argument("--prompt", default="cir", help="prompt template name")
    parser.add_argument("--tool-budget", type=int, default=4)
    parser.add_argument("--max-response-tokens", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=None, help="sandbox workers (default: CPU count)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto")
    parser.add_argument("--max-batch", type=int, default=64, help="engine: most sequences decoded together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write per-sample JSONL and a summary JSON into this folder")


def run(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cir.data import load_problems
    from cir.engines.hf import HFEngine
    from cir.prompts import get_prompt
    from cir.sandbox import Sandbox

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    if args.prompt == "demo":
        import cir.demo  # noqa: F401  (registers the demo's prompt)
    template = get_prompt(args.prompt)
    cfg = RolloutConfig(max_response_tokens=args.max_response_tokens, tool_budget=args.tool_budget)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    summary = {}
    with Sandbox(workers=args.workers or None) as sandbox, HFEngine(model, tokenizer, max_batch_size=args.max_batch, seed=args.seed) as engine:
        for name in [b.strip() for b in args.benchmarks.split(",") if b.strip()]:
            problems = load_problems(name, split="test", limit=args.limit, benchmark_dir=args.benchmark_dir)
            samples, temperature = PAPER_PROTOCOL.get(Path(name).stem, (1, 0.0))
            samples = args.samples if args.samples is not None else samples
            temperature = args.temperature if args.temperature is not None else temperature
            t0 = time.perf_counter()
            try:
                res = evaluate(engine, sandbox, problems, template=template, rollout_config=cfg, samples=samples, temperature=temperature, seed=args.seed, progress=_progress(len(problems) * samples, name))
            except ValueError as e:
                print(f"cir eval: {name}: {e}", file=sys.stderr)
                return 2
            res.metrics["seconds"] = time.perf_counter() - t0
            summary[name] = res.metrics
            print(f"{name:<20} acc {res.metrics['accuracy']:.1%}  tool calls {res.metrics['tool_calls']:.2f}  exec errors {res.metrics['exec_error_rate']:.1%}  ({len(problems)} problems x {samples}, T={temperature}, {res.metrics['seconds']:.0f}s)")
            if out:
                write_jsonl(out / f"{Path(name).stem}.jsonl", res.rows)
    if summary:
        avg = sum(m["accuracy"] for m in summary.values()) / len(summary)
        print(f"{'average':<20} acc {avg:.1%}")
        summary["average"] = {"accuracy": avg}
    if out:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _progress(total: int, desc: str):
    if not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False)
    return lambda traj: bar.update(1)
