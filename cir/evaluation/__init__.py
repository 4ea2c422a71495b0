"""Evaluation with the code interpreter: `evaluate` (used by `cir eval`) and its form sharded over
ranks, `evaluate_sharded` (used by the trainer), the numbers (`metrics`: pass@k, maj@k, avg@k,
tool use), answer groups for majority voting (`grading`), the per-sample JSONL with resume
(`samples_file`), the report (`report`) and `cir eval`'s settings (`config`: `EvalConfig`).

`evaluate`, `evaluate_sharded` and `EvalResult` are imported from `run` on first use, so that
the settings load without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY_NAMES = {"EvalResult": "run", "evaluate": "run", "evaluate_sharded": "run", "EvalConfig": "config"}

__all__ = ["EvalConfig", "EvalResult", "evaluate", "evaluate_sharded"]


def __getattr__(name: str) -> Any:
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups find it without coming back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))


if TYPE_CHECKING:
    from cir.evaluation.config import EvalConfig
    from cir.evaluation.run import EvalResult, evaluate, evaluate_sharded
