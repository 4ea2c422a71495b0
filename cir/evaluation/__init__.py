"""Evaluation with the code interpreter: `evaluate` (used by the trainer and `cir eval`), the
numbers (`metrics`: pass@k, maj@k, avg@k, tool use), answer groups for majority voting
(`grading`), the per-sample JSONL with resume (`samples_file`) and the report (`report`)."""

from cir.evaluation.run import EvalResult, evaluate, sample_seed

__all__ = ["EvalResult", "evaluate", "sample_seed"]
