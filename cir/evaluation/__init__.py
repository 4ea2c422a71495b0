"""Evaluation with the code interpreter: `evaluate` (used by `cir eval`) and its form sharded over
ranks, `evaluate_sharded` (used by the trainer), the numbers (`metrics`: pass@k, maj@k, avg@k,
tool use), answer groups for majority voting (`grading`), the per-sample JSONL with resume
(`samples_file`) and the report (`report`)."""

from cir.evaluation.run import EvalResult, evaluate, evaluate_sharded, sample_seed

__all__ = ["EvalResult", "evaluate", "evaluate_sharded", "sample_seed"]
