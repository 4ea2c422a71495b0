"""Loss aggregation across micro-batches and ranks (`cir.algorithms.micro_batch_weight`) and the
policy-loss registry (fused entry point against its plain reference)."""

import pytest
import torch

from cir.algorithms import compute_policy_loss, get_policy_loss, micro_batch_weight, policy_loss_names
from cir.kernels.policy_loss_ref import AGGREGATIONS

MAX_LEN = 12


def _sequences(seed: int, count: int = 10):
    """Per-sequence float64 tensors (logprob, old, advantage, mask) of random lengths; every
    sequence has at least one trained token (feedback tokens are masked 0)."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(count):
        n = int(torch.randint(2, MAX_LEN + 1, (1,), generator=g))
        lp = -torch.rand(n, dtype=torch.float64, generator=g) * 3
        old = lp + (torch.rand(n, dtype=torch.float64, generator=g) - 0.5) * 0.8
        mask = (torch.rand(n, generator=g) > 0.3).double()
        mask[0] = 1.0
        adv = torch.randn((), dtype=torch.float64, generator=g)
        seqs.append((lp, old, adv, mask))
    return seqs


def _loss(seqs, aggregation, requires_grad_of=None):
    lp = torch.cat([s[0] for s in seqs])
    if requires_grad_of is not None:
        lp = requires_grad_of
    old = torch.cat([s[1] for s in seqs])
    mask = torch.cat([s[3] for s in seqs])
    adv = torch.stack([s[2] for s in seqs])
    cu = torch.tensor([0] + [len(s[0]) for s in seqs]).cumsum(0)
    loss, _ = compute_policy_loss(
        "ppo_clip",
        lp,
        old,
        adv,
        mask,
        clip_low=0.2,
        clip_high=0.28,
        aggregation=aggregation,
        cu_seqlens=cu,
        max_seq_len_norm=MAX_LEN,
        impl="reference",
    )
    return loss


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_weighted_micro_batch_losses_add_up_to_the_batch_loss(aggregation):
    seqs = _sequences(seed=3)
    whole = _loss(seqs, aggregation)
    plans = [[seqs[:3], seqs[3:4], seqs[4:]], [seqs[i : i + 2] for i in range(0, len(seqs), 2)]]
    total_tokens = int(sum(s[3].sum() for s in seqs))
    for plan in plans:
        summed = sum(
            micro_batch_weight(
                aggregation,
                tokens=int(sum(s[3].sum() for s in mb)),
                seqs=len(mb),
                total_tokens=total_tokens,
                total_seqs=len(seqs),
            )
            * _loss(mb, aggregation)
            for mb in plan
        )
        torch.testing.assert_close(summed, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_ranks_averaging_weighted_losses_give_the_global_loss_and_gradient(aggregation):
    """Two ranks, each summing its micro-batches' weighted losses; data parallelism averages
    over ranks. That average must be the loss (and gradient) of the global batch."""
    seqs = _sequences(seed=5, count=9)
    world = 2
    shards = [seqs[:4], seqs[4:]]
    total_tokens = int(sum(s[3].sum() for s in seqs))
    lp_all = torch.cat([s[0] for s in seqs]).clone().requires_grad_(True)
    whole = _loss(seqs, aggregation, requires_grad_of=lp_all)
    (want,) = torch.autograd.grad(whole, lp_all)

    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + len(s[0]))
    lp_leaf = torch.cat([s[0] for s in seqs]).clone().requires_grad_(True)
    per_rank = []
    start = 0
    for shard in shards:
        rank_loss = 0.0
        for mb in (shard[:2], shard[2:]):
            n = sum(len(s[0]) for s in mb)
            w = micro_batch_weight(
                aggregation,
                tokens=int(sum(s[3].sum() for s in mb)),
                seqs=len(mb),
                total_tokens=total_tokens,
                total_seqs=len(seqs),
                world_size=world,
            )
            rank_loss = rank_loss + w * _loss(mb, aggregation, requires_grad_of=lp_leaf[start : start + n])
            start += n
        per_rank.append(rank_loss)
    averaged = sum(per_rank) / world
    torch.testing.assert_close(averaged, whole, rtol=1e-12, atol=1e-12)
    (got,) = torch.autograd.grad(averaged, lp_leaf)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.isnan(got).any()


def test_weight_rejects_an_unknown_aggregation():
    with pytest.raises(ValueError, match="unknown loss aggregation 'token-sum'"):
        micro_batch_weight("token-sum", tokens=1, seqs=1, total_tokens=1, total_seqs=1)


def test_registry_fused_path_matches_its_reference():
    assert "ppo_clip" in policy_loss_names()
    entry = get_policy_loss("ppo_clip")
    g = torch.Generator().manual_seed(11)
    lp = -torch.rand(4, 10, generator=g) * 2
    old = lp + (torch.rand(4, 10, generator=g) - 0.5)
    mask = (torch.rand(4, 10, generator=g) > 0.2).float()
    adv = torch.randn(4, 10, generator=g)
    kwargs = dict(clip_low=0.2, clip_high=0.28, aggregation="token-mean")
    ref, _ = entry.reference(lp, old, adv, mask, **kwargs)
    fused, _ = compute_policy_loss("ppo_clip", lp, old, adv, mask, impl="torch", **kwargs)
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-7)
    with pytest.raises(KeyError, match="unknown policy loss 'nope'"):
        get_policy_loss("nope")
