"""The built-in demo: `cir train` with no arguments.

A task that is hard to do in the head and easy with code: multi-digit products with an
addition or subtraction (``347*29+118``), mixed with single-digit sums (``3+4``) where the
interpreter does not help. A tiny Qwen2 model (built from a config, random weights, a
byte-level tokenizer made in memory: nothing is downloaded) is warm-started briefly on mixed
traces, some answering directly and some calling the interpreter, and then trained by RL
with the real rollout loop, sandbox, rewards and trainer. On held-out problems, accuracy and
tool use on the hard problems rise; on the easy ones there is nothing to gain from the tool.
"""

from __future__ import annotations

import random
import time
from typing import Sequence

import torch

from cir.data import Problem
from cir.prompts import PromptTemplate, get_prompt, prompt_token_ids, register_prompt
from cir.rollout import build_feedback
from cir.trajectory import Trajectory

PROMPT_NAME = "demo"


def _register_prompt() -> PromptTemplate:
    try:
        return get_prompt(PROMPT_NAME)
    except KeyError:
        return register_prompt(PromptTemplate(PROMPT_NAME, system="", user_format="Q: {problem}=?\n", use_chat_template=False))


DEMO_PROMPT = _register_prompt()


def make_problem(rng: random.Random, easy_share: float) -> tuple[str, int, str]:
    """(expression, value, category)."""
    if rng.random() < easy_share:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a}+{b}", a + b, "easy"
    a, b, c = rng.randint(100, 999), rng.randint(10, 99), rng.randint(10, 999)
    op = rng.choice("+-")
    expr = f"{a}*{b}{op}{c}"
    return expr, a * b + c if op == "+" else a * b - c, "hard"


def demo_problems(n: int, seed: int, easy_share: float = 0.25, exclude: set[str] | None = None) -> list[Problem]:
    """`n` distinct problems (none of `exclude`), deterministic in `seed`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct demo problems")
        expr, value, category = make_problem(rng, easy_share)
        # Easy sums repeat by nature (100 of them); keep them, but no hard repeats or overlap.
        if category == "hard" and expr in seen:
            continue
        seen.add(expr)
        out.append(Problem(id=f"demo-{seed}-{len(out)}", problem=expr, answer=str(value), source="demo", meta={"category": category}))
    return out


def demo_tokenizer():
    from cir.tokenization import byte_tokenizer

    return byte_tokenizer()


def demo_model(tokenizer, hidden_size: int, num_layers: int, num_heads: int, seed: int):
    from cir.models import tiny_causal_lm

    return tiny_causal_lm(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=max(1, num_heads // 2),
        intermediate_size=3 * hidden_size,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        seed=seed,
    )


def make_trace(tokenizer, problem: Problem, use_tool: bool, feedback_template: str) -> Trajectory:
    """A trajectory built exactly as the rollout loop builds one: model segments encoded
    alone and the feedback block from the rollout's own `build_feedback` (loss_mask 0)."""
    traj = Trajectory(prompt_ids=prompt_token_ids(DEMO_PROMPT, problem.problem, tokenizer))
    enc = lambda s: list(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    if use_tool:
        traj.append(enc(f"```python\nprint({problem.problem})\n```"), None, trainable=True)
        fb = build_feedback(tokenizer, problem.answer, template=feedback_template, prefix="\n")
        traj.append(fb.ids, None, trainable=False)
    traj.append(enc(f"\\boxed{{{problem.answer}}}") + [tokenizer.eos_token_id], None, trainable=True)
    return traj


def warm_start(
    model,
    tokenizer,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    tool_share: dict[str, float],
    easy_share: float,
    feedback_template: str,
    seed: int,
    exclude: set[str],
    progress: bool = True,
) -> dict:
    """Supervised warm start on mixed traces (feedback tokens masked out of the loss, as in
    RL). Returns a few numbers for the log."""
    from cir.policy import collate, token_logprobs

    rng = random.Random(seed + 17)
    problems = demo_problems(steps * batch_size, seed=seed + 1000, easy_share=easy_share, exclude=exclude)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1.0 - s / max(steps, 1)))
    model.train()
    bar = _bar(steps, "warm start", progress)
    t0 = time.perf_counter()
    loss_value = float("nan")
    for step in range(steps):
        batch = problems[step * batch_size : (step + 1) * batch_size]
        trajs = [make_trace(tokenizer, p, rng.random() < tool_share[p.meta["category"]], feedback_template) for p in batch]
        mb = collate(trajs, list(range(len(trajs))), torch.zeros(len(trajs)), tokenizer.pad_token_id, next(model.parameters()).device)
        logprob, _ = token_logprobs(model, mb, temperature=1.0, with_entropy=False)
        loss = -(logprob * mb.loss_mask).sum() / mb.loss_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return {"warmup/loss": loss_value, "warmup/seconds": time.perf_counter() - t0, "warmup/steps": steps}


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def summary_table(before: dict, after: dict, categories: Sequence[str] = ("hard", "easy")) -> str:
    """The before/after table the demo prints at the end."""
    rows = [("accuracy", "accuracy", "{:.1%}"), ("tool calls / problem", "tool_calls", "{:.2f}"), ("execution errors / call", "exec_error_rate", "{:.1%}")]
    lines = [f"{'held-out problems':<34}{'before RL':>12}{'after RL':>12}", "-" * 58]
    for scope in ("all", *categories):
        for label, key, fmt in rows:
            k = key if scope == "all" else f"{scope}/{key}"
            if k in before or k in after:
                b = before.get(k)
                a = after.get(k)
                name = f"{label} ({scope})"
                lines.append(f"{name:<34}{(fmt.format(b) if b is not None else '-'):>12}{(fmt.format(a) if a is not None else '-'):>12}")
    return "\n".join(lines)
