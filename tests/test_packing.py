"""Packed (padding-free) micro-batches: one row per micro-batch, position ids restarting at each
sequence, `transformers`' packed-sequence masking in place of an attention mask.

Packed and padded forwards of a tiny random Qwen2 give the same log-probs, entropies and
gradients; no token attends across a sequence boundary; the planner keeps its budget and covers
every trajectory once; the actor logs the padding share of its forwards."""

import random

import pytest
import torch
from conftest import assert_metrics_match
from transformers import Qwen2Config, Qwen2ForCausalLM

from cir.algorithms import AlgoConfig
from cir.training.actor import Actor
from cir.training.batch import build_train_batch, collate, plan_micro_batches, plan_packed_micro_batches
from cir.training.logprobs import ResponseLogprobs
from cir.training.optim import OptimConfig
from cir.trajectory import Trajectory

VOCAB = 96


def _tiny_qwen2(dtype=torch.float64, attn="sdpa", seed=0):
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        use_sliding_window=False,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.to(dtype).eval()


def _trajectories(lengths, seed):
    """One trajectory per (prompt, response) length pair, random tokens, feedback tokens (loss
    mask 0) in the middle of responses longer than 4."""
    g = torch.Generator().manual_seed(seed)
    trajs = []
    for i, (p, r) in enumerate(lengths):
        t = Trajectory(prompt_ids=torch.randint(3, VOCAB, (p,), generator=g).tolist(), problem_id=str(i), group=i)
        tokens = torch.randint(3, VOCAB, (r,), generator=g).tolist()
        if r > 4:
            t.append(tokens[:2], None, trainable=True)
            t.append(tokens[2:4], None, trainable=False)
            t.append(tokens[4:], None, trainable=True)
        else:
            t.append(tokens, None, trainable=True)
        t.sampler_logprobs[:] = (-torch.rand(r, generator=g, dtype=torch.float64)).tolist()
        trajs.append(t)
    return trajs


def _random_lengths(seed, count):
    rng = random.Random(seed)
    # Short and long mixed, a one-token prompt and a one-token response among them.
    lengths = [(rng.randint(1, 12), rng.randint(1, 40)) for _ in range(count)]
    lengths[0] = (1, rng.randint(1, 40))
    lengths[-1] = (rng.randint(1, 12), 1)
    return lengths


def _forward(model, mb, weights=None):
    """Log-probs and entropies of `mb`; with `weights`, also the gradients of a loss that mixes
    both (every parameter's, by name)."""
    policy = ResponseLogprobs(model)
    model.zero_grad(set_to_none=True)
    logprob, entropy = policy.of(mb, temperature=0.7, with_entropy=True, impl="torch")
    grads = None
    if weights is not None:
        ((logprob * weights[0]).sum() + (entropy * weights[1]).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logprob.detach(), entropy.detach(), grads


@pytest.fixture(scope="module")
def model64():
    return _tiny_qwen2(torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_packed_and_padded_forward_give_the_same_logprobs_and_gradients(model64, seed):
    lengths = _random_lengths(seed, count=3 + seed)
    trajs = _trajectories(lengths, seed)
    index = list(range(len(trajs)))
    advantages = torch.zeros(len(trajs))
    padded = collate(trajs, index, advantages, pad_id=0, device="cpu")
    packed = collate(trajs, index, advantages, pad_id=0, device="cpu", packed=True)
    assert packed.input_ids.shape == (1, sum(p + r for p, r in lengths)) and packed.attention_mask is None
    n = sum(r for _, r in lengths)
    g = torch.Generator().manual_seed(100 + seed)
    weights = torch.randn(2, n, generator=g, dtype=torch.float64)

    lp_pad, ent_pad, grad_pad = _forward(model64, padded, weights)
    lp_pack, ent_pack, grad_pack = _forward(model64, packed, weights)
    for t in (lp_pad, ent_pad, lp_pack, ent_pack):
        assert t.dtype == torch.float64 and t.shape == (n,) and not t.isnan().any()
    # float64 throughout (sdpa's math is the same per row; only the masked-out terms differ):
    # equal to within a few ulps of the values.
    torch.testing.assert_close(lp_pack, lp_pad, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent_pack, ent_pad, rtol=0, atol=1e-12)
    assert grad_pad.keys() == grad_pack.keys()
    for name in grad_pad:
        assert not grad_pack[name].isnan().any(), name
        torch.testing.assert_close(grad_pack[name], grad_pad[name], rtol=0, atol=1e-11, msg=name)
    assert any(g.abs().max() > 1e-3 for g in grad_pad.values()), "vanishing gradients would make this vacuous"


def test_packed_and_padded_agree_with_eager_attention_in_float32():
    """The eager path (an additive mask, softmax in float32) reads the packed position ids too."""
    model = _tiny_qwen2(torch.float32, attn="eager", seed=1)
    trajs = _trajectories(_random_lengths(7, count=5), seed=7)
    index = list(range(len(trajs)))
    padded = collate(trajs, index, torch.zeros(5), pad_id=0, device="cpu")
    packed = collate(trajs, index, torch.zeros(5), pad_id=0, device="cpu", packed=True)
    with torch.no_grad():
        lp_pad, ent_pad, _ = _forward(model, padded)
        lp_pack, ent_pack, _ = _forward(model, packed)
    assert not lp_pack.isnan().any() and not ent_pack.isnan().any()
    # float32 softmax over rows of different widths: rounding-level differences only.
    torch.testing.assert_close(lp_pack, lp_pad, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_pack, ent_pad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_token_attends_across_a_sequence_boundary(dtype):
    model = _tiny_qwen2(dtype, seed=2)
    lengths = [(4, 9), (6, 7), (3, 11)]
    trajs = _trajectories(lengths, seed=11)
    index = [0, 1, 2]
    cu = torch.tensor([0] + [r for _, r in lengths]).cumsum(0)

    def logprobs(ts):
        mb = collate(ts, index, torch.zeros(3), pad_id=0, device="cpu", packed=True)
        with torch.no_grad():
            return _forward(model, mb)[:2]

    base_lp, base_ent = logprobs(trajs)
    for changed in range(3):
        other = _trajectories(lengths, seed=11)
        # Another prompt and response of the same length for sequence `changed` only.
        other[changed] = _trajectories(lengths, seed=12)[changed]
        lp, ent = logprobs(other)
        own = slice(int(cu[changed]), int(cu[changed + 1]))
        assert not torch.equal(lp[own], base_lp[own]), "the changed sequence's own log-probs must change"
        for k in range(3):
            if k != changed:
                rows = slice(int(cu[k]), int(cu[k + 1]))
                # Bit-identical: nothing of the changed sequence reaches the others.
                assert torch.equal(lp[rows], base_lp[rows]), (changed, k)
                assert torch.equal(ent[rows], base_ent[rows]), (changed, k)


def test_packed_layout_points_each_response_token_at_the_row_that_predicts_it():
    trajs = _trajectories([(3, 5), (1, 1), (7, 2)], seed=3)
    packed = collate(trajs, [0, 1, 2], torch.tensor([1.0, 2.0, 3.0]), pad_id=0, device="cpu", packed=True)
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8]]
    row = packed.input_ids.view(-1)
    # The hidden state at row j predicts the token at row j + 1 of the same sequence.
    assert torch.equal(row[packed.hidden_index + 1], packed.targets)
    assert packed.cu_seqlens.tolist() == [0, 5, 6, 8]
    assert packed.num_padding_slots == 0 and packed.num_input_slots == 19
    padded = collate(trajs, [0, 1, 2], torch.tensor([1.0, 2.0, 3.0]), pad_id=0, device="cpu")
    for field in ("targets", "loss_mask", "cu_seqlens", "advantages", "sampler_logprobs"):
        assert torch.equal(getattr(packed, field), getattr(padded, field)), field
    assert padded.position_ids is None
    assert torch.equal(padded.input_ids.view(-1)[padded.hidden_index + 1], padded.targets)
    assert padded.num_input_slots == 3 * 9 and padded.num_padding_slots == 27 - 19


@pytest.mark.parametrize("seed", range(6))
def test_planners_keep_the_budget_and_cover_every_trajectory_once(seed):
    rng = random.Random(seed)
    budget = rng.choice([64, 100, 256])
    lengths = [rng.randint(1, 150) for _ in range(rng.randint(1, 60))]
    packed = plan_packed_micro_batches(lengths, budget)
    padded = plan_micro_batches(lengths, budget)
    for plan in (packed, padded):
        assert sorted(i for group in plan for i in group) == list(range(len(lengths)))
        assert all(group for group in plan)
    for group in packed:
        assert group == sorted(group)
        total = sum(lengths[i] for i in group)
        # Within the budget, or one trajectory longer than the budget alone.
        assert total <= budget or len(group) == 1, (group, total)
    for group in padded:
        assert len(group) * max(lengths[i] for i in group) <= budget or len(group) == 1
    # No two packed groups could be merged: first-fit leaves no pair that fits together.
    sums = sorted(sum(lengths[i] for i in g) for g in packed)
    assert len(sums) < 2 or sums[0] + sums[1] > budget
    assert plan_packed_micro_batches(lengths, budget) == packed  # deterministic


def _actor_update(trajs, advantages, *, packing, budget):
    model = _tiny_qwen2(torch.float64, seed=4)
    optim = OptimConfig(lr=1e-2, micro_batch_tokens=budget, packing=packing)
    actor = Actor(model, None, optim, AlgoConfig(), total_optimizer_steps=1)
    batch = build_train_batch(
        trajs,
        advantages,
        pad_id=0,
        device="cpu",
        mini_batches=1,
        micro_batch_tokens=budget,
        temperature=1.0,
        max_response_tokens=40,
        packing=packing,
    )
    metrics = actor.update(batch)
    return batch, metrics, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_actor_logs_the_padding_share_and_updates_alike_in_both_layouts():
    lengths = _random_lengths(5, count=9)
    trajs = _trajectories(lengths, seed=5)
    advantages = torch.linspace(-1.0, 1.0, len(trajs))
    budget = 96
    batch_pad, m_pad, w_pad = _actor_update(trajs, advantages, packing=False, budget=budget)
    batch_pack, m_pack, w_pack = _actor_update(trajs, advantages, packing=True, budget=budget)

    # By hand: each padded micro-batch has count x longest slots, of which sum(lengths) hold tokens.
    seq_len = [p + r for p, r in lengths]
    slots = padding = 0
    for group in plan_micro_batches(seq_len, budget):
        width = max(seq_len[i] for i in group)
        slots += len(group) * width
        padding += sum(width - seq_len[i] for i in group)
    assert len(batch_pad.micro_batches) > 1 and padding > 0
    assert m_pad["actor/padding_share"] == pytest.approx(padding / slots, rel=1e-12)
    assert m_pack["actor/padding_share"] == 0.0
    assert all(mb.input_ids.shape[0] == 1 for mb in batch_pack.micro_batches)
    assert all(mb.input_ids.numel() <= budget for mb in batch_pack.micro_batches)

    assert m_pad["actor/grad_norm"] > 0
    for key in ("actor/grad_norm", "actor/entropy", "actor/clip_fraction"):
        if key in m_pad:
            assert m_pack[key] == pytest.approx(m_pad[key], rel=1e-9, abs=1e-12), key
    for name in w_pad:
        torch.testing.assert_close(w_pack[name], w_pad[name], rtol=0, atol=1e-12, msg=name)


def test_packing_is_a_checked_option():
    from cir.config_loader import ConfigError
    from cir.training.config import load_train_config

    assert load_train_config(None).optim.packing is False
    assert load_train_config(None, ["optim.packing=true"]).optim.packing is True
    with pytest.raises(ConfigError, match=r"optim\.packing"):
        load_train_config(None, ["optim.packing=3"])
    flash = ["model.attn_implementation=flash_attention_2", "optim.packing=true"]
    assert load_train_config("paper", [*flash, "run.engine=vllm"]).model.attn_implementation == "flash_attention_2"
    with pytest.raises(ConfigError, match="run.engine=hf"):
        load_train_config("paper", [*flash, "run.engine=hf"])


@pytest.mark.gpu
def test_packed_rows_use_flash_attention_varlen_on_gpu():
    """With flash-attn installed (`pip install 'cir[flash]'`), `flash_attention_2` runs the
    packed row through the varlen kernel: the same log-probs as the padded sdpa forward (bf16)."""
    pytest.importorskip("flash_attn")
    trajs = _trajectories(_random_lengths(9, count=6), seed=9)
    index = list(range(len(trajs)))
    padded = collate(trajs, index, torch.zeros(6), pad_id=0, device="cuda")
    packed = collate(trajs, index, torch.zeros(6), pad_id=0, device="cuda", packed=True)
    model = _tiny_qwen2(torch.bfloat16, attn="sdpa", seed=3).cuda()
    with torch.no_grad():
        ref, _, _ = _forward(model, padded)
        model.set_attn_implementation("flash_attention_2")
        lp, _, _ = _forward(model, packed)
    assert not lp.isnan().any()
    torch.testing.assert_close(lp.float(), ref.float(), rtol=0, atol=5e-2)


# Run by `torchrun --nproc_per_node=2`: rank 0 first computes the single-process reference (the
# padded layout on the whole batch); then both ranks train a sharded actor on their shard, packed
# and padded (FSDP over both ranks), and padded on a [2 replicas x 1 shard] mesh (HSDP), from the
# same initial weights. Rank 0 writes what the test compares.
_TWO_RANKS = r"""
import json, sys
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from cir.algorithms import AlgoConfig
from cir.distributed import DistributedContext, init_distributed
from cir.training.actor import Actor
from cir.training.batch import build_train_batch
from cir.training.optim import OptimConfig, ShardingConfig
from cir.trajectory import Trajectory

torch.set_num_threads(1)
lengths, budget, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist = init_distributed(timeout_s=120)

def model():
    config = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).double().eval()

g = torch.Generator().manual_seed(0)
trajs = []
for i, (p, r) in enumerate(lengths):
    t = Trajectory(prompt_ids=torch.randint(3, 96, (p,), generator=g).tolist(), problem_id=str(i), group=i)
    t.append(torch.randint(3, 96, (r,), generator=g).tolist(), None, trainable=True)
    trajs.append(t)
advantages = torch.linspace(-1.0, 1.0, len(trajs))

def update(trajs, advantages, packing, context, replicate=1):
    m = model()
    actor = Actor(m, None, OptimConfig(lr=1e-2, micro_batch_tokens=budget, packing=packing), AlgoConfig(),
                  total_optimizer_steps=1, dist=context, sharding=ShardingConfig(replicate=replicate))
    assert actor.sharded == (context.world_size > 1)
    if replicate > 1:  # HSDP: each parameter replicated over the first mesh dimension, sharded over the second
        placements = next(actor.policy.parameters()).placements
        assert [type(p).__name__ for p in placements] == ["Replicate", "Shard"], placements
    batch = build_train_batch(trajs, advantages, pad_id=0, device="cpu", mini_batches=1, micro_batch_tokens=budget,
                              temperature=1.0, max_response_tokens=64, packing=packing)
    metrics = actor.update(batch)
    weights = {k: v.detach().clone() for bucket in actor.iter_weights() for k, v in bucket}
    return metrics, weights

result = {}
if dist.is_main:
    ref_metrics, ref_weights = update(trajs, advantages, False, DistributedContext())
    result["reference"] = ref_metrics
start, end = dist.shard_bounds(len(trajs))
for name, packing, replicate in (("packed", True, 1), ("padded", False, 1), ("hsdp", False, 2)):
    metrics, weights = update(trajs[start:end], advantages[start:end], packing, dist, replicate)
    if dist.is_main:
        diff = max(float((weights[k] - ref_weights[k]).abs().max()) for k in ref_weights)
        result[name] = {**metrics, "weight_diff": diff}
if dist.is_main:
    with open(out, "w") as f:
        json.dump(result, f)
# Both ranks done before either tears the group down (a rank leaving while the other is still in a
# collective aborts the process).
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_ranks_packed_equal_one_process_padded(tmp_path):
    """Two ranks, packed or padded, sharded as FSDP or HSDP: one process's update of the whole batch."""
    import json
    import subprocess
    import sys

    from cir.distributed import DistributedContext

    rng = random.Random(21)
    lengths = [(rng.randint(1, 10), rng.randint(1, 30)) for _ in range(11)]  # rank 0: 6, rank 1: 5
    budget = 64
    script, out = tmp_path / "two_ranks.py", tmp_path / "result.json"
    script.write_text(_TWO_RANKS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(
        [*cmd, json.dumps(lengths), str(budget), str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    ref = result["reference"]
    assert ref["actor/grad_norm"] > 0
    for layout in ("packed", "padded", "hsdp"):
        got = result[layout]
        assert_metrics_match(got, ref, ["actor/grad_norm"], rel=1e-9, where=layout)
        assert_metrics_match(got, ref, ["actor/loss"], rel=1e-9, abs=1e-12, where=layout)
        assert got["weight_diff"] < 1e-12, layout
    assert result["packed"]["actor/padding_share"] == 0.0
    # Padded on two ranks: each rank plans its own shard; the share is of the slots of both.
    seq_len = [p + r for p, r in lengths]
    slots = padding = 0
    for rank in range(2):
        shard = DistributedContext(rank=rank, world_size=2).shard(seq_len)
        for group in plan_micro_batches(shard, budget):
            width = max(shard[i] for i in group)
            slots += len(group) * width
            padding += sum(width - shard[i] for i in group)
    assert padding > 0
    assert result["padded"]["actor/padding_share"] == pytest.approx(padding / slots, rel=1e-12)
