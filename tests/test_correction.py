"""The sampler/trainer mismatch metrics and importance-sampling corrections, against hand values."""

import math

import pytest
import torch

from cir.algorithms.correction import importance_weights, mismatch_metrics
from cir.kernels.policy_loss_ref import policy_loss_reference

# Two sequences of 3 tokens; token 2 of each is interpreter feedback (mask 0).
MASK = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
CU = torch.tensor([0, 3, 6])


def test_token_tis_truncates_each_ratio_at_the_cap():
    sampler = torch.zeros(6)
    old = torch.tensor([0.0, math.log(3.0), 5.0, -math.log(2.0), math.log(1.5), -9.0])
    w = importance_weights(old, sampler, MASK, CU, mode="token_tis", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, 0.0, 0.5, 1.5, 0.0]), rtol=0, atol=1e-6)


def test_seq_mis_masks_sequences_whose_mean_ratio_is_beyond_the_cap():
    sampler = torch.zeros(6)
    # Sequence 0: mean log-ratio over its model tokens (0.2 + 0.4) / 2 = 0.3 < log 2: kept.
    # Sequence 1: (1.0 + 0.6) / 2 = 0.8 > log 2: dropped. Feedback tokens count for nothing.
    old = torch.tensor([0.2, 0.4, 50.0, 1.0, 0.6, -50.0])
    w = importance_weights(old, sampler, MASK, CU, mode="seq_mis", cap=2.0)
    assert w.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert importance_weights(-old, sampler, MASK, CU, mode="seq_mis", cap=2.0).tolist() == w.tolist()


def test_none_and_bad_settings():
    x = torch.zeros(6)
    assert importance_weights(x, x, MASK, CU, mode="none", cap=2.0) is None
    with pytest.raises(ValueError, match="cap must be > 1"):
        importance_weights(x, x, MASK, CU, mode="token_tis", cap=1.0)
    with pytest.raises(ValueError, match="unknown rollout correction 'tis'"):
        importance_weights(x, x, MASK, CU, mode="tis", cap=2.0)


def test_mismatch_metrics_by_hand():
    trainer = torch.tensor([-1.0, -2.0, -7.0, -0.5, -1.2, -3.0])
    sampler = torch.tensor([-1.1, -1.7, -1.0, -0.5, -1.0, -9.0])
    m = mismatch_metrics(trainer, sampler, MASK)
    diffs = [0.1, -0.3, 0.0, -0.2]
    assert float(m["logprob_diff_sampler"]) == pytest.approx(sum(abs(d) for d in diffs) / 4, abs=1e-6)
    assert float(m["logprob_diff_sampler_max"]) == pytest.approx(0.3, abs=1e-6)
    assert float(m["sampler_kl"]) == pytest.approx(sum(math.expm1(d) - d for d in diffs) / 4, rel=1e-5)
    assert float(m["sampler_kl"]) > 0
    none = mismatch_metrics(trainer, sampler, torch.zeros(6))
    assert all(float(v) == 0.0 for v in none.values())


def test_weighted_advantages_weight_each_tokens_loss():
    """The clipped surrogate is positively homogeneous in the advantage, so per-token weights on
    the advantages are per-token weights on the loss: sum-aggregated losses agree."""
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(6, dtype=torch.float64, generator=g)
    old = lp + (torch.rand(6, dtype=torch.float64, generator=g) - 0.5) * 0.6
    adv = torch.tensor([1.5, -0.7], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 0.0, 0.5, 1.5, 0.0], dtype=torch.float64)
    per_token = torch.repeat_interleave(adv, CU[1:] - CU[:-1])
    kwargs = dict(clip_low=0.2, clip_high=0.28, dual_clip=None, aggregation="seq-mean-token-sum", cu_seqlens=CU)
    weighted, _ = policy_loss_reference(lp, old, per_token * w, MASK.double(), **kwargs)
    singles = [
        policy_loss_reference(lp, old, per_token * (torch.arange(6) == t), MASK.double(), **kwargs)[0] * w[t]
        for t in range(6)
    ]
    torch.testing.assert_close(weighted, sum(singles), rtol=1e-12, atol=1e-12)


def _update_once(correction: str, sampler_shift: float):
    """One actor update of a tiny model on fixed trajectories whose sampler log-probs are the
    trainer's own, shifted by `sampler_shift`; returns (metrics, new weights)."""
    from cir.algorithms import AlgoConfig
    from cir.models import tiny_causal_lm
    from cir.tokenization import byte_tokenizer
    from cir.training.actor import Actor
    from cir.training.batch import build_train_batch
    from cir.training.logprobs import token_logprobs
    from cir.training.optim import OptimConfig
    from cir.trajectory import Trajectory

    tok = byte_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=0)
    g = torch.Generator().manual_seed(1)
    trajs = []
    for i in range(4):
        t = Trajectory(prompt_ids=torch.randint(3, 200, (5,), generator=g).tolist(), problem_id=str(i), group=i // 2)
        t.append(torch.randint(3, 200, (6,), generator=g).tolist(), [0.0] * 6, trainable=True)
        trajs.append(t)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])

    def train_batch():
        return build_train_batch(
            trajs,
            adv,
            pad_id=tok.pad_token_id,
            device="cpu",
            mini_batches=1,
            micro_batch_tokens=4096,
            temperature=1.0,
            max_response_tokens=16,
        )

    with torch.no_grad():
        (mb,) = train_batch().micro_batches
        own = token_logprobs(model, mb, temperature=1.0, with_entropy=False)[0]
    for k, t in enumerate(trajs):  # the engine's log-probs, as the rollout would have recorded them
        t.sampler_logprobs[:] = (own[6 * k : 6 * (k + 1)] + sampler_shift).tolist()
    algo = AlgoConfig(rollout_correction=correction, rollout_correction_cap=2.0)
    actor = Actor(model, tok, OptimConfig(lr=1e-2), algo, total_optimizer_steps=1)
    metrics = actor.update(train_batch())
    return metrics, {k: v.clone() for k, v in model.state_dict().items()}


def test_the_actor_applies_the_correction():
    plain, w_plain = _update_once("none", 0.0)
    same, w_same = _update_once("token_tis", 0.0)
    # No mismatch: every weight is 1, the update is the uncorrected one.
    assert same["actor/rollout_correction_weight"] == pytest.approx(1.0, abs=1e-6)
    assert plain["actor/logprob_diff_sampler"] < 1e-6 and plain["actor/sampler_kl"] < 1e-9
    for k in w_plain:
        torch.testing.assert_close(w_same[k], w_plain[k], rtol=0, atol=1e-7)
    # The sampler thought every token 3x less likely than the trainer does: ratios of 3 are
    # truncated at 2, so the update is twice the uncorrected one (the same direction).
    shifted, w_shifted = _update_once("token_tis", -math.log(3.0))
    assert shifted["actor/rollout_correction_weight"] == pytest.approx(2.0, rel=1e-5)
    assert shifted["actor/logprob_diff_sampler_max"] == pytest.approx(math.log(3.0), rel=1e-5)
    assert shifted["actor/grad_norm"] == pytest.approx(2 * plain["actor/grad_norm"], rel=1e-4)
    dropped, w_dropped = _update_once("seq_mis", -math.log(3.0))
    assert dropped["actor/rollout_correction_weight"] == 0.0
    assert dropped["actor/grad_norm"] == 0.0
