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

import asyncio
import math
import random
import time
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
    rollout_async,
    rollout_one,
    rollout_stats,
    rollout_turn_sync,
)
from cir.sandbox import Sandbox
from cir.tokenization import qwen_tokenizer
from cir.trajectory import BUDGET_EXHAUSTED

TEMPLATE = "```output\n{output}\n```\n"
SLEEP_S = 1.0


# ---------------------------------------------------------------------------------------------
# Scripts: what the model is trained to write after each prompt


@dataclass(frozen=True)
class Tok:
    """One token, given by its text (must be a single token of the vocabulary)."""

    text: str


EOS = Tok("<|endoftext|>")


def script_table() -> dict[str, list[list]]:
    """prompt -> model segments; each segment is a list of text pieces (encoded canonically)
    and Tok pieces (one chosen token). Every segment but the last ends with a closing fence."""
    code = lambda body: "```python\n" + body + "\n"  # noqa: E731  (an open block, fence to follow)
    table = {
        # The closing fence split as "``" + "`\n": the fence token carries a newline.
        "Task fence_nl: what is 6 times 7?\n": [
            ["Let me compute.\n", code("print(6 * 7)"), Tok("``"), Tok("`\n")],
            ["The answer is 42.", EOS],
        ],
        # ... carries two newlines.
        "Task fence_nl2: what is 5 plus 8?\n": [
            ["Adding.\n", code("print(5 + 8)"), Tok("``"), Tok("`\n\n")],
            ["So 13.", EOS],
        ],
        # ... carries text after the fence ("```s"): the text stays before the output block.
        "Task fence_text: what is 3 squared?\n": [
            ["Square it.\n", code("print(3 ** 2)"), Tok("``"), Tok("`s")],
            ["So 9.", EOS],
        ],
        # An indented fence token with its newline (" ```\n").
        "Task fence_indent: what is 2 to the 10th?\n": [
            ["Power.\n", code("print(2 ** 10)"), Tok(" ```\n")],
            ["So 1024.", EOS],
        ],
        # A bare fence token: the response does not end with a newline.
        "Task fence_bare: what is 3 plus 4?\n": [
            ["Sum.\n", code("print(3 + 4)"), Tok("```")],
            ["So 7.", EOS],
        ],
        "Task three_blocks: count to three.\n": [
            ["One.\n", code("print(1)"), "```\n"],
            ["Two.\n", code("print(2)"), "```\n"],
            ["Three.\n", code("print(3)"), "```\n"],
            ["Done.", EOS],
        ],
        "Task error: divide by zero.\n": [
            ["Try.\n", code("print(1 / 0)"), "```\n"],
            ["It failed.", EOS],
        ],
        "Task session: define then use.\n": [
            ["Define.\n", code("x = 41"), "```\n"],
            ["Use.\n", code("print(x + 1)"), "```\n"],
            ["Got it.", EOS],
        ],
        "Task long: print a lot.\n": [
            ["Print.\n", code("print('ab ' * 120)"), "```\n"],
            ["Long.", EOS],
        ],
        "Task sleep: wait a second.\n": [
            ["Wait.\n", code(f"import time\ntime.sleep({SLEEP_S})\nprint('slept')"), "```\n"],
            ["Slept.", EOS],
        ],
    }
    for i in range(3):
        table[f"Task quick{i}: two quick steps.\n"] = [
            ["A.\n", code(f"print({i} + 1)"), "```\n"],
            ["B.\n", code(f"print({i} + 2)"), "```\n"],
            ["Ok.", EOS],
        ]
    return table


RANDOM_PROMPT = "Task random: add two numbers.\n"


def random_scripts(n: int, seed: int = 0) -> list[list[list]]:
    """`n` traces for RANDOM_PROMPT with random operands, so sampling at temperature 1 gives
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


def replay(tok, sandbox, prompt_ids, segments, config: RolloutConfig, session: str | None) -> list[int]:
    """The response the rollout will build when the model writes `segments` (run for real)."""
    response: list[int] = []
    for i, seg in enumerate(segments):
        response += seg
        if i == len(segments) - 1:
            break
        text = tok.decode(seg)
        block = find_code_block(text)
        assert block is not None and fence_closed(text), f"segment {i} does not close a block: {text!r}"
        result = sandbox.run(block.code, session=session)
        fb = build_feedback(
            tok, result.feedback().rstrip("\n"), template=config.feedback_template,
            prefix="" if text.endswith("\n") else "\n", max_tokens=config.max_feedback_tokens,
            marker=config.truncation_marker,
        )
        response += fb.ids
    return response


def train_to_emit(model, sequences: list[tuple[list[int], list[int]]], *, steps: int, lr: float) -> float:
    """Train on (prompt, response) pairs (loss on the response) with the exact used-vocabulary
    softmax described in the module docstring. Returns the final loss."""
    vocab = model.config.vocab_size
    used = sorted({t for p, r in sequences for t in p + r})
    used_t = torch.tensor(used)
    index = torch.full((vocab,), -1, dtype=torch.long)
    index[used_t] = torch.arange(len(used))
    with torch.no_grad():
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[used_t] = True
        model.lm_head.weight[~keep] = 0.0
    log_unused = math.log(vocab - len(used))
    width = max(len(p) + len(r) for p, r in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    att = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for b, (p, r) in enumerate(sequences):
        seq = torch.tensor(p + r)
        ids[b, : len(seq)] = seq
        att[b, : len(seq)] = 1
        labels[b, len(p) - 1 : len(seq) - 1] = index[torch.tensor(r)]  # position t predicts t+1
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        hidden = model.model(input_ids=ids, attention_mask=att).last_hidden_state
        logits = hidden @ model.lm_head.weight[used_t].T
        logits = torch.cat([logits, torch.full_like(logits[..., :1], log_unused)], dim=-1)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss)


@dataclass
class World:
    tok: object
    engine: HFEngine
    sandbox: Sandbox
    prompts: dict[str, list[int]]  # prompt text -> ids
    segments: dict[str, list[list[int]]]  # prompt text -> model segments (token ids)
    expected: dict[str, list[int]]  # prompt text -> full expected response (greedy, default config)


def base_config(**overrides) -> RolloutConfig:
    defaults = dict(max_response_tokens=400, tool_budget=4, temperature=0.0, feedback_template=TEMPLATE,
                    max_feedback_tokens=256)
    defaults.update(overrides)
    return RolloutConfig(**defaults)


@pytest.fixture(scope="session")
def world():
    tok = qwen_tokenizer()
    sandbox = Sandbox(workers=4, timeout_s=10)
    config = base_config()
    prompts, segments, expected, sequences = {}, {}, {}, []
    for prompt, segs in script_table().items():
        prompts[prompt] = tok.encode(prompt, add_special_tokens=False)
        segments[prompt] = [encode_segment(tok, s) for s in segs]
        session = "train-session" if "session" in prompt else None
        expected[prompt] = replay(tok, sandbox, prompts[prompt], segments[prompt], config, session)
        if session:
            sandbox.close_session(session)
        sequences.append((prompts[prompt], expected[prompt]))
    random_ids = tok.encode(RANDOM_PROMPT, add_special_tokens=False)
    prompts[RANDOM_PROMPT] = random_ids
    for segs in random_scripts(48):
        seg_ids = [encode_segment(tok, s) for s in segs]
        sequences.append((random_ids, replay(tok, sandbox, random_ids, seg_ids, config, None)))
    model = tiny_causal_lm(tok, hidden_size=96, num_layers=2, num_heads=4, num_kv_heads=2, seed=0)
    torch.manual_seed(0)
    loss = train_to_emit(model, sequences, steps=300, lr=1e-2)
    assert loss < 0.5, f"the tiny model did not learn its scripts (loss {loss:.3f})"
    engine = HFEngine(model, tok, seed=0)
    yield World(tok, engine, sandbox, prompts, segments, expected)
    engine.close()
    sandbox.close()


class Recorder:
    """The real engine, with every Completion it returns kept in call order (per prompt)."""

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


def test_greedy_replays_every_script(world):
    """Sanity of the set-up: greedy rollouts reproduce the trained scripts exactly."""
    names = list(world.expected)
    config = base_config(session_mode=False)
    trajs = rollout(world.engine, world.sandbox, [world.prompts[n] for n in names], config)
    for name, traj in zip(names, trajs):
        if "session" in name:
            continue
        assert traj.response_ids == world.expected[name], (name, world.tok.decode(traj.response_ids))
        assert traj.finish_reason == "eos"
