"""HFEngine: continuous batching checked against `model.generate` and a full forward pass.

All models are real `Qwen2ForCausalLM`s built from a tiny config. Random weights produce
gibberish, which is fine for equality checks; the stop-string tests use a model whose weights
were trained to emit one known Qwen-tokenized text, so token boundaries are real ones.
"""

import asyncio
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cir.engines.base import Completion, Engine, SamplingParams, register_stop_rule
from cir.engines.hf import HFEngine, inverse_cdf_draw, sample_tokens
from cir.models import tiny_causal_lm
from cir.tokenization import char_tokenizer, qwen_tokenizer

ALPHABET = "0123456789+-*/=()., \nabcdefghijklmnopqrstuvwxyz`"
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    # barriers between a busy engine thread and descheduled pool threads cost milliseconds a step.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(ALPHABET)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_causal_lm(tok, seed=0)


@pytest.fixture
def engine(model, tok):
    eng = HFEngine(model, tok, max_batch_size=64, seed=0)
    yield eng
    eng.close()


def _prompts(tok, n, seed=0, max_len=30):
    rng = random.Random(seed)
    return [tok.encode("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, max_len)))) for _ in range(n)]


def _reference_greedy(model, prompt, max_new_tokens):
    """Greedy continuation by transformers' own `generate` (no EOS stop)."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


@torch.no_grad()
def _recomputed_logprobs(model, prompt, completion, temperature=1.0):
    """Log-probs of `completion` from one full forward pass over prompt + completion (the trainer's view)."""
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
    if temperature > 0:
        logits = logits / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def _assert_logprobs_match(model, prompt, completion: Completion, temperature):
    assert len(completion.logprobs) == len(completion.token_ids)
    expected = _recomputed_logprobs(model, prompt, completion.token_ids, temperature)
    got = torch.tensor(completion.logprobs, dtype=torch.float64)
    assert torch.isfinite(got).all()
    diff = (got - expected).abs().max().item()
    assert diff < LOGPROB_TOL, f"sampler log-probs differ from the full forward by {diff}"


# ----------------------------------------------------------------------------------------------
# Correctness of the batched cache
# ----------------------------------------------------------------------------------------------


def test_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, Engine)


def test_greedy_matches_generate_with_requests_joining_mid_flight(model, tok, engine):
    prompts = _prompts(tok, 9, seed=1)
    max_new = 40
    greedy = SamplingParams(max_new_tokens=max_new, temperature=0.0)

    async def main():
        waves = [prompts[:3], prompts[3:7], prompts[7:]]
        tasks, unfinished_when_joined = [], []
        for wave in waves:
            if tasks:  # let the running batch decode a few steps, then join it
                target = engine.stats.decode_steps + 4
                while engine.stats.decode_steps < target:
                    await asyncio.sleep(0.001)
                unfinished_when_joined.append(sum(not t.done() for t in tasks))
            tasks += [asyncio.ensure_future(engine.generate(p, greedy)) for p in wave]
        return await asyncio.gather(*tasks), unfinished_when_joined

    completions, unfinished = asyncio.run(main())
    # The later waves really joined a running batch.
    assert unfinished[0] == 3 and unfinished[1] >= 3
    assert engine.stats.prefill_steps >= 3
    assert engine.stats.max_batch_size_seen >= 7
    for prompt, completion in zip(prompts, completions):
        assert completion.token_ids == _reference_greedy(model, prompt, max_new)
        assert completion.finish_reason == "length"
        _assert_logprobs_match(model, prompt, completion, temperature=0.0)


def test_sampled_logprobs_match_full_forward(model, tok, engine):
    prompts = _prompts(tok, 12, seed=2)
    settings = [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=0.9, top_k=12, top_p=0.9),
    ]
    params = [
        SamplingParams(max_new_tokens=25 + 3 * i, seed=100 + i, **settings[i % len(settings)])
        for i in range(len(prompts))
    ]
    completions = engine.generate_batch(prompts, params)
    for prompt, sp, completion in zip(prompts, params, completions):
        assert len(completion.token_ids) == sp.max_new_tokens
        _assert_logprobs_match(model, prompt, completion, sp.temperature)
        if sp.top_k:  # every sampled token lies in the top-k of the (recomputed) logits
            with torch.no_grad():
                ids = torch.tensor([prompt + completion.token_ids])
                logits = model(ids).logits[0, len(prompt) - 1 : -1]
            topk = logits.topk(sp.top_k, dim=-1).indices
            assert all(t in row for t, row in zip(completion.token_ids, topk.tolist()))


def test_eager_attention_model_matches_generate(tok):
    model = tiny_causal_lm(tok, seed=3, attn_implementation="eager")
    prompts = _prompts(tok, 5, seed=3)
    with HFEngine(model, tok) as eng:
        completions = eng.generate_batch(prompts, SamplingParams(max_new_tokens=20, temperature=0))
        sampled = eng.generate_batch(prompts, SamplingParams(max_new_tokens=20, temperature=1.0, seed=5))
    for prompt, completion, s in zip(prompts, completions, sampled):
        assert completion.token_ids == _reference_greedy(model, prompt, 20)
        _assert_logprobs_match(model, prompt, s, 1.0)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def test_seeded_request_independent_of_batch_composition(model, tok):
    prompt = tok.encode("12*34+(56-7)=")
    target = SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=7)
    with HFEngine(model, tok) as eng:
        alone = eng.generate_batch([prompt], target)[0]

    others = _prompts(tok, 10, seed=4)
    other_params = [SamplingParams(max_new_tokens=10 + 4 * i, temperature=0.8 + 0.05 * i, seed=i) for i in range(10)]

    async def crowded(eng):
        first = [asyncio.ensure_future(eng.generate(p, sp)) for p, sp in zip(others[:6], other_params[:6])]
        while eng.stats.decode_steps < 3:
            await asyncio.sleep(0.001)
        mine = asyncio.ensure_future(eng.generate(prompt, target))  # joins mid-flight, at another row
        rest = [asyncio.ensure_future(eng.generate(p, sp)) for p, sp in zip(others[6:], other_params[6:])]
        await asyncio.gather(*first, *rest)
        return await mine

    with HFEngine(model, tok, seed=123) as eng:
        in_batch = asyncio.run(crowded(eng))
        assert eng.stats.max_batch_size_seen >= 5
    assert in_batch.token_ids == alone.token_ids
    assert max(abs(a - b) for a, b in zip(in_batch.logprobs, alone.logprobs)) < 1e-5
    # ... and the seed matters (this test could fail).
    with HFEngine(model, tok) as eng:
        other_seed = eng.generate_batch(
            [prompt], SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=8)
        )[0]
    assert other_seed.token_ids != alone.token_ids


def test_unseeded_requests_follow_the_engine_seed(model, tok):
    prompts = _prompts(tok, 4, seed=5)
    sp = SamplingParams(max_new_tokens=15, temperature=1.0)
    runs = []
    for seed in (11, 11, 12):
        with HFEngine(model, tok, seed=seed) as eng:
            runs.append([c.token_ids for c in eng.generate_batch(prompts, sp)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_top_k_one_and_tiny_top_p_equal_greedy(model, tok, engine):
    prompts = _prompts(tok, 4, seed=6)
    greedy = engine.generate_batch(prompts, SamplingParams(max_new_tokens=25, temperature=0))
    top_k = engine.generate_batch(prompts, SamplingParams(max_new_tokens=25, temperature=1.0, top_k=1, seed=1))
    top_p = engine.generate_batch(prompts, SamplingParams(max_new_tokens=25, temperature=1.0, top_p=1e-6, seed=2))
    for g, k, p in zip(greedy, top_k, top_p):
        assert k.token_ids == g.token_ids
        assert p.token_ids == g.token_ids
        # At temperature 1 the reported log-probs are those of the untruncated softmax.
        assert max(abs(a - b) for a, b in zip(k.logprobs, g.logprobs)) < 1e-6


def test_sample_tokens_follows_the_distribution():
    # Inverse-CDF sampling with many uniforms reproduces softmax(logits / T) over a small vocab.
    torch.manual_seed(0)
    logits = torch.randn(1, 6).repeat(20000, 1)
    u = torch.rand(20000)
    n = len(u)
    tokens, logprobs = sample_tokens(logits, torch.full((n,), 0.5), torch.zeros(n, dtype=torch.long), torch.ones(n), u)
    freq = torch.bincount(tokens, minlength=6).double() / n
    expected = torch.softmax(logits[0].double() / 0.5, -1)
    assert (freq - expected).abs().max() < 0.015
    assert torch.allclose(logprobs.double(), expected.log()[tokens], atol=1e-5)
    # top-k 2: only the two best tokens, renormalised.
    tokens, _ = sample_tokens(logits, torch.ones(n), torch.full((n,), 2, dtype=torch.long), torch.ones(n), u)
    best2 = set(logits[0].topk(2).indices.tolist())
    assert set(tokens.tolist()) == best2


@pytest.mark.parametrize("vocab", [6, 64, 997, 1000, 151665])
def test_two_level_inverse_cdf_matches_a_full_scan(vocab):
    # Reference: one float64 cumulative sum over the whole row. Vocabularies that split into
    # blocks evenly and ones that need padding; a third of the entries zero (as after top-k).
    gen = torch.Generator().manual_seed(vocab)
    rows = 16
    weights = torch.rand(rows, vocab, generator=gen) ** 4
    weights[torch.rand(rows, vocab, generator=gen) < 0.33] = 0.0
    weights[:, 0] = 1.0
    cdf = weights.double().cumsum(-1)
    total = cdf[:, -1:]
    mismatches = 0
    for _ in range(16):
        u = torch.rand(rows, generator=gen)
        drawn = inverse_cdf_draw(weights, u)
        target = u.double()[:, None] * total
        expected = torch.searchsorted(cdf, target, right=True).squeeze(1)
        assert (weights.gather(1, drawn[:, None]) > 0).all()
        differ = drawn != expected
        mismatches += int(differ.sum())
        # A draw may differ only when it falls within float32 rounding of a boundary.
        boundary = cdf.gather(1, torch.minimum(drawn, expected)[:, None])
        assert ((boundary - target).abs() <= 1e-5 * total)[differ].all()
    assert mismatches <= rows * 16 // 50


# ----------------------------------------------------------------------------------------------
# Stops
# ----------------------------------------------------------------------------------------------


def test_stop_token_is_kept_and_ends_the_completion(tok, engine):
    prompt = tok.encode("hello world 42")
    free = engine.generate_batch([prompt], SamplingParams(max_new_tokens=40, temperature=0))[0]
    stop = free.token_ids[12]
    first = free.token_ids.index(stop)
    stopped = engine.generate_batch([prompt], SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=(stop,)))[
        0
    ]
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.finish_reason == "stop_token" and stopped.stop_token_id == stop
    assert stopped.logprobs == free.logprobs[: first + 1]


def test_length_and_position_limits(tok):
    model = tiny_causal_lm(tok, seed=1, max_position_embeddings=32)
    with HFEngine(model, tok) as eng:
        c = eng.generate_batch([tok.encode("abc")], SamplingParams(max_new_tokens=7, temperature=0))[0]
        assert len(c.token_ids) == 7 and c.finish_reason == "length"
        # The whole sequence must fit the model's positions: generation is cut there.
        c = eng.generate_batch([tok.encode("a" * 28)], SamplingParams(max_new_tokens=10, temperature=0))[0]
        assert len(c.token_ids) == 4 and c.finish_reason == "length"
        with pytest.raises(ValueError, match="max_position_embeddings=32"):
            eng.generate_batch([tok.encode("a" * 32)], SamplingParams(max_new_tokens=1))


# A model trained to emit one known Qwen-tokenized text, so stop strings meet real token
# boundaries: the closing fence "```" is tokenized as "``" + "`\n" and "\boxed" as " $\" + "boxed".
MEMORIZED_TEXT = (
    "Let me compute.\n```python\nprint(12*34)\n```\n```output\n408\n```\n"
    "So the answer is $\\boxed{408}$ \U0001f701.<|endoftext|>"
)


@pytest.fixture(scope="module")
def memorized():
    """(tokenizer, model, token ids of MEMORIZED_TEXT); greedy decoding follows the text."""
    qwen = qwen_tokenizer()
    ids = qwen.encode(MEMORIZED_TEXT)
    vocab = sorted(set(ids))
    local = {t: i for i, t in enumerate(vocab)}
    # Train a small-vocabulary model on the text, with one extra zero logit standing for every
    # other token, until each next token wins by a margin.
    sizing = char_tokenizer("".join(chr(0x4E00 + i) for i in range(len(vocab))))
    small = tiny_causal_lm(sizing, seed=0)
    x = torch.tensor([[local[t] for t in ids]])
    opt = torch.optim.Adam(small.parameters(), lr=1e-2)
    small.train()
    for _ in range(600):
        logits = small(x[:, :-1]).logits[0, :, : len(vocab)]
        logits = torch.cat([logits, torch.zeros_like(logits[:, :1])], dim=1)
        loss = torch.nn.functional.cross_entropy(logits, x[0, 1:])
        target = logits.gather(1, x[0, 1:, None]).squeeze(1)
        rest = logits.scatter(1, x[0, 1:, None], float("-inf")).max(1).values
        if (target - rest).min() > 2.0:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    else:
        raise AssertionError("the memorizing model did not converge")
    # Move the weights into a model with Qwen's full vocabulary; rows of tokens not in the text
    # are zero, so their logit is exactly 0 and loses to the trained next token.
    big = tiny_causal_lm(qwen, seed=0)
    state = small.state_dict()
    rows = torch.tensor(vocab)
    with torch.no_grad():
        for name, param in big.named_parameters():
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                param.zero_()
                param[rows] = state[name][: len(vocab)]
            else:
                param.copy_(state[name])
        greedy = big(torch.tensor([ids])).logits[0, :-1].argmax(-1)
    assert greedy.tolist() == ids[1:], "the expanded model does not follow the text"
    big.eval()
    return qwen, big, ids


def _split(ids, qwen, prefix_text):
    """Split ids into (prompt, continuation) right after the token that ends `prefix_text`."""
    for k in range(1, len(ids)):
        if qwen.decode(ids[:k]) == prefix_text:
            return ids[:k], ids[k:]
    raise AssertionError(f"{prefix_text!r} does not end at a token boundary")


def test_memorized_model_follows_the_text(memorized):
    qwen, model, ids = memorized
    prompt, rest = _split(ids, qwen, "Let me compute.\n```python\n")
    with HFEngine(model, qwen) as eng:
        c = eng.generate_batch(
            [prompt], SamplingParams(max_new_tokens=100, temperature=0, stop_token_ids=(qwen.eos_token_id,))
        )[0]
    assert c.token_ids == rest and c.finish_reason == "stop_token"
    _assert_logprobs_match(model, prompt, c, 0.0)


@pytest.mark.parametrize(
    "stop_string, completed_by, extra",
    [
        ("\n```", "`\n", "\n"),  # the closing fence's token also carries the newline after it
        ("$\\box", "boxed", "ed"),  # the stop string ends inside a token
        ("\U0001f701", None, ""),  # one character spread over three byte-level tokens
    ],
)
def test_stop_string_completed_inside_a_token(memorized, stop_string, completed_by, extra):
    qwen, model, ids = memorized
    prompt, rest = _split(ids, qwen, "Let me compute.\n```python\n")
    params = SamplingParams(max_new_tokens=100, temperature=0, stop_strings=("never there", stop_string))
    with HFEngine(model, qwen) as eng:
        c = eng.generate_batch([prompt], params)[0]
    assert c.finish_reason == "stop_string" and c.stop_string == stop_string
    n = len(c.token_ids)
    assert c.token_ids == rest[:n]  # the completion is the text, cut ...
    text = qwen.decode(c.token_ids)
    assert stop_string in text and stop_string not in qwen.decode(
        c.token_ids[:-1]
    )  # ... at the first token that completes it
    assert text.endswith(stop_string + extra)  # the token is kept whole, extra text included
    if completed_by is not None:
        assert qwen.decode(c.token_ids[-1:]) == completed_by
    else:  # the character's bytes came in several tokens
        assert qwen.decode(c.token_ids[-1:]) != stop_string


def test_stop_rule_ends_at_the_closing_fence(memorized):
    qwen, model, ids = memorized
    prompt, rest = _split(ids, qwen, "Let me compute")
    seen = []

    def closed_python_block(text: str) -> bool:
        seen.append(text)
        return re.search(r"```python\n.*?\n```", text, re.S) is not None

    # The request names its rule (plain data); the engine resolves the name where it runs.
    register_stop_rule("test-closed-python-block", closed_python_block, overwrite=True)
    params = SamplingParams(max_new_tokens=100, temperature=0, stop_rule="test-closed-python-block")
    with HFEngine(model, qwen) as eng:
        c = eng.generate_batch([prompt], params)[0]
    assert c.finish_reason == "stop_rule"
    assert c.token_ids == rest[: len(c.token_ids)]
    assert qwen.decode(c.token_ids) == ".\n```python\nprint(12*34)\n```\n"
    # The predicate saw the decoded completion so far, growing token by token.
    assert seen[-1] == qwen.decode(c.token_ids)
    assert all(seen[i] == qwen.decode(c.token_ids[: len(c.token_ids) - len(seen) + 1 + i]) for i in range(len(seen)))


def test_earliest_stop_condition_wins(memorized):
    qwen, model, ids = memorized
    prompt, rest = _split(ids, qwen, "Let me compute.\n```python\n")
    output_token = qwen.encode("output")[0]
    params = SamplingParams(
        max_new_tokens=100,
        temperature=0,
        stop_strings=("408",),
        stop_token_ids=(output_token,),
        stop_rule="test-answer-written",
    )
    register_stop_rule("test-answer-written", lambda text: "answer" in text, overwrite=True)
    with HFEngine(model, qwen) as eng:
        c = eng.generate_batch([prompt], params)[0]
    assert c.finish_reason == "stop_token" and c.token_ids[-1] == output_token
    assert qwen.decode(c.token_ids) == "print(12*34)\n```\n```output"


# ----------------------------------------------------------------------------------------------
# Concurrency, cancellation, weights, errors
# ----------------------------------------------------------------------------------------------


def test_sixteen_coroutines_are_batched_and_the_loop_stays_free(model, tok, engine):
    prompts = _prompts(tok, 6, seed=7)
    lengths = [8, 13, 21]
    references = {i: _reference_greedy(model, p, max(lengths)) for i, p in enumerate(prompts)}

    async def worker(k):
        results = []
        for call in range(3):
            i, n = (k + call) % len(prompts), lengths[(k * 7 + call) % len(lengths)]
            c = await engine.generate(prompts[i], SamplingParams(max_new_tokens=n, temperature=0))
            results.append((i, n, c))
            if k % 2:  # half of them wait on something else between calls (as on the sandbox)
                await asyncio.sleep(0.003 * (k % 5))
        return results

    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.001)
                ticks += 1

        tick_task = asyncio.ensure_future(ticker())
        start = time.perf_counter()
        results = await asyncio.gather(*(worker(k) for k in range(16)))
        elapsed = time.perf_counter() - start
        done.set()
        await tick_task
        return results, ticks, elapsed

    results, ticks, elapsed = asyncio.run(main())
    assert sum(len(r) for r in results) == 48
    for per_worker in results:
        for i, n, c in per_worker:
            assert c.token_ids == references[i][:n] and c.finish_reason == "length"
    assert engine.stats.requests_completed == 48
    assert engine.stats.max_batch_size_seen >= 8
    # The event loop kept running while the model computed (forwards run on the worker thread).
    assert ticks >= min(20, elapsed / 0.001 / 10)


def test_cancelled_request_leaves_the_batch(model, tok, engine):
    prompts = _prompts(tok, 4, seed=8)

    async def main():
        long = SamplingParams(max_new_tokens=200, temperature=0)
        tasks = [
            asyncio.ensure_future(engine.generate(p, SamplingParams(max_new_tokens=30, temperature=0)))
            for p in prompts[:3]
        ]
        victim = asyncio.ensure_future(engine.generate(prompts[3], long))
        while engine.stats.decode_steps < 5:
            await asyncio.sleep(0.001)
        victim.cancel()
        results = await asyncio.gather(*tasks)
        with pytest.raises(asyncio.CancelledError):
            await victim
        return results

    results = asyncio.run(main())
    for p, c in zip(prompts, results):
        assert c.token_ids == _reference_greedy(model, p, 30)
    assert engine.stats.requests_completed == 3
    # The cancelled row was dropped: far fewer than its 200 decoding steps were run.
    assert engine.stats.decode_steps < 100


def test_load_weights_into_a_private_copy(tok):
    model_a = tiny_causal_lm(tok, seed=10)
    model_b = tiny_causal_lm(tok, seed=11)
    prompt = tok.encode("7*8=")
    sp = SamplingParams(max_new_tokens=20, temperature=0)
    with HFEngine(model_a, tok, share_model=False) as eng:
        assert eng.model is not model_a
        assert eng.generate_batch([prompt], sp)[0].token_ids == _reference_greedy(model_a, prompt, 20)
        eng.load_weights(model_b.named_parameters())
        assert eng.generate_batch([prompt], sp)[0].token_ids == _reference_greedy(model_b, prompt, 20)
        with pytest.raises(KeyError, match="no parameter 'nope'"):
            eng.load_weights([("nope", torch.zeros(1))])


def test_shared_model_sees_updates_and_load_weights_is_a_no_op(tok):
    model = tiny_causal_lm(tok, seed=12)
    prompt = tok.encode("(1+2)*3")
    sp = SamplingParams(max_new_tokens=20, temperature=0)
    with HFEngine(model, tok, share_model=True) as eng:
        assert eng.model is model
        before = eng.generate_batch([prompt], sp)[0].token_ids
        with torch.no_grad():  # the trainer's update, in place
            model.lm_head.weight.mul_(-1.0)
        eng.load_weights(model.named_parameters())  # same tensors: nothing to copy
        after = eng.generate_batch([prompt], sp)[0].token_ids
    assert after == _reference_greedy(model, prompt, 20)
    assert after != before


def test_bad_requests_fail_clearly(model, tok, engine):
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate_batch([[]], SamplingParams(max_new_tokens=3))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        engine.generate_batch([[1, 10_000]], SamplingParams(max_new_tokens=3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate_batch([[5]], SamplingParams(max_new_tokens=0))
    with pytest.raises(ValueError, match="top_p"):
        engine.generate_batch([[5]], SamplingParams(max_new_tokens=3, top_p=0.0))
    with pytest.raises(ValueError, match="temperature"):
        engine.generate_batch([[5]], SamplingParams(max_new_tokens=3, temperature=-1))

    def broken(text):
        raise RuntimeError("predicate failed")

    register_stop_rule("test-broken", broken, overwrite=True)
    with pytest.raises(KeyError, match="unknown stop rule 'test-missing'"):
        engine.generate_batch([[5]], SamplingParams(max_new_tokens=3, stop_rule="test-missing"))
    prompts = _prompts(tok, 2, seed=9)
    bad = engine.submit(prompts[0], SamplingParams(max_new_tokens=10, temperature=0, stop_rule="test-broken"))
    good = engine.submit(prompts[1], SamplingParams(max_new_tokens=10, temperature=0))
    with pytest.raises(RuntimeError, match="predicate failed"):
        bad.result()
    assert good.result().token_ids == _reference_greedy(model, prompts[1], 10)

    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate_batch([[5]], SamplingParams(max_new_tokens=3))


def test_share_model_refuses_to_move_the_trainers_model(model, tok):
    with pytest.raises(ValueError, match="share_model=True"):
        HFEngine(model, tok, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Pause and resume (what the asynchronous collector builds on)
# ----------------------------------------------------------------------------------------------


def _wait_for(condition, timeout_s=60.0):
    deadline = time.perf_counter() + timeout_s
    while not condition():
        if time.perf_counter() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.001)


def _greedy(n):
    return SamplingParams(max_new_tokens=n, temperature=0)


def _assert_close(got, want, tol=LOGPROB_TOL):
    assert len(got) == len(want)
    assert max((abs(a - b) for a, b in zip(got, want)), default=0.0) < tol


def test_pause_resolves_every_request_with_its_partial_and_greedy_continuations_are_exact(model, tok):
    prompts = _prompts(tok, 6, seed=11)
    max_new = 60
    with HFEngine(model, tok, max_batch_size=4) as eng:
        unpaused = eng.generate_batch(prompts, _greedy(max_new))
        start, sampled = eng.activity(), eng.stats.tokens_generated
        futures = [eng.submit(p, _greedy(max_new)) for p in prompts]  # four run, two wait in the queue
        _wait_for(lambda: eng.activity().steps >= start.steps + 10)
        eng.pause()
        assert all(f.done() for f in futures)  # resolved by the time pause returns
        partials = [f.result() for f in futures]
        sampled = eng.stats.tokens_generated - sampled
        steps = eng.activity().steps
        time.sleep(0.1)
        assert eng.activity().steps == steps  # no forward pass while paused
        eng.resume()
        continued = eng.generate_batch(
            [p + c.token_ids for p, c in zip(prompts, partials)],
            [_greedy(max_new - len(c.token_ids)) for c in partials],
        )
        activity = eng.activity() - start
    lengths = [len(c.token_ids) for c in partials]
    assert sum(lengths) == sampled  # every token sampled before the pause is in a partial
    assert all(10 <= n < max_new for n in lengths[:4]), lengths  # the running ones, cut mid-way
    assert lengths[4:] == [0, 0]  # the queued ones had sampled nothing
    assert activity.aborted == 6 and activity.pauses == 1
    for partial, cont, whole in zip(partials, continued, unpaused):
        n = len(partial.token_ids)
        assert partial.finish_reason == "aborted" and partial.stop_token_id is None
        # Exactly what the request had sampled: the unpaused completion's first n tokens and log-probs.
        assert partial.token_ids == whole.token_ids[:n]
        _assert_close(partial.logprobs, whole.logprobs[:n])
        # Continued with the prefix, greedy: token for token the unpaused completion.
        assert partial.token_ids + cont.token_ids == whole.token_ids
        _assert_close(partial.logprobs + cont.logprobs, whole.logprobs)
        assert cont.finish_reason == "length"


def test_a_paused_seeded_request_keeps_exactly_what_it_sampled(model, tok):
    prompts = _prompts(tok, 3, seed=12)
    params = [SamplingParams(max_new_tokens=80, temperature=1.0, top_p=0.9, seed=40 + i) for i in range(3)]
    with HFEngine(model, tok) as eng:
        unpaused = eng.generate_batch(prompts, params)
        start, sampled = eng.activity().steps, eng.stats.tokens_generated
        futures = [eng.submit(p, sp) for p, sp in zip(prompts, params)]
        _wait_for(lambda: eng.activity().steps >= start + 12)
        eng.pause()
        eng.resume()
        sampled = eng.stats.tokens_generated - sampled
    assert sum(len(f.result(timeout=0).token_ids) for f in futures) == sampled
    for future, whole, prompt in zip(futures, unpaused, prompts):
        partial = future.result(timeout=0)
        n = len(partial.token_ids)
        assert partial.finish_reason == "aborted" and 12 <= n < 80
        assert partial.token_ids == whole.token_ids[:n]
        _assert_close(partial.logprobs, whole.logprobs[:n])
        _assert_logprobs_match(model, prompt, partial, 1.0)


def test_requests_submitted_while_paused_wait_for_resume(model, tok):
    prompt = tok.encode("(12+7)*3=")
    with HFEngine(model, tok) as eng:
        assert eng.generate_batch([prompt], _greedy(5))[0].finish_reason == "length"
        before = eng.activity()
        # Four decoding steps after the prefill; the counters of the last may land just after it resolved.
        assert before.busy_s > 0 and before.steps >= 3 and 0 <= before.idle_share <= 1
        eng.pause()
        eng.pause()  # pausing a paused engine does nothing
        steps = eng.activity().steps  # settled: pause returns after the thread's last turn
        future = eng.submit(prompt, _greedy(30))
        time.sleep(0.2)
        assert not future.done()  # not refused, not run: waiting
        assert eng.activity().steps == steps
        eng.resume()
        completion = future.result(timeout=60)
        eng.resume()  # resuming a running engine does nothing
        during = eng.activity() - before
    assert completion.token_ids == _reference_greedy(model, prompt, 30)
    assert completion.finish_reason == "length"
    assert during.pauses == 1 and during.aborted == 0
    assert during.paused_s >= 0.2 and during.held_s >= 0.19
    assert during.held_s <= during.paused_s <= during.wall_s
    assert during.steps >= 28 and 0 < during.busy_s < during.wall_s


def test_weights_loaded_between_pause_and_resume_serve_the_continuation(tok):
    model_a = tiny_causal_lm(tok, seed=10)
    model_b = tiny_causal_lm(tok, seed=11)
    prompts = _prompts(tok, 4, seed=13)
    max_new = 50
    with HFEngine(model_a, tok, share_model=False) as eng:
        start = eng.activity().steps
        futures = [eng.submit(p, _greedy(max_new)) for p in prompts]
        _wait_for(lambda: eng.activity().steps >= start + 8)
        eng.pause()
        partials = [f.result(timeout=0) for f in futures]
        eng.load_weights(model_b.named_parameters())
        eng.resume()
        resumed = [p + c.token_ids for p, c in zip(prompts, partials)]
        remaining = [_greedy(max_new - len(c.token_ids)) for c in partials]
        continued = eng.generate_batch(resumed, remaining)
    with HFEngine(model_b, tok) as fresh:
        expected = fresh.generate_batch(resumed, remaining)
    for prompt, partial, cont, want in zip(prompts, partials, continued, expected):
        n = len(partial.token_ids)
        assert 8 <= n < max_new
        assert partial.token_ids == _reference_greedy(model_a, prompt, max_new)[:n]  # sampled under A
        assert cont.token_ids == want.token_ids  # continued under B, as a fresh engine on B does
        _assert_close(cont.logprobs, want.logprobs)
    assert any(
        c.token_ids != _reference_greedy(model_a, p + pc.token_ids, len(c.token_ids))
        for p, pc, c in zip(prompts, partials, continued)
    )  # not vacuous: B continues differently from A


def test_pause_and_resume_in_a_loop_under_concurrent_submitters(model, tok):
    prompts = _prompts(tok, 8, seed=14)
    max_new = 40
    with HFEngine(model, tok, max_batch_size=4) as eng:
        unpaused = eng.generate_batch(prompts, _greedy(max_new))
        start, sampled = eng.activity(), eng.stats.tokens_generated

        def trajectory(i):
            """Drive one greedy request to its end, continuing it after every pause."""
            tokens, logprobs, pieces = [], [], 0
            while True:
                c = eng.submit(prompts[i] + tokens, _greedy(max_new - len(tokens))).result(timeout=60)
                tokens, logprobs, pieces = tokens + c.token_ids, logprobs + c.logprobs, pieces + 1
                if c.finish_reason != "aborted":
                    return tokens, logprobs, pieces

        with ThreadPoolExecutor(4) as pool:
            runs = [pool.submit(trajectory, i) for i in range(len(prompts))]
            for _ in range(25):
                time.sleep(0.004)
                eng.pause(timeout_s=30)
                time.sleep(0.002)
                eng.resume()
            results = [run.result(timeout=120) for run in runs]
        activity = eng.activity() - start
        sampled = eng.stats.tokens_generated - sampled
    # No token lost or duplicated across the pieces: every sampled token came back once, and the
    # pieces of each trajectory join into the unpaused completion.
    assert sum(len(tokens) for tokens, _, _ in results) == sampled
    for (tokens, logprobs, _), whole in zip(results, unpaused):
        assert tokens == whole.token_ids
        _assert_close(logprobs, whole.logprobs)
    assert activity.pauses == 25
    assert sum(pieces - 1 for _, _, pieces in results) >= 8  # the pauses did cut trajectories
    assert activity.aborted >= 8


def test_pause_and_close_while_requests_run(model, tok):
    prompts = _prompts(tok, 6, seed=15)
    eng = HFEngine(model, tok, max_batch_size=4)
    long = _greedy(1000)
    futures = [eng.submit(p, long) for p in prompts]
    _wait_for(lambda: eng.activity().steps >= 3)
    pauser = threading.Thread(target=eng.pause)
    pauser.start()
    pauser.join(30)
    assert not pauser.is_alive()
    assert all(f.result(timeout=0).finish_reason == "aborted" for f in futures)
    # Resumed, then closed from another thread while steps run: every future resolves, close returns.
    eng.resume()
    futures = [eng.submit(p, long) for p in prompts]
    _wait_for(lambda: eng.activity().steps >= 6)
    closer = threading.Thread(target=eng.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive()
    for f in futures:
        with pytest.raises(RuntimeError, match="closed"):
            f.result(timeout=5)
    with pytest.raises(RuntimeError, match="closed"):
        eng.pause()
    with pytest.raises(RuntimeError, match="closed"):
        eng.submit(prompts[0], long)


def test_a_stuck_step_ends_in_timeouts_not_a_hang(model, tok):
    entered, release = threading.Event(), threading.Event()

    def stuck(text):
        entered.set()
        release.wait(60)
        return False

    register_stop_rule("test-stuck", stuck, overwrite=True)
    eng = HFEngine(model, tok, timeout_s=0.3)
    try:
        future = eng.submit(tok.encode("1+1="), SamplingParams(max_new_tokens=5, temperature=0, stop_rule="test-stuck"))
        assert entered.wait(30)  # the engine thread is inside a step, stuck in the stop rule
        with pytest.raises(TimeoutError, match="pause waited 0.3 s"):
            eng.pause()
        with pytest.raises(TimeoutError, match="load_weights waited 0.3 s"):
            eng.load_weights(model.named_parameters())
        with pytest.raises(TimeoutError, match="did not stop within 0.3 s"):
            eng.close()
        with pytest.raises(RuntimeError, match="stuck"):
            future.result(timeout=0)  # the request did not wait for the stuck step
    finally:
        release.set()
    eng.close(timeout_s=30)  # unstuck, the thread ends


@pytest.mark.gpu
def test_cuda_greedy_matches_generate(tok):
    model = tiny_causal_lm(tok, seed=13).cuda()
    prompts = _prompts(tok, 6, seed=10)
    with HFEngine(model, tok) as eng:
        completions = eng.generate_batch(prompts, SamplingParams(max_new_tokens=30, temperature=0))
        sampled = eng.generate_batch(prompts, SamplingParams(max_new_tokens=30, temperature=1.0, seed=3))
    cpu_model = model.cpu()
    for p, c, s in zip(prompts, completions, sampled):
        assert c.token_ids == _reference_greedy(cpu_model, p, 30)
        _assert_logprobs_match(cpu_model, p, s, 1.0)


@pytest.mark.gpu
def test_cuda_pause_and_greedy_continuation(tok):
    model = tiny_causal_lm(tok, seed=14).cuda()
    prompts = _prompts(tok, 4, seed=16)
    max_new = 40
    with HFEngine(model, tok) as eng:
        unpaused = eng.generate_batch(prompts, _greedy(max_new))
        start = eng.activity().steps
        futures = [eng.submit(p, _greedy(max_new)) for p in prompts]
        _wait_for(lambda: eng.activity().steps >= start + 5)
        eng.pause()
        partials = [f.result(timeout=0) for f in futures]
        eng.resume()
        continued = eng.generate_batch(
            [p + c.token_ids for p, c in zip(prompts, partials)],
            [_greedy(max_new - len(c.token_ids)) for c in partials],
        )
    for partial, cont, whole in zip(partials, continued, unpaused):
        assert partial.finish_reason == "aborted" and 5 <= len(partial.token_ids) < max_new
        assert partial.token_ids + cont.token_ids == whole.token_ids
        _assert_close(partial.logprobs + cont.logprobs, whole.logprobs)
