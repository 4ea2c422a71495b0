"""`cir train`: load and check the config, run the trainer, print the before/after table.

Bad input (a config key or value, a missing data file or model folder, a benchmark name, an
engine that cannot serve the model) ends with one line naming the key and value and exit code
2, before anything heavy starts: loading and checking the config imports neither torch nor
transformers. `--print-config` writes the resolved config to stdout (`cir train --print-config
> run.yaml`); everything else the run says goes to stderr.

Exit codes: 0 done; 2 bad input; 3 stopped because sandbox faults stayed above
`sandbox.fault_stop_share` (a checkpoint is saved: `--resume` continues); 130 stopped by Ctrl-C
or SIGTERM (a checkpoint is saved).
"""

from __future__ import annotations

import os
import re
import sys
import time

import cir.tasks  # noqa: F401  (registers the built-in tasks: the demo's data, model, prompt, section)
from cir.config_loader import ConfigError

# A KEY=VALUE override (`optim.lr=2e-6`), as opposed to a checkpoint path given to --resume.
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")


def register(parser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="a YAML file or a bundled config name (cir/configs: demo, paper, GPU recipes); default: the CPU demo",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CKPT",
        help="continue from the newest checkpoint in run.out_dir (or from the given checkpoint folder; a KEY=VALUE "
        "after --resume is an override, not a folder)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config (YAML, to stdout) and exit"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override config fields, e.g. optim.lr=2e-6 algo.group_size=8"
    )


def run(args) -> int:
    from cir.training.config import check_run_inputs, dump_yaml, load_train_config

    resume, overrides = _resume_and_overrides(args.resume, args.overrides)
    try:
        cfg = load_train_config(args.config, overrides)
        if args.print_config:
            if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 only (no process group needed)
                print(dump_yaml(cfg), end="")
            return 0
        check_run_inputs(cfg)  # this machine: the run folder, the engine, the model, the prompt
    except ConfigError as e:
        print(f"cir train: {e}", file=sys.stderr)
        return 2
    from cir.distributed import init_distributed

    # Under torchrun every rank runs this; rank 0 prints, logs and writes. run.device=cpu joins
    # over gloo even where CUDA is available.
    dist = init_distributed(device=cfg.run.device)
    if dist.is_main:
        print(dump_yaml(cfg), file=sys.stderr)
    from cir.training.trainer import Trainer

    t0 = time.perf_counter()
    try:
        trainer = Trainer(cfg, resume=resume or False, dist=dist)
    except ConfigError as e:
        print(f"cir train: {e}", file=sys.stderr)
        return 2
    with trainer:
        result = trainer.fit()
    if result["fault"]:
        return 3  # the machine's faults stopped it (the trainer said which, and saved a checkpoint)
    if result["stopped"]:
        return 130  # the shell's code for "ended by Ctrl-C"; the checkpoint is already written
    if not dist.is_main:
        return 0
    if result["before"] and result["after"]:
        strip = lambda m: {k.split("/", 1)[1] if k.startswith("eval/") else k: v for k, v in m.items()}  # noqa: E731
        names = ", ".join(trainer.eval_sets)
        table = summary_table(strip(result["before"]), strip(result["after"]))
        print(f"\nheld-out evaluation ({names}), before vs after RL\n{table}")
    print(
        f"\nrun folder: {cfg.run.out_dir} (metrics.jsonl, tensorboard/, checkpoints/, curves.png); "
        f"{time.perf_counter() - t0:.0f}s in all"
    )
    return 0


def _resume_and_overrides(resume: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`--resume` takes the word after it as a checkpoint folder unless that word is a KEY=VALUE
    override (`cir train --resume optim.lr=1e-6`): then it resumes from the newest checkpoint and
    the word is the first override."""
    if resume is not None and _OVERRIDE.match(resume):
        return "latest", [resume, *overrides]
    return resume, list(overrides)


def categories_of(metrics: dict) -> list[str]:
    """The problem categories an evaluation broke its metrics down by ("hard/accuracy", ...),
    largest first."""
    found = {k.split("/")[0] for k in metrics if k.count("/") == 1 and k.endswith("/accuracy")}
    return sorted(found, key=lambda c: (-metrics.get(f"{c}/count", 0), c))


def summary_table(before: dict, after: dict) -> str:
    """The before/after table `cir train` prints at the end: overall, then per category."""
    categories = categories_of(after or before)
    rows = [
        ("accuracy", "accuracy", "{:.1%}"),
        ("tool calls / problem", "tool_calls", "{:.2f}"),
        ("execution errors / call", "exec_error_rate", "{:.1%}"),
    ]
    lines = [f"{'held-out problems':<34}{'before RL':>12}{'after RL':>12}", "-" * 58]
    for scope in ("all", *categories):
        for label, key, fmt in rows:
            k = key if scope == "all" else f"{scope}/{key}"
            if k in before or k in after:
                b = before.get(k)
                a = after.get(k)
                name = f"{label} ({scope})"
                lines.append(
                    f"{name:<34}{(fmt.format(b) if b is not None else '-'):>12}{(fmt.format(a) if a is not None else '-'):>12}"
                )
    return "\n".join(lines)
