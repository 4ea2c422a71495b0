"""Evaluation with the code interpreter: `evaluate(...)`, used by the trainer and `cir eval`.

Each problem is rolled out `samples` times with the same loop as training (stop at the
closing fence, execute, feed the output back), graded with the math reward, and summarised:
accuracy (mean over samples), tool calls per problem, execution errors per call, response
length, broken down by the problem's `meta["category"]` when it has one. Benchmarks are
reported as in the paper: MATH500 greedy, the others mean accuracy over 16 samples.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cir.data import Problem
from cir.prompts import prompt_token_ids
from cir.rewards import RewardConfig, score_trajectories
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
    trajs = rollout(
        engine, sandbox, prompts, cfg, mode=mode, seeds=seeds, problem_ids=[p.id for p in metas], progress=progress
    )
    rewards = score_trajectories(trajs, [p.answer for p in metas], tokenizer, reward_config, cfg.max_response_tokens)
    texts = [t.text(tokenizer) for t in trajs]
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
