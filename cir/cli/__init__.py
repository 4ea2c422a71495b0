"""The `cir` command.

Each subcommand lives in its own module, which provides ``register(parser)`` (adds its
arguments) and ``run(args) -> int``. Modules are imported only when their command runs, so
``cir --help`` stays fast and ``cir sandbox run`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (command path, module, one-line help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("train",), "cir.cli.train", "train a policy with code-integrated RL (no arguments: the built-in CPU demo)"),
    (("eval",), "cir.cli.eval", "evaluate a model on math benchmarks with the code interpreter"),
    (("sandbox", "run"), "cir.cli.sandbox", "run Python snippets from a JSONL file in the sandbox"),
    (("bench", "sandbox"), "cir.bench.sandbox", "sandbox throughput/latency/fidelity vs a process-pool baseline"),
    (("bench", "kernels"), "cir.bench.kernels", "fused log-prob and policy-loss kernels vs torch baselines"),
    (("bench", "rollout"), "cir.bench.rollout", "asynchronous vs turn-synchronous rollout throughput"),
    (("bench", "estimate"), "cir.bench.estimate", "expected per-GPU memory and step time of a run (estimates)"),
    (
        ("bench", "step"),
        "cir.bench.step",
        "one RL update measured: time, memory, phases, vs the estimate and the matmul floor",
    ),
]


def _build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="cir",
        description="cir: train language models to reason with a code interpreter (RL with a C++ sandbox and fused Triton kernels).",
        epilog="Run `cir COMMAND --help` for a command's options. `cir train` with no arguments runs the built-in CPU demo.",
    )
    parser.add_argument("--version", action="version", version=f"cir {_version()}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    handlers: dict = {}
    for path, module, help_text in COMMANDS:
        if len(path) == 1:
            sub = top.add_parser(path[0], help=help_text, description=help_text)
        else:
            if path[0] not in groups:
                grp = top.add_parser(path[0], help=f"{path[0]} commands")
                groups[path[0]] = grp.add_subparsers(dest=f"{path[0]}_command", metavar="COMMAND")
            sub = groups[path[0]].add_parser(path[1], help=help_text, description=help_text)
        # Only import the module of the command being run (keeps --help and light commands fast).
        if _selected(path, argv):
            mod = importlib.import_module(module)
            mod.register(sub)
            sub.set_defaults(_run=mod.run)
        handlers[path] = sub
    return parser, handlers


def _selected(path: tuple[str, ...], argv: list[str]) -> bool:
    words = [a for a in argv if not a.startswith("-")]
    return tuple(words[: len(path)]) == path


def _version() -> str:
    from cir import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, _ = _build_parser(argv)
    args = parser.parse_args(argv)
    # The rollout tokenizes one short feedback block at a time from the event-loop thread:
    # the tokenizer's own thread pool buys nothing there and only adds threads competing with
    # the engine and the sandbox for the cores. A user's explicit setting wins.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run = getattr(args, "_run", None)
    if run is None:
        # `cir` alone or `cir bench` alone: show help. `cir train` always has a handler.
        parser.print_help()
        return 0 if not argv else 2
    return int(run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
