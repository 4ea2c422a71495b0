"""`cir eval`: evaluate a model on math benchmarks with the code interpreter.

Benchmarks are run as in the paper by default: MATH500 greedy, the others 16 samples at
temperature 1. In `--out`: one JSONL of every sample per benchmark (appended as each problem
finishes), `results.json`, `report.md` and `pass_at_k.png`. Rerunning with the same `--out`
reuses the samples already there. Bad input (a model folder, a benchmark or a prompt that does
not exist, a benchmark row without an answer, an `--out` written with other settings) ends
with one line and exit code 2 before the model is loaded and before anything is written.
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
SETTINGS_FILE = "eval_settings.json"
# Settings that change what a sample is: an `--out` written under other values is not reused.
SAMPLE_SETTINGS = (
    "model",
    "prompt",
    "tool_budget",
    "max_response_tokens",
    "seed",
    "grade_tool_output",
    "engine",
    "benchmarks",
)


def register(parser) -> None:
    parser.add_argument(
        "--model", required=True, help="a Hugging Face model directory or a cir checkpoint (…/checkpoints/step_N)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument(
        "--benchmarks",
        default="math500,aime24,aime25,amc23,olymmath-en-easy,olymmath-en-hard",
        help="comma-separated benchmark short names, JSONL paths or HF dataset names",
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
    parser.add_argument("--prompt", default="cir", help="prompt template name (cir: plain text; cir-chat: chat)")
    parser.add_argument("--tool-budget", type=int, default=4, help="executions per sample")
    parser.add_argument("--max-response-tokens", type=int, default=4096)
    parser.add_argument(
        "--grade-tool-output",
        action="store_true",
        help="grade the whole response, interpreter output included (default: the model's own text only)",
    )
    parser.add_argument("--workers", type=int, default=None, help="sandbox workers (default: CPU count)")
    parser.add_argument("--engine", default="hf", choices=ENGINES, help="generation engine")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--max-batch", type=int, default=64, help="engine: most sequences decoded together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for the samples, results.json and the report")


def run(args) -> int:
    try:
        benchmarks = _check_inputs(args)
        protocols = {name: _protocol(name, args) for name in benchmarks}
        settings = _settings(args, protocols)
        out = Path(args.out) if args.out else None
        before = _check_resumable(out, settings) if out else None
    except ConfigError as e:
        print(f"cir eval: {e}", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoTokenizer

    from cir.engines.factory import make_engine_from_folder
    from cir.prompts import get_prompt, prompt_token_ids
    from cir.rewards import RewardConfig
    from cir.rollout import RolloutConfig
    from cir.sandbox import Sandbox

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    template = get_prompt(args.prompt)
    if template.use_chat_template and not getattr(tokenizer, "chat_template", None):
        print(f"cir eval: note: the tokenizer has no chat template; --prompt {args.prompt} is sent as plain text")
    engine = make_engine_from_folder(
        args.engine, args.model, tokenizer, dtype=dtype, device=device, max_batch_size=args.max_batch, seed=args.seed
    )
    with engine:
        try:
            _check_prompt_lengths(benchmarks, template, tokenizer, engine.max_model_len, prompt_token_ids)
        except ConfigError as e:
            print(f"cir eval: {e}", file=sys.stderr)
            return 2
        if out:
            out.mkdir(parents=True, exist_ok=True)
            # Benchmarks sampled earlier into this folder stay on record (their temperatures).
            earlier = (before or {}).get("benchmarks", {})
            _write_json(out / SETTINGS_FILE, {**settings, "benchmarks": {**earlier, **settings["benchmarks"]}})
        rollout_cfg = RolloutConfig(max_response_tokens=args.max_response_tokens, tool_budget=args.tool_budget)
        reward_cfg = RewardConfig(grade_tool_output=args.grade_tool_output)
        with Sandbox(workers=args.workers or None) as sandbox:
            results = _evaluate_all(
                args, benchmarks, protocols, settings, engine, sandbox, template, rollout_cfg, reward_cfg, out
            )
    from cir.evaluation.report import markdown_report, plot_pass_at_k, terminal_table, write_results_json

    print(terminal_table(results))
    if out:
        write_results_json(out / "results.json", results)
        (out / "report.md.tmp").write_text(markdown_report(results))
        (out / "report.md.tmp").replace(out / "report.md")
        plot_pass_at_k(out / "pass_at_k.png", results)
        print(f"cir eval: wrote {out}/results.json, report.md, pass_at_k.png and one JSONL per benchmark")
    return 0


def _evaluate_all(args, benchmarks, protocols, settings, engine, sandbox, template, rollout_cfg, reward_cfg, out):
    from cir.evaluation import evaluate
    from cir.evaluation.grading import answer_groups
    from cir.evaluation.metrics import breakdowns, overall, summarise
    from cir.evaluation.samples_file import SamplesFile

    summaries, seconds, reused_total = {}, {}, 0
    for name, problems in benchmarks.items():
        samples, temperature = protocols[name]
        store = SamplesFile(out / f"{_stem(name)}.jsonl") if out else None
        done = store.rows if store else {}
        t0 = time.perf_counter()
        res = evaluate(
            engine,
            sandbox,
            problems,
            template=template,
            rollout_config=rollout_cfg,
            reward_config=reward_cfg,
            samples=samples,
            temperature=temperature,
            seed=args.seed,
            progress=_progress(len(problems) * samples, name),
            done=done,
            on_problem=store.append if store else None,
        )
        seconds[name] = time.perf_counter() - t0
        reused_total += res.reused
        if res.reused:
            print(f"cir eval: {name}: reused {res.reused} of {len(res.rows)} samples from {store.path}")
        if store:
            store.finalize(res.rows)
        by_problem: dict[str, list[dict]] = {}
        for row in res.rows:
            by_problem.setdefault(str(row["id"]), []).append(row)
        labels = answer_groups(
            [([r["extracted_answer"] for r in rs], [r["correct"] for r in rs]) for rs in by_problem.values()],
            reward_cfg.grader_timeout_s,
        )
        groups = dict(zip(by_problem, labels))
        summary = summarise(res.rows, temperature=temperature, groups=groups)
        summary["by"] = breakdowns(res.rows, temperature=temperature, groups=groups)
        summaries[name] = summary
        print(
            f"{name:<20} score {summary['score']:.1%} ({summary['protocol']}, {len(problems)} problems, "
            f"{seconds[name]:.0f}s)"
        )
    return {
        "settings": settings,
        "benchmarks": summaries,
        "overall": overall(summaries),
        "run": {"seconds": seconds, "reused_samples": reused_total},
    }


def _protocol(name: str, args) -> tuple[int, float]:
    samples, temperature = PAPER_PROTOCOL.get(_stem(name), (1, 0.0))
    samples = args.samples if args.samples is not None else samples
    temperature = args.temperature if args.temperature is not None else temperature
    if samples < 1:
        raise ConfigError(f"--samples {samples}: must be >= 1")
    if temperature < 0:
        raise ConfigError(f"--temperature {temperature}: must be >= 0")
    return samples, temperature


def _stem(name: str) -> str:
    return Path(name).stem if name.lower().endswith((".jsonl", ".json", ".parquet")) else name.replace("/", "__")


def _settings(args, protocols: dict) -> dict:
    return {
        # A local folder by its full path, so `./m` and `/abs/m` are the same model on resume.
        "model": str(Path(args.model).resolve()) if Path(args.model).exists() else str(args.model),
        "tokenizer": args.tokenizer,
        "prompt": args.prompt,
        "tool_budget": args.tool_budget,
        "max_response_tokens": args.max_response_tokens,
        "seed": args.seed,
        "grade_tool_output": bool(args.grade_tool_output),
        "engine": args.engine,
        "benchmarks": {name: {"samples": s, "temperature": t} for name, (s, t) in protocols.items()},
        "limit": args.limit,
    }


def _check_resumable(out: Path, settings: dict) -> dict | None:
    """The settings an earlier run recorded in `out` (None: a fresh folder). An `--out`
    holding samples made under other settings is refused (their samples would be mixed with
    new ones); a different number of samples or problems is fine."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    path = out / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        before = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--out {out}: cannot read {SETTINGS_FILE} ({e}); use another --out") from None
    for key in SAMPLE_SETTINGS:
        old, new = before.get(key), settings[key]
        if key == "benchmarks":
            old = {n: b["temperature"] for n, b in (old or {}).items()}
            new = {n: b["temperature"] for n, b in new.items()}
            clash = {n: (old[n], t) for n, t in new.items() if n in old and old[n] != t}
            if clash:
                name, (was, now) = next(iter(clash.items()))
                raise ConfigError(f"--out {out}: {name} was sampled at temperature {was}, now {now}; use another --out")
        elif old != new:
            raise ConfigError(f"--out {out}: its samples were made with {key}={old!r}, now {new!r}; use another --out")
    return before


def _check_prompt_lengths(benchmarks, template, tokenizer, max_model_len, prompt_token_ids) -> None:
    from cir.data import find_overlong, overlong_message  # the rule `cir train` applies too

    for name, problems in benchmarks.items():
        count = lambda p: len(prompt_token_ids(template, p.problem, tokenizer))  # noqa: E731
        overlong = find_overlong(problems, count, max_model_len)
        if overlong:
            raise ConfigError(f"--benchmarks: {name}: {overlong_message(overlong, len(problems), max_model_len)}")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _progress(total: int, desc: str):
    if not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False)
    return lambda traj: bar.update(1)


def _check_inputs(args) -> dict:
    """The model path, prompt and every benchmark, checked and loaded before the model is."""
    from cir.data import BENCHMARKS, DatasetError, load_problems
    from cir.models import check_model_path
    from cir.prompts import get_prompt

    check_model_path(args.model, key="--model")
    if args.tokenizer:
        check_model_path(args.tokenizer, key="--tokenizer")
    try:
        get_prompt(args.prompt)
    except KeyError as e:
        raise ConfigError(f"--prompt {args.prompt}: {e.args[0]}") from None
    for flag, value, least in (
        ("--tool-budget", args.tool_budget, 0),
        ("--max-response-tokens", args.max_response_tokens, 1),
    ):
        if value < least:
            raise ConfigError(f"{flag} {value}: must be >= {least}")
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    if not names:
        raise ConfigError("--benchmarks: no benchmark named")
    benchmarks = {}
    for name in names:
        if not Path(name).expanduser().exists() and name not in BENCHMARKS and "/" not in name:
            # Not a file, not a bundled benchmark, and not "org/name": a typo, not a hub dataset.
            raise ConfigError(
                f"--benchmarks: {name}: unknown benchmark; known: {', '.join(BENCHMARKS)}, "
                "or a .jsonl/.json/.parquet file, or a Hugging Face dataset (org/name)"
            )
        try:
            benchmarks[name] = load_problems(name, split="test", limit=args.limit, benchmark_dir=args.benchmark_dir)
        except (DatasetError, OSError, KeyError, ImportError, ValueError) as e:
            raise ConfigError(f"--benchmarks: {name}: {e}") from None
        seen: set[str] = set()
        for problem in benchmarks[name]:
            if problem.id in seen:
                # Samples are stored and resumed by (problem id, sample).
                raise ConfigError(f"--benchmarks: {name}: problem id {problem.id!r} appears twice; ids must be unique")
            seen.add(problem.id)
    return benchmarks
