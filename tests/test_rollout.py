"""The code-integrated rollout loop, with a real tokenizer, a real model and the real sandbox.

A tiny Qwen2 model is trained (once per session) to write fixed token sequences after fixed
prompts, token by token as chosen here, including non-canonical splits where the closing
fence shares a token with a newline or more text (Qwen's vocabulary has "`\\n", "`\\n\\n",
"`s", " ```\\n"). Greedy decoding then replays them through `HFEngine`, the rollout executes
the blocks in the `Sandbox`, and the tests check the trajectory token by token.

Training uses an exact shortcut: the output rows of tokens that never occur in the targets
are zero, so their logits are exactly 0 and the full-vocabulary softmax equals a softmax over
the used tokens plus one constant logit log(#unused). Training on that small softmax is
training the real model on the real loss, at a fraction of the cost of 151k-way logits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
import traceback
from dataclasses import dataclass, replace

import pytest
import torch

from cir.engines.base import Completion, SamplingParams
from cir.engines.hf import HFEngine
from cir.models import tiny_causal_lm
from cir.rollout import (
    RolloutConfig,
    build_feedback,
    derive_seed,
    fence_closed,
    find_code_block,
    rollout,
    rollout_one,
    rollout_stats,
)
from cir.sandbox import Sandbox
from cir.tokenization import qwen_tokenizer
from cir.trajectory import BUDGET_EXHAUSTED

TEMPLATE = "```output\n{output}\n```\n"
SLEEP_S = 1.5
TRAIN_STEPS = 300
TRAIN_LR = 3e-3


# ---------------------------------------------------------------------------------------------
# Scripts: what the model is trained to write after each prompt


@dataclass(frozen=True)
class Tok:
    """One token, given by its text (must be a single token of the vocabulary)."""

    text: str


EOS = Tok("<|endoftext|>")


def script_table() -> dict[str, list[list]]:
    """script name -> model segments; each segment is a list of text pieces (encoded canonically)
    and Tok pieces (one chosen token). Every segment but the last ends with a closing fence."""
    code = lambda body: "```python\n" + body + "\n"  # noqa: E731  (an open block, fence to follow)
    table = {
        # The closing fence split as "``" + "`\n": the fence token carries a newline.
        "fence_nl": [
            ["Let me compute.\n", code("print(6 * 7)"), Tok("``"), Tok("`\n")],
            ["The answer is 42.", EOS],
        ],
        # ... carries two newlines.
        "fence_nl2": [
            ["Adding.\n", code("print(5 + 8)"), Tok("``"), Tok("`\n\n")],
            ["So 13.", EOS],
        ],
        # ... carries text after the fence ("```s"): the text stays before the output block.
        "fence_text": [
            ["Square it.\n", code("print(3 ** 2)"), Tok("``"), Tok("`s")],
            ["So 9.", EOS],
        ],
        # An indented fence token with its newline (" ```\n").
        "fence_indent": [
            ["Power.\n", code("print(2 ** 10)"), Tok(" ```\n")],
            ["So 1024.", EOS],
        ],
        # A bare fence token: the response does not end with a newline.
        "fence_bare": [
            ["Sum.\n", code("print(3 + 4)"), Tok("```")],
            ["So 7.", EOS],
        ],
        "three_blocks": [
            ["One.\n", code("print(1)"), "```\n"],
            ["Two.\n", code("print(2)"), "```\n"],
            ["Three.\n", code("print(3)"), "```\n"],
            ["Done.", EOS],
        ],
        "error": [
            ["Try.\n", code("print(1 / 0)"), "```\n"],
            ["It failed.", EOS],
        ],
        "session": [
            ["Define.\n", code("x = 41"), "```\n"],
            ["Use.\n", code("print(x + 1)"), "```\n"],
            ["Got it.", EOS],
        ],
        "long": [
            ["Print.\n", code("print('ab ' * 40)"), "```\n"],
            ["Long.", EOS],
        ],
        "sleep": [
            ["Wait.\n", code(f"import time\ntime.sleep({SLEEP_S})\nprint('slept')"), "```\n"],
            ["Slept.", EOS],
        ],
    }
    for i in range(3):
        table[f"quick{i}"] = [
            ["A.\n", code(f"print({i} + 1)"), "```\n"],
            ["B.\n", code(f"print({i} + 2)"), "```\n"],
            ["Ok.", EOS],
        ]
    return table


RANDOM = "random"
# Distinct first words, so the model tells the scripts apart from the first prompt token on.
PROMPT_WORDS = (
    "Alpha",
    "Bravo",
    "Charlie",
    "Delta",
    "Echo",
    "Foxtrot",
    "Golf",
    "Hotel",
    "India",
    "Juliet",
    "Kilo",
    "Lima",
    "Mike",
    "November",
    "Oscar",
    "Papa",
)


def prompt_texts() -> dict[str, str]:
    names = [*script_table(), RANDOM]
    return {name: f"{word} task ({name}).\n" for name, word in zip(names, PROMPT_WORDS, strict=False)}


def random_scripts(n: int, seed: int = 0) -> list[list[list]]:
    """`n` traces for the RANDOM prompt with random operands, so sampling at temperature 1 gives
    different trajectories for different seeds (while keeping the block structure)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append([["Add.\n", f"```python\nprint({a} + {b})\n", "```\n"], ["Done.", EOS]])
    return out


def encode_segment(tok, pieces: list) -> list[int]:
    ids: list[int] = []
    for piece in pieces:
        if isinstance(piece, Tok):
            one = tok.encode(piece.text, add_special_tokens=False)
            assert len(one) == 1, f"{piece.text!r} is not a single token: {one}"
            ids += one
        else:
            ids += tok.encode(piece, add_special_tokens=False)
    return ids


def replay(tok, sandbox, segments, config: RolloutConfig, session: str | None) -> tuple[list[int], list[int]]:
    """The response (and its loss mask) the rollout builds when the model writes `segments`:
    the blocks run for real in the sandbox."""
    response: list[int] = []
    mask: list[int] = []
    for i, seg in enumerate(segments):
        response += seg
        mask += [1] * len(seg)
        if i == len(segments) - 1:
            break
        text = tok.decode(seg)
        block = find_code_block(text)
        assert block is not None and fence_closed(text), f"segment {i} does not close a block: {text!r}"
        result = sandbox.run(block.code, session=session)
        fb = build_feedback(
            tok,
            result.feedback().rstrip("\n"),
            template=config.feedback_template,
            prefix="" if text.endswith("\n") else "\n",
            max_tokens=config.max_feedback_tokens,
            marker=config.truncation_marker,
        )
        response += fb.ids
        mask += [0] * len(fb.ids)
    return response, mask


def train_to_emit(model, sequences: list[tuple[list[int], list[int], list[int]]], *, steps: int, lr: float) -> float:
    """Train on (prompt, response, loss mask) triples (loss on the model's tokens) with the exact used-vocabulary
    softmax described in the module docstring. Returns the final loss.

    Only the embedding and output rows of the used tokens are trained (as small tables that
    are written back into the model at the end): the 151k-row tables stay out of the backward
    pass and the optimizer.
    """
    vocab = model.config.vocab_size
    used = sorted({t for p, r, _ in sequences for t in p + r})
    used_t = torch.tensor(used)
    index = torch.full((vocab,), -1, dtype=torch.long)
    index[used_t] = torch.arange(len(used))
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    embed_used = torch.nn.Parameter(embed.detach()[used_t].clone())
    head_used = torch.nn.Parameter(head.detach()[used_t].clone())
    embed.requires_grad_(False)
    head.requires_grad_(False)
    log_unused = math.log(vocab - len(used))
    # Two length buckets (short and long sequences), so little compute goes to padding.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    half = len(order) // 2
    batches = [_pack([sequences[i] for i in part], index) for part in (order[:half], order[half:]) if part]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad] + [embed_used, head_used]
    opt = torch.optim.Adam(params, lr=lr)
    loss = float("nan")
    for _ in range(steps):
        opt.zero_grad()
        total = 0.0
        for ids, att, labels in batches:
            hidden = model.model(inputs_embeds=embed_used[ids], attention_mask=att).last_hidden_state
            logits = hidden @ head_used.T
            logits = torch.cat([logits, torch.full_like(logits[..., :1], log_unused)], dim=-1)
            part = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            )
            count = int((labels != -100).sum())
            (part / count / len(batches)).backward()
            total += part.item() / count / len(batches)
        opt.step()
        loss = total
    with torch.no_grad():
        embed[used_t] = embed_used
        head.zero_()  # unused tokens: logit exactly 0
        head[used_t] = head_used
    embed.requires_grad_(True)
    head.requires_grad_(True)
    model.eval()
    return loss


def _pack(sequences, index):
    """Right-padded (ids in the used-token numbering, attention mask, labels) of one bucket."""
    width = max(len(p) + len(r) for p, r, _ in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    att = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for b, (p, r, m) in enumerate(sequences):
        seq = torch.tensor(p + r)
        ids[b, : len(seq)] = index[seq]
        att[b, : len(seq)] = 1
        target = torch.where(torch.tensor(m) == 1, index[torch.tensor(r)], -100)
        labels[b, len(p) - 1 : len(seq) - 1] = target  # position t predicts token t+1
    return ids, att, labels


@dataclass
class World:
    tok: object
    engine: HFEngine
    sandbox: Sandbox
    prompts: dict[str, list[int]]  # prompt text -> ids
    segments: dict[str, list[list[int]]]  # prompt text -> model segments (token ids)
    expected: dict[str, list[int]]  # prompt text -> full expected response (greedy, default config)


def base_config(**overrides) -> RolloutConfig:
    defaults = dict(
        max_response_tokens=400, tool_budget=4, temperature=0.0, feedback_template=TEMPLATE, max_feedback_tokens=256
    )
    defaults.update(overrides)
    return RolloutConfig(**defaults)


@pytest.fixture(scope="session")
def world():
    tok = qwen_tokenizer()
    sandbox = Sandbox(workers=4, timeout_s=10)
    config = base_config()
    texts = prompt_texts()
    prompts = {name: tok.encode(text, add_special_tokens=False) for name, text in texts.items()}
    segments, expected, sequences = {}, {}, []
    for name, segs in script_table().items():
        segments[name] = [encode_segment(tok, s) for s in segs]
        session = "train-session" if name == "session" else None
        expected[name], mask = replay(tok, sandbox, segments[name], config, session)
        if session:
            sandbox.close_session(session)
        sequences.append((prompts[name], expected[name], mask))
    for segs in random_scripts(32):
        response, mask = replay(tok, sandbox, [encode_segment(tok, s) for s in segs], config, None)
        sequences.append((prompts[RANDOM], response, mask))
    model = tiny_causal_lm(tok, hidden_size=96, num_layers=2, num_heads=4, num_kv_heads=2, seed=0)
    train_to_emit(model, sequences, steps=TRAIN_STEPS, lr=TRAIN_LR)
    engine = HFEngine(model, tok, seed=0)
    yield World(tok, engine, sandbox, prompts, segments, expected)
    engine.close()
    sandbox.close()


class Recorder:
    """The real engine, with every Completion it returns kept in call order (per prompt)."""

    max_model_len = None  # no context limit declared (ShortContext declares one)

    def __init__(self, engine):
        self.engine = engine
        self.calls: list[tuple[list[int], SamplingParams, Completion]] = []

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(self, prompt_ids, params):
        completion = await self.engine.generate(prompt_ids, params)
        self.calls.append((list(prompt_ids), params, completion))
        return completion


def one_token(tok, text: str) -> int:
    (token,) = tok.encode(text, add_special_tokens=False)
    return token


def run(coro):
    return asyncio.run(coro)


def feedback_positions(traj) -> set[int]:
    return {i for call in traj.tool_calls for i in range(*call.feedback_span)}


def assert_mask_exact(traj) -> None:
    """loss_mask is 0 exactly on the feedback spans and 1 everywhere else."""
    traj.check()
    fb = feedback_positions(traj)
    assert traj.loss_mask == [0 if i in fb else 1 for i in range(len(traj.response_ids))]
    assert all(traj.sampler_logprobs[i] == 0.0 for i in fb)


# ---------------------------------------------------------------------------------------------
# Pure pieces: fences, feedback, seeds, config


@pytest.mark.parametrize(
    "text, code",
    [
        ("Compute.\n```python\nprint(6 * 7)\n```", "print(6 * 7)"),
        ("```py\nx = 1\ny = 2\n```\n", "x = 1\ny = 2"),
        ("see ```python\nprint(1)\n```\nThe rest", "print(1)"),  # opened after prose, text after the fence
        ("```python\n```", ""),  # empty block
        ("```python  \r\nprint(1)\r\n```", "print(1)"),
        ("```python\nprint(2)\n ```\n", "print(2)"),  # indented closing fence
        ("```text\nnot code\n```\n```python\nprint(3)\n```s", "print(3)"),  # a non-python block first
    ],
)
def test_find_code_block(text, code):
    block = find_code_block(text)
    assert block is not None and block.code == code
    assert text[block.start :].startswith("```py")
    assert text[block.end - 3 : block.end] == "```"
    assert fence_closed(text)


@pytest.mark.parametrize(
    "text",
    [
        "no code at all",
        "```python\nprint(1)\n",  # still open
        "```python\nprint(1)\n``",  # fence not complete yet
        "```python\nprint('```')",  # backticks inside a line are not a fence
        "```python\nx = 1\n    ```",  # indented by four: code, not a fence
        "```pyth\nx\n```",  # not a python opening fence
        "```\nplain block\n```",
    ],
)
def test_open_or_missing_block_is_not_closed(text):
    assert find_code_block(text) is None
    assert not fence_closed(text)


def test_build_feedback_truncates_to_token_limit_with_marker():
    tok = qwen_tokenizer()
    output = "\n".join(f"line {i}: {i * i}" for i in range(200))
    full = build_feedback(tok, output, template=TEMPLATE)
    assert not full.truncated and full.text == f"```output\n{output}\n```\n"
    assert full.ids == tok.encode(full.text, add_special_tokens=False)
    for limit in (12, 40, 100):
        fb = build_feedback(tok, output, template=TEMPLATE, prefix="\n", max_tokens=limit, marker="...[truncated]")
        assert fb.truncated and len(fb.ids) <= limit
        assert tok.decode(fb.ids) == fb.text
        assert fb.output.endswith("...[truncated]") and output.startswith(fb.output[: -len("...[truncated]")])
        assert fb.text == "\n```output\n" + fb.output + "\n```\n"
        # Close to the limit: one more character of output would not fit, or only barely.
        assert len(fb.ids) >= limit - 3
    short = build_feedback(tok, "42", template=TEMPLATE, max_tokens=12)
    assert not short.truncated and short.output == "42"
    with pytest.raises(ValueError, match="max_feedback_tokens"):
        build_feedback(tok, output, template=TEMPLATE, max_tokens=4)


def test_derive_seed_is_a_pure_function_of_seed_and_turn():
    assert derive_seed(None, 3) is None
    assert derive_seed(7, 0) == derive_seed(7, 0)
    seeds = {derive_seed(s, t) for s in range(20) for t in range(5)}
    assert len(seeds) == 100 and all(0 <= x < 2**63 for x in seeds)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("on_budget_exhausted", "ignore", "on_budget_exhausted"),
        ("feedback_template", "```output\n```\n", "feedback_template"),
        ("tool_budget", -1, "tool_budget"),
        ("max_response_tokens", 0, "max_response_tokens"),
        ("max_feedback_tokens", 0, "max_feedback_tokens"),
        ("top_p", 0.0, "top_p"),
    ],
)
def test_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        RolloutConfig(**{field: value})


# ---------------------------------------------------------------------------------------------
# With the real model, tokenizer and sandbox


def test_greedy_replays_every_script(world):
    """Sanity of the set-up: greedy rollouts reproduce the trained scripts exactly."""
    names = [n for n in world.expected if n != "session"]  # its script needs session mode
    trajs = rollout(world.engine, world.sandbox, [world.prompts[n] for n in names], base_config())
    for name, traj in zip(names, trajs):
        assert traj.response_ids == world.expected[name], (name, world.tok.decode(traj.response_ids))
        assert traj.finish_reason == "eos"
        assert_mask_exact(traj)


# name -> (text of the token that closes the fence, how the model's segment ends, the feedback)
FENCES = {
    "fence_nl": ("`\n", "print(6 * 7)\n```\n", "```output\n42\n```\n"),
    "fence_nl2": ("`\n\n", "print(5 + 8)\n```\n\n", "```output\n13\n```\n"),
    "fence_text": ("`s", "print(3 ** 2)\n```s", "\n```output\n9\n```\n"),  # extra text stays before the output
    "fence_indent": (" ```\n", "print(2 ** 10)\n ```\n", "```output\n1024\n```\n"),
    "fence_bare": ("```", "print(3 + 4)\n```", "\n```output\n7\n```\n"),
}


@pytest.mark.parametrize("name", list(FENCES))
def test_loss_mask_covers_feedback_when_the_fence_shares_a_token(world, name):
    fence_text, segment_end, feedback = FENCES[name]
    tok = world.tok
    engine = Recorder(world.engine)
    traj = run(rollout_one(engine, world.sandbox, world.prompts[name], base_config(), seed=1))
    assert traj.finish_reason == "eos"
    (call,) = traj.tool_calls
    assert call.status == "ok"
    # The segment ends with the fence token exactly as sampled (merged text included) ...
    first = engine.calls[0][2]
    assert call.code_span == (0, len(first.token_ids))
    assert traj.response_ids[call.code_span[1] - 1] == one_token(tok, fence_text)
    assert first.finish_reason == "stop_rule"
    # ... and the feedback follows it: its tokens decode to exactly the feedback text.
    assert call.feedback_span[0] == call.code_span[1]
    assert tok.decode(traj.response_ids[slice(*call.feedback_span)]) == feedback
    assert traj.response_ids[slice(*call.feedback_span)] == tok.encode(feedback, add_special_tokens=False)
    assert_mask_exact(traj)
    # The response reads: segment (ending with the fence token's text), then the output block.
    segment_text = tok.decode(first.token_ids)
    assert segment_text.endswith(segment_end)
    assert traj.text(tok).startswith(segment_text + feedback)


def test_retokenizing_would_change_a_merged_fence(world):
    """The hazard the loop avoids: the sampled split "``" + "`s" is not how the tokenizer
    would encode the text, so decoding and re-encoding would change the trajectory."""
    tok = world.tok
    traj = run(rollout_one(world.engine, world.sandbox, world.prompts["fence_text"], base_config()))
    assert traj.response_ids == world.expected["fence_text"]
    assert tok.encode(traj.text(tok), add_special_tokens=False) != traj.response_ids


@pytest.mark.parametrize("mode", ["async", "turn_sync"])
def test_token_ids_are_exactly_what_the_engine_sampled(world, mode):
    names = ["three_blocks", "fence_nl2", "fence_text", "error", "quick1"]
    engine = Recorder(world.engine)
    config = base_config(temperature=0.7)  # sampled, so log-probs are those of a real draw
    trajs = rollout(
        engine, world.sandbox, [world.prompts[n] for n in names], config, mode=mode, seeds=list(range(len(names)))
    )
    for name, traj in zip(names, trajs):
        prompt = world.prompts[name]
        mine = [(ids, c) for ids, _, c in engine.calls if ids[: len(prompt)] == prompt]
        # Rebuild the response from the engine's completions and the feedback spans, in order;
        # every request's context is the prompt plus the response so far, never re-encoded.
        rebuilt, logprobs = [], []
        feedback = {call.feedback_span[0]: call for call in traj.tool_calls}
        for ids, completion in mine:
            assert ids == prompt + rebuilt
            rebuilt += completion.token_ids
            logprobs += completion.logprobs
            call = feedback.get(len(rebuilt))
            if call is not None:
                fb_ids = traj.response_ids[slice(*call.feedback_span)]
                assert world.tok.decode(fb_ids).endswith("```\n")
                rebuilt += fb_ids
                logprobs += [0.0] * len(fb_ids)
        assert rebuilt == traj.response_ids, name
        assert logprobs == traj.sampler_logprobs
        assert len(mine) == len(traj.tool_calls) + 1
        assert_mask_exact(traj)
        assert all(lp <= 0.0 for lp, m in zip(traj.sampler_logprobs, traj.loss_mask) if m)


@pytest.mark.parametrize("budget", [0, 1, 2])
def test_budget_stop_ends_at_the_fence(world, budget):
    config = base_config(tool_budget=budget, on_budget_exhausted="stop")
    traj = run(rollout_one(world.engine, world.sandbox, world.prompts["three_blocks"], config))
    assert traj.finish_reason == "budget"
    assert traj.num_tool_calls == budget == len(traj.tool_calls)
    assert [c.output for c in traj.tool_calls] == [str(i + 1) for i in range(budget)]
    # The response is the script up to and including the fence of block budget+1: no feedback after it.
    segs = world.segments["three_blocks"]
    end = sum(len(s) for s in segs[: budget + 1]) + sum(
        c.feedback_span[1] - c.feedback_span[0] for c in traj.tool_calls
    )
    assert traj.response_ids == world.expected["three_blocks"][:end]
    assert traj.text(world.tok).endswith(f"print({budget + 1})\n```\n")
    assert_mask_exact(traj)
    assert traj.stats()["finish_reason"] == "budget" and traj.stats()["tool_calls"] == budget


def test_budget_large_enough_runs_every_block(world):
    traj = run(rollout_one(world.engine, world.sandbox, world.prompts["three_blocks"], base_config(tool_budget=3)))
    assert traj.finish_reason == "eos" and traj.num_tool_calls == 3
    assert traj.response_ids == world.expected["three_blocks"]


@pytest.mark.parametrize("budget", [0, 1, 2])
def test_budget_notice_replaces_output_and_goes_on(world, budget):
    config = base_config(tool_budget=budget, on_budget_exhausted="notice")
    notice = config.budget_notice
    traj = run(rollout_one(world.engine, world.sandbox, world.prompts["three_blocks"], config))
    assert traj.num_tool_calls == budget  # executions never exceed the budget
    executed = [c for c in traj.tool_calls if c.executed]
    assert [c.output for c in executed] == [str(i + 1) for i in range(budget)]
    notices = traj.tool_calls[budget:]
    assert notices, "the model wrote block budget+1, which must get the notice"
    for call in notices:
        assert call.status == BUDGET_EXHAUSTED and call.output == notice and call.wall_ms == 0.0
        assert world.tok.decode(traj.response_ids[slice(*call.feedback_span)]) == f"```output\n{notice}\n```\n"
    # Up to the first notice the response is the script's own.
    first = notices[0].feedback_span[0]
    assert traj.response_ids[:first] == world.expected["three_blocks"][:first]
    assert traj.finish_reason in ("eos", "length")  # generation went on after the notice
    assert len(traj.response_ids) > notices[0].feedback_span[1]
    assert_mask_exact(traj)
    stats = traj.stats()
    assert stats["tool_calls"] == budget and stats["budget_notices"] == len(notices)


def test_feedback_is_truncated_to_max_feedback_tokens(world):
    tok = world.tok
    full = run(rollout_one(world.engine, world.sandbox, world.prompts["long"], base_config(max_feedback_tokens=None)))
    (call,) = full.tool_calls
    assert call.output == ("ab " * 40).rstrip("\n") and not call.truncated
    limit = 16
    traj = run(rollout_one(world.engine, world.sandbox, world.prompts["long"], base_config(max_feedback_tokens=limit)))
    (call,) = traj.tool_calls
    span = traj.response_ids[slice(*call.feedback_span)]
    assert call.truncated and len(span) <= limit
    assert call.output.endswith("...[truncated]") and call.output.startswith("ab ab")
    assert tok.decode(span) == f"```output\n{call.output}\n```\n"
    assert_mask_exact(traj)


def test_error_line_is_the_feedback_of_a_failing_block(world):
    traj = run(rollout_one(world.engine, world.sandbox, world.prompts["error"], base_config()))
    (call,) = traj.tool_calls
    assert call.status == "error" and call.code == "print(1 / 0)"
    assert call.output == "ZeroDivisionError: division by zero"
    assert world.tok.decode(traj.response_ids[slice(*call.feedback_span)]) == (
        "```output\nZeroDivisionError: division by zero\n```\n"
    )
    assert traj.num_exec_errors == 1 and traj.num_timeouts == 0


def test_timeout_is_reported_in_the_feedback(world):
    config = base_config(exec_timeout_s=0.3)
    traj = run(rollout_one(world.engine, world.sandbox, world.prompts["sleep"], config))
    (call,) = traj.tool_calls
    assert call.status == "timeout" and 300 <= call.wall_ms < SLEEP_S * 1000
    assert call.output.startswith("TimeoutError")
    assert traj.num_timeouts == 1 and traj.num_exec_errors == 1
    assert_mask_exact(traj)


def test_session_mode_lets_a_later_block_see_an_earlier_definition(world):
    prompt = world.prompts["session"]
    with_session = run(rollout_one(world.engine, world.sandbox, prompt, base_config(session_mode=True)))
    assert [c.status for c in with_session.tool_calls] == ["ok", "ok"]
    assert with_session.tool_calls[1].output == "42"
    assert with_session.response_ids == world.expected["session"]
    stateless = run(rollout_one(world.engine, world.sandbox, prompt, base_config(session_mode=False)))
    assert stateless.tool_calls[1].status == "error"
    assert stateless.tool_calls[1].output == "NameError: name 'x' is not defined"
    # Sessions are closed when their trajectory ends.
    assert world.sandbox.stats()["sessions"] == 0


def test_length_limit_and_no_room_for_feedback(world):
    prompt = world.prompts["three_blocks"]
    first_segment = len(world.segments["three_blocks"][0])
    short = run(rollout_one(world.engine, world.sandbox, prompt, base_config(max_response_tokens=5)))
    assert short.finish_reason == "length" and len(short.response_ids) == 5 and not short.tool_calls
    assert short.response_ids == world.expected["three_blocks"][:5]
    # The block closes with too little room left for an output block: it is not run.
    tight = run(rollout_one(world.engine, world.sandbox, prompt, base_config(max_response_tokens=first_segment + 3)))
    assert tight.finish_reason == "length" and not tight.tool_calls
    assert tight.response_ids == world.expected["three_blocks"][:first_segment]
    # Every response stays within the limit, feedback included.
    for limit in (first_segment + 8, first_segment + 12, 30):
        traj = run(rollout_one(world.engine, world.sandbox, prompt, base_config(max_response_tokens=limit)))
        assert len(traj.response_ids) <= limit
        assert_mask_exact(traj)


def test_async_and_turn_sync_give_identical_trajectories(world):
    names = [RANDOM] * 6 + ["three_blocks", "quick0", "error"]
    prompts = [world.prompts[n] for n in names]
    seeds = [101 + i for i in range(len(names))]
    config = base_config(temperature=1.0)
    a = rollout(world.engine, world.sandbox, prompts, config, mode="async", seeds=seeds)
    b = rollout(world.engine, world.sandbox, prompts, config, mode="turn_sync", seeds=seeds)
    again = rollout(world.engine, world.sandbox, prompts[::-1], config, mode="async", seeds=seeds[::-1])[::-1]
    for x, y, z in zip(a, b, again):
        assert x.response_ids == y.response_ids == z.response_ids
        assert x.loss_mask == y.loss_mask
        assert x.finish_reason == y.finish_reason
        assert [(c.code, c.status, c.output, c.code_span, c.feedback_span) for c in x.tool_calls] == [
            (c.code, c.status, c.output, c.code_span, c.feedback_span) for c in y.tool_calls
        ]
        assert x.sampler_logprobs == pytest.approx(y.sampler_logprobs, abs=1e-5)
    # Not vacuous: the seeds lead to different samples, most of which call the tool.
    random_texts = {tuple(t.response_ids) for t in a[:6]}
    assert len(random_texts) >= 3
    assert sum(t.num_tool_calls for t in a[:6]) >= 3


def test_async_does_not_wait_for_a_slow_sandbox_call(world):
    names = ["sleep", "quick0", "quick1", "quick2"]
    prompts = [world.prompts[n] for n in names]
    config = base_config()

    def timed(mode):
        finished: dict[int, float] = {}
        start = time.perf_counter()

        def progress(traj):
            finished[id(traj)] = time.perf_counter() - start

        trajs = rollout(world.engine, world.sandbox, prompts, config, mode=mode, progress=progress)
        return trajs, [finished[id(t)] for t in trajs]

    trajs, t_async = timed("async")
    assert trajs[0].tool_calls[0].wall_ms >= SLEEP_S * 1000
    assert [t.num_tool_calls for t in trajs] == [1, 2, 2, 2]
    # Every quick trajectory (three generate calls, two executions) is done while the sleeper
    # still sleeps, which it would not be if anything waited for that sandbox call.
    assert t_async[0] >= SLEEP_S
    assert max(t_async[1:]) < min(SLEEP_S, t_async[0]), t_async
    sync_trajs, t_sync = timed("turn_sync")
    assert [t.response_ids for t in sync_trajs] == [t.response_ids for t in trajs]
    # In the turn-synchronous loop they wait for the sleeper at the first turn.
    assert min(t_sync[1:]) >= SLEEP_S, t_sync


def test_rollout_from_inside_a_running_event_loop(world):
    async def caller():
        return rollout(world.engine, world.sandbox, [world.prompts["fence_nl"]], base_config())

    (traj,) = asyncio.run(caller())
    assert traj.response_ids == world.expected["fence_nl"]


def test_rollout_stats(world):
    names = ["three_blocks", "error", "fence_nl"]
    trajs = rollout(world.engine, world.sandbox, [world.prompts[n] for n in names], base_config(tool_budget=2))
    stats = rollout_stats(trajs)
    assert [t.finish_reason for t in trajs] == ["budget", "eos", "eos"]
    assert stats["tool_calls_per_traj"] == pytest.approx(4 / 3)
    assert stats["exec_error_rate"] == pytest.approx(1 / 4)
    assert stats["finish_budget"] == pytest.approx(1 / 3) and stats["finish_eos"] == pytest.approx(2 / 3)
    model = sum(t.num_model_tokens for t in trajs)
    feedback = sum(t.num_feedback_tokens for t in trajs)
    assert stats["feedback_token_share"] == pytest.approx(feedback / (model + feedback))


def test_unknown_mode_and_mismatched_seeds_fail_clearly(world):
    with pytest.raises(ValueError, match="unknown rollout mode"):
        rollout(world.engine, world.sandbox, [world.prompts["fence_nl"]], base_config(), mode="sync")
    with pytest.raises(ValueError, match="seeds"):
        rollout(world.engine, world.sandbox, [world.prompts["fence_nl"]], base_config(), seeds=[1, 2])


# ---------------------------------------------------------------------------------------------
# `cir bench rollout`


def test_bench_traces_show_the_real_output_of_their_code():
    """The warm-up traces teach the model what the interpreter really prints."""
    import itertools

    from cir.bench.rollout import latency_traces
    from cir.tasks.demo import demo_problems, demo_tokenizer

    tokenizer = demo_tokenizer()
    make_trace = latency_traces(random.Random(3))
    traces = [make_trace(tokenizer, problem, True, TEMPLATE) for problem in demo_problems(40, seed=3)]
    blocks = []
    for trace in traces:
        # The trace's pieces: runs of trained (model) and untrained (feedback) tokens.
        pieces, at = [], 0
        for trained, span in itertools.groupby(trace.loss_mask):
            n = len(list(span))
            pieces.append((tokenizer.decode(trace.response_ids[at : at + n]), bool(trained)))
            at += n
        for (text, trained), nxt in zip(pieces, pieces[1:] + [("", True)]):
            if trained and "```python\n" in text:
                assert not nxt[1] and nxt[0].startswith("\n```output\n")
                blocks.append((find_code_block(text).code, nxt[0]))
    assert len(blocks) >= 20
    quick = [(code, shown) for code, shown in blocks if "sleep" not in code][:12]
    with Sandbox(workers=2, timeout_s=10) as sandbox:
        results = sandbox.run_batch([code for code, _ in quick])
    for (code, shown), result in zip(quick, results):
        assert result.status == "ok", code
        assert shown == "\n" + TEMPLATE.replace("{output}", result.feedback().rstrip("\n"))


def test_bench_rollout_runs_both_schedules(tmp_path):
    from cir.bench import rollout as bench

    parser = argparse.ArgumentParser()
    bench.register(parser)
    out = tmp_path / "bench.json"
    common = ["--problems", "4", "--max-tokens", "48", "--repeats", "1", "--workers", "2", "--json", str(out)]
    saved = tmp_path / "model"
    args = parser.parse_args(
        ["--warmup-steps", "3", "--warmup-batch", "16", "--hidden-size", "32", "--save-model", str(saved), *common]
    )
    assert bench.run(args) == 0
    first = json.loads(out.read_text())
    assert [row["mode"] for row in first["rows"]] == ["async", "turn_sync"]
    assert first["identical_trajectories"] is True
    for row in first["rows"]:
        assert row["trajectories"] == 4 and row["model_tokens"] > 0 and row["tokens_per_s"] > 0
    assert first["ratio_tokens_per_s"] == pytest.approx(
        first["rows"][0]["tokens_per_s"] / first["rows"][1]["tokens_per_s"]
    )
    # The saved checkpoint loads through --model and samples the same trajectories.
    assert bench.run(parser.parse_args(["--model", str(saved), *common])) == 0
    second = json.loads(out.read_text())
    assert second["model"] == {"model": str(saved)}
    assert second["rows"][0]["model_tokens"] == first["rows"][0]["model_tokens"]


class ShortContext(Recorder):
    """The real engine, declaring a smaller model context (as a model with few positions does)."""

    def __init__(self, engine, max_model_len: int):
        super().__init__(engine)
        self.max_model_len = max_model_len


def test_model_context_caps_the_response_feedback_included(world):
    prompt = world.prompts["three_blocks"]
    first_segment = len(world.segments["three_blocks"][0])
    for room in (5, first_segment + 3, first_segment + 12, 30):
        engine = ShortContext(world.engine, len(prompt) + room)
        capped = run(rollout_one(engine, world.sandbox, prompt, base_config(max_response_tokens=400)))
        # The same as a response budget of `room` tokens: never past the context, feedback included.
        same = run(rollout_one(world.engine, world.sandbox, prompt, base_config(max_response_tokens=room)))
        assert len(prompt) + len(capped.response_ids) <= engine.max_model_len
        assert capped.response_ids == same.response_ids and capped.loss_mask == same.loss_mask
        assert capped.finish_reason == same.finish_reason
        assert all(len(ids) + p.max_new_tokens <= engine.max_model_len for ids, p, _ in engine.calls)
    with pytest.raises(ValueError, match=r"prompt 0 \(problem p-7\): prompt of \d+ tokens leaves no room"):
        rollout(ShortContext(world.engine, len(prompt)), world.sandbox, [prompt], base_config(), problem_ids=["p-7"])


def test_an_error_inside_the_rollout_shows_its_own_traceback(world):
    # rollout() runs its coroutine with asyncio.run once it found no running loop; raised from
    # inside it, the error must not be chained to that check's "no running event loop".
    prompt = world.prompts["three_blocks"]
    with pytest.raises(ValueError, match="leaves no room") as raised:
        rollout(ShortContext(world.engine, len(prompt)), world.sandbox, [prompt], base_config(), problem_ids=["p-7"])
    assert raised.value.__context__ is None and raised.value.__cause__ is None
    shown = "".join(traceback.format_exception(raised.value))
    assert "no running event loop" not in shown and "During handling" not in shown, shown


# ---------------------------------------------------------------------------------------------
# Engines that do not evaluate the closing-fence rule (vLLM): the rollout decides


class StopStringOnly(Recorder):
    """The real engine, declaring that it evaluates no stop rule: the rollout sends the stand-in
    stop string "```", which also fires on opening fences, and continues after false stops."""

    stop_rules = frozenset()


class NoStop(Recorder):
    """An engine that stops late: it ignores stop strings and rules (only stop tokens and the
    length end a completion), as an engine emitting several tokens per step might."""

    stop_rules = frozenset()

    async def generate(self, prompt_ids, params):
        return await super().generate(prompt_ids, SamplingParams(**{**params.__dict__, "stop_strings": ()}))


def _same_trajectory(a, b) -> None:
    assert a.response_ids == b.response_ids
    assert a.loss_mask == b.loss_mask
    assert a.finish_reason == b.finish_reason
    assert [(c.code, c.status, c.output, c.code_span, c.feedback_span) for c in a.tool_calls] == [
        (c.code, c.status, c.output, c.code_span, c.feedback_span) for c in b.tool_calls
    ]
    assert a.sampler_logprobs == pytest.approx(b.sampler_logprobs, abs=1e-5)


@pytest.mark.parametrize("wrapper", [StopStringOnly, NoStop])
def test_engine_without_the_stop_rule_gives_the_same_greedy_trajectories(world, wrapper):
    names = ["fence_nl", "fence_nl2", "fence_text", "fence_indent", "fence_bare", "three_blocks", "error"]
    prompts = [world.prompts[n] for n in names]
    exact = rollout(world.engine, world.sandbox, prompts, base_config())
    engine = wrapper(world.engine)
    got = rollout(engine, world.sandbox, prompts, base_config())
    for name, a, b in zip(names, exact, got):
        _same_trajectory(a, b)
        assert b.response_ids == world.expected[name]
        assert_mask_exact(b)
    if wrapper is StopStringOnly:
        # Every block's opening fence was a false stop: one more generate call per block.
        reasons = [c.finish_reason for _, _, c in engine.calls]
        assert reasons.count("stop_string") == 2 * sum(len(t.tool_calls) for t in got)
        assert all(p.stop_rule is None and p.stop_strings == ("```",) for _, p, _ in engine.calls)


def test_false_stops_continue_with_the_next_turns_seed(world):
    """Sampled: each generate call, continuations included, takes the seed of its turn, so both
    schedules still agree; the continuation's context is the prompt plus the response so far."""
    names = [RANDOM] * 3 + ["three_blocks"]
    prompts = [world.prompts[n] for n in names]
    config = base_config(temperature=1.0)
    engine = StopStringOnly(world.engine)
    a = rollout(engine, world.sandbox, prompts, config, mode="async", seeds=[5, 6, 7, 8])
    b = rollout(StopStringOnly(world.engine), world.sandbox, prompts, config, mode="turn_sync", seeds=[5, 6, 7, 8])
    for x, y in zip(a, b):
        _same_trajectory(x, y)
        assert_mask_exact(x)
    prompt = world.prompts["three_blocks"]
    mine = [(ids, p) for ids, p, _ in engine.calls if ids[: len(prompt)] == prompt]
    assert [p.seed for _, p in mine] == [derive_seed(8, turn) for turn in range(len(mine))]


def test_false_stop_at_the_length_limit_ends_the_trajectory(world):
    prompt = world.prompts["three_blocks"]
    segment = world.segments["three_blocks"][0]
    # The token that completes the opening fence's backticks: the first (false) stop.
    fence_at = next(k for k in range(1, len(segment) + 1) if "```" in world.tok.decode(segment[:k]))
    for room in (fence_at, fence_at + 1, fence_at + 3):
        exact = run(rollout_one(world.engine, world.sandbox, prompt, base_config(max_response_tokens=room)))
        got = run(
            rollout_one(StopStringOnly(world.engine), world.sandbox, prompt, base_config(max_response_tokens=room))
        )
        _same_trajectory(exact, got)
        assert got.finish_reason == "length" and len(got.response_ids) == room


def _zygote_sleeping_children(zygote_pid: int) -> list[int]:
    """Host pids of the zygote's children asleep in time.sleep (the "sleep" script's snippet;
    the spare waits in a socket read, the quick snippets never sleep)."""
    try:
        with open(f"/proc/{zygote_pid}/task/{zygote_pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    sleeping = []
    for pid in kids:
        try:
            with open(f"/proc/{pid}/wchan") as f:
                if "nanosleep" in f.read():
                    sleeping.append(pid)
        except OSError:
            pass
    return sleeping


@pytest.mark.parametrize("mode", ["async", "turn_sync"])
def test_a_sandbox_fault_ends_its_trajectory_and_the_batch_goes_on(world, mode):
    """The interpreter dies under one trajectory's block every time it runs (killed from
    outside while that block sleeps): the sandbox retries it, gives up, and the rollout
    records a SANDBOX_FAULT call and ends that trajectory there, shows the model nothing,
    and finishes every other trajectory exactly as without the fault."""
    import os
    import signal
    import threading

    from cir.trajectory import SANDBOX_FAULT

    names = ["sleep", "fence_nl", "quick0"]
    prompts = [world.prompts[n] for n in names]
    done = threading.Event()
    kills = []
    with Sandbox(workers=2, timeout_s=10, fault_attempts=2, retry_backoff_s=0.01) as sandbox:

        def killer():
            while not done.is_set() and len(kills) < 6:
                zygote = sandbox.stats()["zygote_pid"]
                if zygote > 0 and _zygote_sleeping_children(zygote):
                    os.kill(zygote, signal.SIGKILL)
                    kills.append(zygote)
                    while not done.is_set() and sandbox.stats()["zygote_pid"] in (zygote, -1):
                        time.sleep(0.01)
                time.sleep(0.02)

        thread = threading.Thread(target=killer)
        thread.start()
        try:
            trajs = rollout(world.engine, sandbox, prompts, base_config(), mode=mode)
        finally:
            done.set()
            thread.join()
        counters = sandbox.counters()
    faulted, *others = trajs
    assert len(kills) == 2  # each attempt of the sleeping block lost its interpreter
    (call,) = faulted.tool_calls
    assert call.status == SANDBOX_FAULT and call.output == "" and faulted.sandbox_fault
    assert faulted.finish_reason == "sandbox_fault"
    # The model's first segment exactly, up to its closing fence; nothing appended after it.
    first_segment = world.segments["sleep"][0]
    assert faulted.response_ids == first_segment and faulted.loss_mask == [1] * len(first_segment)
    assert call.feedback_span == (len(first_segment), len(first_segment))
    faulted.check()
    for name, traj in zip(names[1:], others):
        assert traj.response_ids == world.expected[name] and not traj.sandbox_fault
        assert all(c.status == "ok" for c in traj.tool_calls)
    assert counters["faults_interpreter_lost"] == 1 and counters["faults"] == 1
    assert counters["retries"] >= 1 and counters["restarts"] >= 2
    assert rollout_stats(trajs)["finish_sandbox_fault"] == pytest.approx(1 / 3)


def test_sandbox_error_for_a_call_ends_only_that_trajectory(world):
    """A call the sandbox cannot take at all (SandboxError, e.g. while its interpreter cannot
    start) ends that trajectory in a sandbox fault; it never aborts the batch."""
    from cir.trajectory import SANDBOX_FAULT

    sandbox = Sandbox(workers=1, timeout_s=10, preload=("math",), warmup=False)
    sandbox.close()  # every call now raises SandboxError
    trajs = rollout(world.engine, sandbox, [world.prompts["fence_nl"], world.prompts["error"]], base_config())
    for traj, name in zip(trajs, ["fence_nl", "error"]):
        assert traj.finish_reason == "sandbox_fault" and traj.tool_calls[-1].status == SANDBOX_FAULT
        assert traj.response_ids == world.segments[name][0]


class Cutting:
    """The real engine, with every request cut after `every` tokens as a pause cuts it: the
    completion holds what was sampled so far, finish_reason "aborted" (a request that ends on its
    own within the cut keeps its own finish reason)."""

    max_model_len = None

    def __init__(self, engine, every: int):
        self.engine, self.every = engine, every
        self.cuts = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(self, prompt_ids, params):
        if params.max_new_tokens <= self.every:
            return await self.engine.generate(prompt_ids, params)
        completion = await self.engine.generate(prompt_ids, replace(params, max_new_tokens=self.every))
        if completion.finish_reason == "length":
            self.cuts += 1
            completion = replace(completion, finish_reason="aborted")
        return completion


@pytest.mark.parametrize("every", [1, 3, 7])
def test_segments_cut_by_a_pause_continue_to_the_same_greedy_trajectory(world, every):
    """A paused request's partial tokens are kept and the segment continues with a new request;
    the closing fence, which may fall after a cut (or be split by one), is decided over the whole
    segment, so greedy trajectories are the ones an uncut engine gives."""
    names = [n for n in world.expected if n != "session"]
    engine = Cutting(world.engine, every)
    trajs = rollout(engine, world.sandbox, [world.prompts[n] for n in names], base_config())
    assert engine.cuts > len(names)
    for name, traj in zip(names, trajs):
        assert traj.response_ids == world.expected[name], (name, every, world.tok.decode(traj.response_ids))
        assert traj.finish_reason == "eos"
        assert_mask_exact(traj)
