"""`cir eval`: evaluate a model on math benchmarks with the code interpreter.

Benchmarks are reported as in the paper by default: MATH500 greedy, the others mean accuracy
over 16 samples at temperature 1. Bad input (a model folder or a benchmark that does not
exist) ends with one line and exit code 2 before the model is loaded.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from cir.config_loader import ConfigError
from cir.engines.factory import ENGINES

# The paper's protocol: MATH500 greedy, the others mean over 16 samples at temperature 1.
PAPER_PROTOCOL = {
    "math500": (1, 0.0),
    "aime24": (16, 1.0),
    "aime25": (16, 1.0),
    "amc23": (16, 1.0),
    "olymmath-en-easy": (16, 1.0),
    "olymmath-en-hard": (16, 1.0),
}


def register(parser) -> None:
    parser.add_argument(
        "--model", required=True, help="a Hugging Face model directory or a cir checkpoint (…/checkpoints/step_N)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument(
        "--benchmarks",
        default="math500,aime24,aime25,amc23,olymmath-en-easy,olymmath-en-hard",
        help="comma-separated benchmark names, JSONL paths or HF dataset names",
    )
    parser.add_argument(
        "--benchmark-dir", default=None, help="folder holding the benchmark JSONL files (default: $CIR_BENCHMARK_DIR)"
    )
    parser.add_argument(
        "--samples", type=int, default=None, help="samples per problem (default: the paper's protocol per benchmark)"
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature (default: the paper's protocol)"
    )
    parser.add_argument("--limit", type=int, default=None, help="at most this many problems per benchmark")
    parser.add_argument("--prompt", default="cir", help="prompt template name")
    parser.add_argument("--tool-budget", type=int, default=4)
    parser.add_argument("--max-response-tokens", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=None, help="sandbox workers (default: CPU count)")
    parser.add_argument("--engine", default="hf", choices=ENGINES, help="generation engine")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--max-batch", type=int, default=64, help="engine: most sequences decoded together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write per-sample JSONL and a summary JSON into this folder")


def run(args) -> int:
    try:
        benchmarks = _check_inputs(args)
    except ConfigError as e:
        print(f"cir eval: {e}", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cir.engines import make_engine
    from cir.evaluate import evaluate
    from cir.metrics import write_jsonl
    from cir.prompts import get_prompt
    from cir.rollout import RolloutConfig
    from cir.sandbox import Sandbox

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    template = get_prompt(args.prompt)
    cfg = RolloutConfig(max_response_tokens=args.max_response_tokens, tool_budget=args.tool_budget)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    summary = {}
    engine = make_engine(args.engine, model, tokenizer, max_batch_size=args.max_batch, seed=args.seed, share_model=True)
    with Sandbox(workers=args.workers or None) as sandbox, engine:
        for name, problems in benchmarks.items():
            samples, temperature = PAPER_PROTOCOL.get(Path(name).stem, (1, 0.0))
            samples = args.samples if args.samples is not None else samples
            temperature = args.temperature if args.temperature is not None else temperature
            t0 = time.perf_counter()
            try:
                res = evaluate(
                    engine,
                    sandbox,
                    problems,
                    template=template,
                    rollout_config=cfg,
                    samples=samples,
                    temperature=temperature,
                    seed=args.seed,
                    progress=_progress(len(problems) * samples, name),
                )
            except ValueError as e:
                print(f"cir eval: {name}: {e}", file=sys.stderr)
                return 2
            res.metrics["seconds"] = time.perf_counter() - t0
            summary[name] = res.metrics
            print(
                f"{name:<20} acc {res.metrics['accuracy']:.1%}  tool calls {res.metrics['tool_calls']:.2f}  exec errors {res.metrics['exec_error_rate']:.1%}  ({len(problems)} problems x {samples}, T={temperature}, {res.metrics['seconds']:.0f}s)"
            )
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


def _check_inputs(args) -> dict:
    """The model path, prompt and every benchmark, checked and loaded before the model is."""
    from cir.data import DatasetError, load_problems
    from cir.models import check_model_path
    from cir.prompts import get_prompt

    check_model_path(args.model, key="--model")
    if args.tokenizer:
        check_model_path(args.tokenizer, key="--tokenizer")
    try:
        get_prompt(args.prompt)
    except KeyError as e:
        raise ConfigError(f"--prompt {args.prompt}: {e.args[0]}") from None
    benchmarks = {}
    for name in [b.strip() for b in args.benchmarks.split(",") if b.strip()]:
        try:
            benchmarks[name] = load_problems(name, split="test", limit=args.limit, benchmark_dir=args.benchmark_dir)
        except (DatasetError, OSError, KeyError, ImportError) as e:
            raise ConfigError(f"--benchmarks: {name}: {e}") from None
    return benchmarks
