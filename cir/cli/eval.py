"""`cir eval`: evaluate a model on math benchmarks with the code interpreter.

Its settings are one typed section, `cir.evaluation.config.EvalConfig`, read from a YAML file
(`--config FILE`, keys named as the flags with underscores) and the flags (given flags win).
Benchmarks are run as in the paper by default: MATH500 greedy, the others 16 samples at
temperature 1. In `--out`: one JSONL of every sample per benchmark (appended as each problem
finishes), `results.json`, `report.md` and `pass_at_k.png`. Rerunning with the same `--out`
reuses the samples already there. Bad input (a setting out of range, a model folder, a
benchmark or a prompt that does not exist, an engine that cannot serve the model, a benchmark
row without an answer, an `--out` written with other settings) ends with one line and exit
code 2 before the model is loaded and before anything is written.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import fields
from pathlib import Path

import cir.tasks  # noqa: F401  (registers the built-in tasks' prompts)
from cir.config_loader import ConfigError, load
from cir.evaluation.config import EvalConfig, benchmark_stem, flag

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
    d = EvalConfig()
    parser.add_argument(
        "--config", default=None, metavar="FILE", help="a YAML file of these settings (keys: the flags' names with _)"
    )
    parser.add_argument(
        "--model", default=None, help="a Hugging Face model directory or a cir checkpoint (…/checkpoints/step_N)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument(
        "--benchmarks",
        default=None,
        help=f"comma-separated benchmark short names, JSONL paths or HF dataset names (default: {','.join(d.benchmarks)})",
    )
    parser.add_argument(
        "--benchmark-dir",
        default=None,
        help="folder holding the benchmark JSONL files (default: $CIR_BENCHMARK_DIR, else the package's own)",
    )
    parser.add_argument(
        "--samples", type=int, default=None, help="samples per problem (default: the paper's protocol per benchmark)"
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature (default: the paper's protocol)"
    )
    parser.add_argument("--limit", type=int, default=None, help="at most this many problems per benchmark")
    parser.add_argument(
        "--prompt", default=None, help=f"prompt template name (cir: plain text; cir-chat: chat; default {d.prompt})"
    )
    parser.add_argument(
        "--tool-budget", type=int, default=None, help=f"executions per sample (default {d.tool_budget})"
    )
    parser.add_argument("--max-response-tokens", type=int, default=None, help=f"default {d.max_response_tokens}")
    parser.add_argument(
        "--grade-tool-output",
        action="store_true",
        default=None,
        help="grade the whole response, interpreter output included (default: the model's own text only)",
    )
    parser.add_argument("--workers", type=int, default=None, help="sandbox workers (default: CPU count)")
    parser.add_argument(
        "--engine", default=None, help=f"generation engine, a registered name (hf, vllm; default {d.engine})"
    )
    parser.add_argument("--device", default=None, help=f"default {d.device}")
    parser.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument(
        "--max-batch", type=int, default=None, help=f"engine: most sequences decoded together (default {d.max_batch})"
    )
    parser.add_argument("--seed", type=int, default=None, help=f"default {d.seed}")
    parser.add_argument("--out", default=None, help="folder for the samples, results.json and the report")


def load_eval_config(args) -> EvalConfig:
    """The settings: the `--config` file (if any), then the flags given."""
    names = {f.name for f in fields(EvalConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "benchmarks" in values:
        values["benchmarks"] = [b.strip() for b in values["benchmarks"].split(",") if b.strip()]
    cfg = load(EvalConfig, args.config, values=values)
    if cfg.model is None:
        raise ConfigError(f"{flag('model')}: give the model folder (or `model:` in the --config file)")
    return cfg


def run(args) -> int:
    try:
        cfg = load_eval_config(args)
        benchmarks = _check_inputs(cfg)
        protocols = {name: cfg.protocol(name) for name in benchmarks}
        settings = _settings(cfg, protocols)
        out = Path(cfg.out) if cfg.out else None
        before = _check_resumable(out, settings) if out else None
    except ConfigError as e:
        print(f"cir eval: {e}", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoTokenizer

    from cir.engines.factory import engine_dtype, make_engine_from_folder
    from cir.prompts import get_prompt, prompt_token_ids
    from cir.rewards import RewardConfig
    from cir.rollout import RolloutConfig
    from cir.sandbox import Sandbox

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    # The model folder is loaded in float32 unless told otherwise (it has no training dtype here).
    dtype = getattr(torch, engine_dtype(cfg.dtype, torch.device(device).type, "float32"))
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    template = get_prompt(cfg.prompt)
    if template.use_chat_template and not getattr(tokenizer, "chat_template", None):
        print(f"cir eval: note: the tokenizer has no chat template; --prompt {cfg.prompt} is sent as plain text")
    engine = make_engine_from_folder(
        cfg.engine, cfg.model, tokenizer, dtype=dtype, device=device, max_batch_size=cfg.max_batch, seed=cfg.seed
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
        rollout_cfg = RolloutConfig(max_response_tokens=cfg.max_response_tokens, tool_budget=cfg.tool_budget)
        reward_cfg = RewardConfig(grade_tool_output=cfg.grade_tool_output)
        with Sandbox(workers=cfg.workers or None) as sandbox:
            results = _evaluate_all(
                cfg, benchmarks, protocols, settings, engine, sandbox, template, rollout_cfg, reward_cfg, out
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


def _evaluate_all(cfg, benchmarks, protocols, settings, engine, sandbox, template, rollout_cfg, reward_cfg, out):
    from cir.evaluation import evaluate
    from cir.evaluation.grading import answer_groups
    from cir.evaluation.metrics import breakdowns, overall, summarise
    from cir.evaluation.samples_file import SamplesFile

    summaries, seconds, reused_total = {}, {}, 0
    for name, problems in benchmarks.items():
        samples, temperature = protocols[name]
        store = SamplesFile(out / f"{benchmark_stem(name)}.jsonl") if out else None
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
            seed=cfg.seed,
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


def _settings(cfg: EvalConfig, protocols: dict) -> dict:
    return {
        # A local folder by its full path, so `./m` and `/abs/m` are the same model on resume.
        "model": str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else str(cfg.model),
        "tokenizer": cfg.tokenizer,
        "prompt": cfg.prompt,
        "tool_budget": cfg.tool_budget,
        "max_response_tokens": cfg.max_response_tokens,
        "seed": cfg.seed,
        "grade_tool_output": cfg.grade_tool_output,
        "engine": cfg.engine,
        "benchmarks": {name: {"samples": s, "temperature": t} for name, (s, t) in protocols.items()},
        "limit": cfg.limit,
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


def _check_inputs(cfg: EvalConfig) -> dict:
    """The model path, prompt, engine and every benchmark, checked and loaded before the model is."""
    from cir.data import BENCHMARKS, DatasetError, load_problems
    from cir.engines.factory import engine_refuses
    from cir.models import check_model_path, model_architecture
    from cir.prompts import get_prompt

    check_model_path(cfg.model, key=flag("model"))
    if cfg.tokenizer:
        check_model_path(cfg.tokenizer, key=flag("tokenizer"))
    try:
        get_prompt(cfg.prompt)
    except KeyError as e:
        raise ConfigError(f"{flag('prompt')} {cfg.prompt}: {e.args[0]}") from None
    problem = engine_refuses(cfg.engine, model_architecture(cfg.model))
    if problem is not None:
        raise ConfigError(f"{flag('engine')} {cfg.engine} with {flag('model')} {cfg.model}: {problem}")
    benchmarks = {}
    for name in cfg.benchmarks:
        if not Path(name).expanduser().exists() and name not in BENCHMARKS and "/" not in name:
            # Not a file, not a bundled benchmark, and not "org/name": a typo, not a hub dataset.
            raise ConfigError(
                f"{flag('benchmarks')}: {name}: unknown benchmark; known: {', '.join(BENCHMARKS)}, "
                "or a .jsonl/.json/.parquet file, or a Hugging Face dataset (org/name)"
            )
        try:
            benchmarks[name] = load_problems(name, split="test", limit=cfg.limit, benchmark_dir=cfg.benchmark_dir)
        except (DatasetError, OSError, KeyError, ImportError, ValueError) as e:
            raise ConfigError(f"{flag('benchmarks')}: {name}: {e}") from None
        seen: set[str] = set()
        for problem in benchmarks[name]:
            if problem.id in seen:
                # Samples are stored and resumed by (problem id, sample).
                raise ConfigError(
                    f"{flag('benchmarks')}: {name}: problem id {problem.id!r} appears twice; ids must be unique"
                )
            seen.add(problem.id)
    return benchmarks
