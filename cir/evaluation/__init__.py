"""Evaluation with the code interpreter: `evaluate` (used by `cir eval`) and its form sharded over
ranks, `evaluate_sharded` (used by the trainer), the numbers (`metrics`: pass@k, maj@k, avg@k,
tool use), answer groups for majority voting (`grading`), the per-sample JSONL with resume
(`samples_file`), the report (`report`) and `cir eval`'s settings (`config`: `EvalConfig`).

`evaluate`, `evaluate_sharded` and `EvalResult` are imported from `run` on first use, so that
the settings load without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cir.lazy import lazy_attributes

_LAZY_NAMES = {"EvalResult": "run", "evaluate": "run", "evaluate_sharded": "run", "EvalConfig": "config"}

__all__ = ["EvalConfig", "EvalResult", "evaluate", "evaluate_sharded"]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_NAMES)


if TYPE_CHECKING:
    from cir.evaluation.config import EvalConfig
    from cir.evaluation.run import EvalResult, evaluate, evaluate_sharded
