"""`evaluate`: roll out every (problem, sample) with the interpreter and grade it, one problem at a time.

Each problem is rolled out `samples` times with the training loop (stop at the closing fence,
execute, feed the output back) and graded with the run's reward on the model's own words
(`cir.rewards.grading_text`). A sample the machine could not finish or grade (a sandbox fault,
a grader timeout or crash) gets a row with ``fault`` set: the metrics leave it out and count it,
and a rerun over the same samples file draws it again. As soon as all samples of a problem are finished they are graded
on a writer thread (so grading overlaps generation) and handed to `on_problem`: `cir eval`
appends them to its JSONL there, so a killed run loses only the problems in flight. Samples in
`done` (read back from that JSONL) are not generated again.

`evaluate_sharded` splits the problems over the ranks of a `torchrun` job and gathers the rows
to rank 0. A sample's seed is `sample_seed(seed, position, sample)` (`cir.rollout.seeds`, the
trainer's derivation too): it follows its problem's position in the whole set, so the rows are
the same whatever the number of ranks, and a resumed run draws the samples an uninterrupted one
would.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from cir.data import Problem
from cir.distributed import DistributedContext
from cir.evaluation.metrics import BREAKDOWN_FIELDS, trainer_summary
from cir.prompts import prompt_token_ids, render
from cir.rewards import (
    RewardConfig,
    answer_only_in_tool_output,
    compute_rewards,
    model_text,
    reward_info_from_trajectory,
)
from cir.rollout import RolloutConfig, rollout, sample_seed
from cir.trajectory import Trajectory


@dataclass
class EvalResult:
    metrics: dict[str, float]  # the trainer's numbers (accuracy, tool calls, ...), per category too
    rows: list[dict] = field(default_factory=list)  # one per (problem, sample), in that order
    reused: int = 0  # rows taken from `done` instead of generated


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
    done: Mapping[tuple[str, int], dict] | None = None,
    on_problem: Callable[[list[dict]], None] | None = None,
    first_index: int = 0,
) -> EvalResult:
    """Evaluate `problems`; see the module docstring.

    done: rows already graded, by (problem id, sample); they are reused as they are, but for
        rows with a fault (the machine's, not the model's): those samples are drawn again.
    on_problem: called on the writer thread with the new rows of each finished problem.
    first_index: the position of `problems[0]` in the whole set when `problems` is a shard of
        it; rows and sampling seeds use the whole set's positions, so a shard's samples are
        the ones an unsharded run draws for the same problems.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    tokenizer = engine.tokenizer
    cfg = replace(rollout_config, temperature=temperature)
    reward_config = reward_config or RewardConfig()
    done = {key: row for key, row in (done or {}).items() if not row.get("fault")}
    prompts: list[list[int]] = []
    seeds: list[int] = []
    requests: list[tuple[int, int]] = []  # (problem index, sample) of each rollout request
    pending: dict[int, int] = {}  # problem index -> samples still in flight
    prompt_texts: dict[int, str] = {}
    for i, p in enumerate(problems):
        todo = [s for s in range(samples) if (p.id, s) not in done]
        if not todo:
            continue
        ids = prompt_token_ids(template, p.problem, tokenizer)
        prompt_texts[i] = render(template, p.problem, tokenizer)
        pending[i] = len(todo)
        for s in todo:
            prompts.append(ids)
            seeds.append(sample_seed(seed, first_index + i, s))
            requests.append((i, s))

    finished: dict[int, list[dict]] = {i: [] for i in pending}
    graded: list[dict] = []
    work: queue.Queue = queue.Queue()
    errors: list[BaseException] = []

    def on_trajectory(trajectory: Trajectory) -> None:
        # Runs on the rollout's event loop: decoding only, grading is the writer's.
        i, s = requests[trajectory.group]
        finished[i].append(
            _partial_row(
                problems[i],
                first_index + i,
                s,
                seeds[trajectory.group],
                prompt_texts[i],
                trajectory,
                tokenizer,
                reward_config,
                cfg.max_response_tokens,
            )
        )
        pending[i] -= 1
        if pending[i] == 0:
            work.put(i)
        if progress is not None:
            progress.update(1) if hasattr(progress, "update") else progress(trajectory)

    def writer() -> None:
        while (i := work.get()) is not None:
            if errors:
                continue
            try:
                rows = sorted(finished.pop(i), key=lambda r: r["sample"])
                _grade(rows, problems[i].answer, reward_config)
                if on_problem is not None:
                    on_problem(rows)
                graded.extend(rows)
            except BaseException as exc:  # reported on the caller's thread
                errors.append(exc)

    thread = threading.Thread(target=writer, name="cir-eval-writer", daemon=True)
    thread.start()
    try:
        if prompts:
            rollout(
                engine,
                sandbox,
                prompts,
                cfg,
                mode=mode,
                seeds=seeds,
                problem_ids=[problems[i].id for i, _ in requests],
                groups=list(range(len(requests))),
                progress=on_trajectory,
            )
    finally:
        work.put(None)
        thread.join()
    if errors:
        raise errors[0]
    reused = [done[(p.id, s)] for p in problems for s in range(samples) if (p.id, s) in done]
    order = {p.id: i for i, p in enumerate(problems)}
    rows = sorted([*reused, *graded], key=lambda r: (order[r["id"]], r["sample"]))
    return EvalResult(metrics=trainer_metrics(rows), rows=rows, reused=len(reused))


def evaluate_sharded(
    dist: DistributedContext, engine, sandbox, problems: Sequence[Problem], **kwargs
) -> EvalResult | None:
    """`evaluate` with the problems split over ranks: each rank rolls out its contiguous share with
    its own engine and sandbox, and rank 0 gets every row, in the set's order, and the metrics
    of them all (computed from the rows, so accuracy and the per-category splits are those of
    one process evaluating the whole set). Returns None on the other ranks; every rank must
    call it with the same problems. `kwargs` are `evaluate`'s."""
    start, end = dist.shard_bounds(len(problems))
    mine = evaluate(engine, sandbox, problems[start:end], first_index=start, **kwargs)
    shards = dist.gather_to_main((mine.rows, mine.reused))
    if shards is None:
        return None
    # Shards are contiguous and gathered in rank order, so concatenating keeps the set's order.
    rows = [row for shard_rows, _ in shards for row in shard_rows]
    return EvalResult(metrics=trainer_metrics(rows), rows=rows, reused=sum(reused for _, reused in shards))


def _partial_row(
    problem: Problem, index: int, sample: int, seed: int, prompt: str, t: Trajectory, tokenizer, reward_config, limit
) -> dict:
    """One sample's row, all but the grade (the writer thread adds it)."""
    own = model_text(t, tokenizer)
    full = t.text(tokenizer)
    segments, pos = [], 0
    for call in t.tool_calls:
        start, end = call.feedback_span
        if start > pos:
            segments.append({"source": "model", "text": tokenizer.decode(t.response_ids[pos:start])})
        if end > start:
            segments.append({"source": "interpreter", "text": tokenizer.decode(t.response_ids[start:end])})
        pos = end
    if pos < len(t.response_ids):
        segments.append({"source": "model", "text": tokenizer.decode(t.response_ids[pos:])})
    return {
        "id": problem.id,
        "index": index,
        "sample": sample,
        "seed": seed,
        "problem": problem.problem,
        "answer": problem.answer,
        "meta": {k: problem.meta[k] for k in BREAKDOWN_FIELDS if k in problem.meta},
        "prompt": prompt,
        "response": full,
        "segments": segments,  # the response in order: the model's text and the interpreter's output blocks
        "calls": [
            {"code": c.code, "status": c.status, "output": c.output, "wall_ms": c.wall_ms, "truncated": c.truncated}
            for c in t.tool_calls
        ],
        "tool_calls": t.num_tool_calls,
        "exec_errors": t.num_exec_errors,
        "timeouts": t.num_timeouts,
        "model_tokens": t.num_model_tokens,
        "feedback_tokens": t.num_feedback_tokens,
        "finish_reason": t.finish_reason,
        "answer_only_in_tool_output": answer_only_in_tool_output(own, full),
        # What the writer thread grades (then dropped from the row).
        "_grading": (full if reward_config.grade_tool_output else own, reward_info_from_trajectory(t, limit)),
    }


def _grade(rows: list[dict], reference: str, config: RewardConfig) -> None:
    texts, infos = zip(*(row.pop("_grading") for row in rows))
    results = compute_rewards(None, list(texts), [reference] * len(rows), list(infos), config)
    for row, result in zip(rows, results):
        row["extracted_answer"] = result.info.get("answer")
        row["correct"] = bool(result.correct)
        row["reward"] = float(result.reward)
        row["grade_reason"] = result.info.get("reason", "")
        # Set when the machine left the sample ungraded (its correct/reward then mean nothing):
        # "sandbox", "grader_timeout" or "grader_crash". Metrics leave the row out and count it.
        row["fault"] = result.fault


def trainer_metrics(rows: list[dict]) -> dict[str, float]:
    """The trainer's numbers of a held-out set, overall and per category, from its rows."""
    metrics = trainer_summary(rows)
    categories = sorted({str(r["meta"]["category"]) for r in rows if r["meta"].get("category")})
    for cat in categories:
        metrics.update(trainer_summary([r for r in rows if str(r["meta"].get("category")) == cat], prefix=f"{cat}/"))
    return metrics
