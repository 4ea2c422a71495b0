"""The weight hand-off between the trainer's CUDA stream and an engine thread's own stream
(`cir.engines.vllm._StreamHandoff`, used by `VLLMEngine.load_weights`).

vLLM's engine thread runs on a stream of its own, so nothing orders its copies after the
trainer's writes to a bucket (an FSDP2 all-gather, an optimizer step on live parameters), nor
the trainer's next writes after the engine's copies. On one GPU the tests delay one side's
stream (`torch.cuda._sleep`) and check what the engine's copy holds: the new values when the
hand-off is ordered, and, as a control showing that the delay does expose the race, stale ones
when it is not. The first test needs only torch and CUDA (it runs on the device image, which
has no vLLM); the second runs the real `VLLMEngine` where vLLM is installed and is skipped, with
its reason, where it is not. On a CPU the ordering is a no-op (last test); the vLLM CPU tests
(tests/test_engine_vllm.py) run `load_weights` through it.
"""

from __future__ import annotations

import threading

import pytest
import torch

from cir.engines.vllm import _StreamHandoff

SLEEP_CYCLES = 200_000_000  # ~0.1 s of GPU clock: far longer than a copy takes
N = 1 << 20


def _hand_off(ordered: bool, slow_side: str) -> torch.Tensor:
    """The trainer writes 1.0 into a bucket, an engine thread on its own stream copies it into
    the engine's weights, then the trainer writes 2.0 into the bucket (its reuse, or the next
    optimizer step on a live parameter). `slow_side` ("trainer" or "engine") is delayed before
    its first write or copy. Returns the engine's weights."""
    weights = torch.zeros(N, device="cuda")
    bucket = torch.zeros(N, device="cuda")
    torch.cuda.synchronize()
    if slow_side == "trainer":
        torch.cuda._sleep(SLEEP_CYCLES)
    bucket.fill_(1.0)
    handoff = _StreamHandoff.from_trainer([bucket]) if ordered else None

    def copy():
        if slow_side == "engine":
            torch.cuda._sleep(SLEEP_CYCLES)
        weights.copy_(bucket)

    def engine_thread():
        torch.cuda.set_stream(torch.cuda.Stream())  # as vLLM gives its engine thread
        if ordered:
            handoff.on_engine(copy)
        else:
            copy()

    thread = threading.Thread(target=engine_thread)
    thread.start()
    thread.join()
    if ordered:
        handoff.back_on_trainer()
    bucket.fill_(2.0)
    torch.cuda.synchronize()
    return weights.cpu()


@pytest.mark.gpu
@pytest.mark.parametrize("slow_side", ["trainer", "engine"])
def test_engine_copies_what_the_trainer_wrote_and_nothing_later(slow_side):
    got = _hand_off(ordered=True, slow_side=slow_side)
    assert bool((got == 1.0).all()), f"engine weights hold {got.unique().tolist()}, not the bucket's 1.0"
    # The control: without the events the delayed side loses the race, so the test can fail.
    stale = _hand_off(ordered=False, slow_side=slow_side)
    want_stale = 0.0 if slow_side == "trainer" else 2.0
    assert bool((stale == want_stale).any()), (
        f"unordered hand-off with a slow {slow_side} still copied {stale.unique().tolist()}: "
        "the delay did not expose the race, so this test cannot tell ordered from unordered"
    )


@pytest.mark.gpu
def test_vllm_engine_takes_weights_written_late_on_the_trainers_stream():
    pytest.importorskip("vllm", reason="vllm is not installed (the GPU image has none; pip install vllm)")
    from cir.engines.vllm import VLLMEngine
    from cir.models import tiny_causal_lm
    from cir.tasks.demo import demo_tokenizer

    tokenizer = demo_tokenizer()
    model = tiny_causal_lm(tokenizer, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, seed=0)
    engine = VLLMEngine.from_model(model, tokenizer, dtype="float32", gpu_memory_utilization=0.2)
    try:
        name = "model.embed_tokens.weight"
        new = model.state_dict()[name].to("cuda") + 1.0
        torch.cuda.synchronize()
        torch.cuda._sleep(SLEEP_CYCLES)  # the trainer's stream is late to write the bucket
        bucket = new * 1.0
        engine.load_weights([(name, bucket)])
        bucket.fill_(-1.0)  # the trainer reuses the bucket as soon as load_weights returns
        (got,) = engine._call(
            lambda: engine._llm.apply_model(lambda m: m.model.embed_tokens.weight.detach().float().cpu())
        )
        torch.testing.assert_close(got[: new.shape[0]], new.cpu(), rtol=0, atol=0)
    finally:
        engine.close()


def test_cpu_tensors_need_no_ordering():
    handoff = _StreamHandoff.from_trainer([torch.zeros(3), torch.ones(2)])
    assert handoff.on_engine(lambda: "copied") == "copied"
    handoff.back_on_trainer()  # nothing recorded, nothing to wait on
    assert handoff._ready == {} and handoff._done == {}
