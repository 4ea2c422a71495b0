"""The built-in demo task: `cir train` with no arguments (the `demo` preset names it).

A task that is hard to do in the head and easy with code: multi-digit products with an
addition or subtraction (``347*29+118``), mixed with single-digit sums (``3+4``) where the
interpreter does not help. A tiny Qwen2 model (built from a config, random weights, a
byte-level tokenizer made in memory: nothing is downloaded) is warm-started briefly on mixed
traces, some answering directly and some calling the interpreter, and then trained by RL
with the real rollout loop, sandbox, rewards and trainer. On held-out problems, accuracy and
tool use on the hard problems rise; on the easy ones there is nothing to gain from the tool.

As a task (see `cir.tasks`) it registers what a dataset and a model folder would provide:
`problems` (`data.train=demo`, `data.eval=[demo]`), `build_policy` (`model.path=demo`: a tiny
model, warm-started) and the `demo` prompt template. Its settings are the `demo.*` config
section (`DemoConfig`). torch is imported by the functions that build and train the model, so
registering the task costs nothing.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cir.data import Problem, register_problem_set
from cir.models import register_model_builder
from cir.prompts import PromptTemplate, prompt_token_ids, register_prompt
from cir.rollout import RolloutConfig, build_feedback
from cir.training.config import register_section
from cir.trajectory import Trajectory

if TYPE_CHECKING:
    import torch

NAME = "demo"
PROMPT = PromptTemplate(NAME, system="", user_format="Q: {problem}=?\n", use_chat_template=False)


@dataclass
class DemoConfig:
    """`demo.*`: the built-in task, arithmetic that is hard in the head and easy with code."""

    train_problems: int = 4000
    eval_problems: int = 200
    easy_share: float = 0.25  # single-digit sums: the tool does not help there
    warmup_steps: int = 2000  # supervised warm start on mixed traces
    warmup_batch: int = 64
    warmup_lr: float = 3e-3
    warmup_tool_share_hard: float = 0.4  # share of warm-start traces that use the interpreter
    warmup_tool_share_easy: float = 0.4
    # Small and many steps beats larger and fewer on 2 cores: a 2-layer, 64-wide model learns
    # to copy the expression into code within ~600 steps, but copying the interpreter's output
    # into the answer reliably takes ~2000 (with 1000, RL ends at ~80% held-out accuracy, the
    # misses being digits miscopied from the output; with 2000, ~98%).
    hidden_size: int = 64
    num_layers: int = 2
    # Two heads of 32: a head size both engines take (vLLM's CPU backend needs 32 or more).
    num_heads: int = 2


def _log(msg: str) -> None:
    print(f"[cir] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The task's interface (cir.tasks): what it registers


def problems(split: str, *, seed: int, options: DemoConfig | None = None) -> list[Problem]:
    """The held-out set (`split="test"`), or the training set (any other split), which never
    holds a hard problem of the held-out set. `seed`: the run's; `options`: the `demo` section."""
    d = options or DemoConfig()
    held_out = demo_problems(d.eval_problems, seed=seed + 7_000_001, easy_share=d.easy_share)
    if split == "test":
        return held_out
    return demo_problems(
        d.train_problems, seed=seed + 1, easy_share=d.easy_share, exclude={p.problem for p in held_out}
    )


def architecture(options: DemoConfig | None = None) -> dict:
    """The demo model's Hugging Face config, as far as an engine's checks need it (built by
    `demo_model`)."""
    d = options or DemoConfig()
    return {
        "model_type": "qwen2",
        "hidden_size": d.hidden_size,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads,
        "num_key_value_heads": _kv_heads(d.num_heads),
    }


def build_policy(
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    options: DemoConfig | None = None,
    feedback_template: str | None = None,
    progress: bool = False,
):
    """(model, tokenizer, metrics): the demo's tiny Qwen2 after its supervised warm start on
    traces whose output blocks follow `feedback_template` (the rollout's)."""
    from cir.distributed import DistributedContext

    d = options or DemoConfig()
    tokenizer = demo_tokenizer()
    model = demo_model(tokenizer, d.hidden_size, d.num_layers, d.num_heads, seed=seed).to(device=device, dtype=dtype)
    # Under torchrun rank 0 warm-starts and the others receive its weights: the same model, once
    # (every rank computing the identical warm start would only split the CPU between them).
    dist = DistributedContext.from_environment()
    info: dict[str, float] = {}
    if dist.is_main:
        template = feedback_template if feedback_template is not None else RolloutConfig().feedback_template
        info = _warm_start_demo(d, model, tokenizer, seed=seed, feedback_template=template, progress=progress)
    dist.broadcast_module(model)
    return model, tokenizer, info


def _warm_start_demo(d: DemoConfig, model, tokenizer, *, seed: int, feedback_template: str, progress: bool) -> dict:
    exclude = {p.problem for p in problems("test", seed=seed, options=d)}
    size = sum(p.numel() for p in model.parameters()) / 1e6
    _log(f"demo: warm-starting a {size:.2f}M-parameter Qwen2 on mixed traces ({d.warmup_steps} steps)")
    info = warm_start(
        model,
        tokenizer,
        steps=d.warmup_steps,
        batch_size=d.warmup_batch,
        lr=d.warmup_lr,
        tool_share={"hard": d.warmup_tool_share_hard, "easy": d.warmup_tool_share_easy},
        easy_share=d.easy_share,
        feedback_template=feedback_template,
        seed=seed,
        exclude=exclude,
        progress=progress,
    )
    _log(f"demo: warm start done in {info['warmup/seconds']:.0f}s (loss {info['warmup/loss']:.3f})")
    return info


# ---------------------------------------------------------------------------------------------
# Problems, model and warm-start traces


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
        out.append(
            Problem(
                id=f"demo-{seed}-{len(out)}",
                problem=expr,
                answer=str(value),
                source="demo",
                meta={"category": category},
            )
        )
    return out


def demo_tokenizer():
    from cir.tokenization import byte_tokenizer

    return byte_tokenizer()


def _kv_heads(num_heads: int) -> int:
    return max(1, num_heads // 2)


def demo_model(tokenizer, hidden_size: int, num_layers: int, num_heads: int, seed: int):
    from cir.models import tiny_causal_lm

    return tiny_causal_lm(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=_kv_heads(num_heads),
        intermediate_size=3 * hidden_size,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        seed=seed,
    )


def make_trace(
    tokenizer,
    problem: Problem,
    use_tool: bool,
    feedback_template: str,
    *,
    code: Sequence[str] | None = None,
    text: Sequence[str] | None = None,
) -> Trajectory:
    """A trajectory built exactly as the rollout loop builds one: model segments encoded
    alone and the feedback block from the rollout's own `build_feedback` (loss_mask 0).

    The demo's traces: one ``print(expression)`` block when `use_tool`, then the boxed answer.
    Variants (`cir bench rollout`) give `code`, the blocks written when `use_tool` (each must
    print the answer, which is the output shown), and `text`, what the model writes before each
    block and before the answer (one entry more than blocks).
    """
    blocks = (list(code) if code is not None else [f"print({problem.problem})"]) if use_tool else []
    text = list(text) if text is not None else [""] * (len(blocks) + 1)
    if len(text) != len(blocks) + 1:
        raise ValueError(f"make_trace: {len(text)} texts for {len(blocks)} code blocks (need one more)")
    traj = Trajectory(prompt_ids=prompt_token_ids(PROMPT, problem.problem, tokenizer))
    enc = lambda s: list(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    for before, block in zip(text, blocks):
        traj.append(enc(f"{before}```python\n{block}\n```"), None, trainable=True)
        fb = build_feedback(tokenizer, problem.answer, template=feedback_template, prefix="\n")
        traj.append(fb.ids, None, trainable=False)
    traj.append(enc(f"{text[-1]}\\boxed{{{problem.answer}}}") + [tokenizer.eos_token_id], None, trainable=True)
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
    make_trace: Callable[..., Trajectory] = make_trace,
) -> dict:
    """Supervised warm start on mixed traces (feedback tokens masked out of the loss, as in
    RL). Returns a few numbers for the log.

    `make_trace` builds each trace, called as the demo's own `make_trace` is (tokenizer,
    problem, use_tool, feedback_template); `cir bench rollout` passes a variant with more
    varied traces. The draws of `use_tool` are the same either way.
    """
    import torch

    from cir.training.batch import collate
    from cir.training.logprobs import token_logprobs

    rng = random.Random(seed + 17)
    problems = demo_problems(steps * batch_size, seed=seed + 1000, easy_share=easy_share, exclude=exclude)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1.0 - s / max(steps, 1))
    )
    model.train()
    bar = _bar(steps, "warm start", progress)
    t0 = time.perf_counter()
    loss_value = float("nan")
    for step in range(steps):
        batch = problems[step * batch_size : (step + 1) * batch_size]
        trajs = [
            make_trace(tokenizer, p, rng.random() < tool_share[p.meta["category"]], feedback_template) for p in batch
        ]
        mb = collate(
            trajs,
            list(range(len(trajs))),
            torch.zeros(len(trajs)),
            tokenizer.pad_token_id,
            next(model.parameters()).device,
        )
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


# ---------------------------------------------------------------------------------------------
# Registration

register_problem_set(NAME, problems)
register_model_builder(NAME, build_policy, architecture=architecture)
register_prompt(PROMPT)
register_section(NAME, DemoConfig)
