"""The masked policy-gradient loss: Triton kernels (interpreter on CPU) vs the float64 reference.

Tolerances: the kernel computes in fp32 on fp32 inputs; the reference computes in float64 on
the same values. Loss and metrics: rtol 1e-4, atol 1e-6. Per-token gradients: rtol 1e-4 plus
atol 1e-6 x max|grad| (the gradients of a mean are ~1/N, so a scale-relative floor).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from cir.kernels import policy_loss
from cir.kernels.policy_loss_ref import AGGREGATIONS, LOG_RATIO_CLAMP, policy_loss_reference

# `cir.kernels.policy_loss` the attribute is the function; the module is reached through importlib.
pl = importlib.import_module("cir.kernels.policy_loss")

LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-6
GRAD_RTOL, GRAD_ATOL_REL = 1e-4, 1e-6


# ---------------------------------------------------------------------------- input builders


def make_mask(kind: str, B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Loss masks shaped like the ones the rollout produces."""
    if kind == "random":
        return torch.rand(B, T, generator=gen) > 0.3
    mask = torch.ones(B, T, dtype=torch.bool)
    if kind == "feedback":
        # Prompt prefix, then response with interior runs of interpreter output, then padding.
        for b in range(B):
            prompt = int(torch.randint(1, T // 5, (1,), generator=gen))
            end = int(torch.randint(T // 2, T + 1, (1,), generator=gen))
            mask[b, :prompt] = False
            mask[b, end:] = False
            for _ in range(3):
                s = int(torch.randint(prompt, max(prompt + 1, end - 10), (1,), generator=gen))
                mask[b, s : s + int(torch.randint(3, 60, (1,), generator=gen))] = False
        return mask
    if kind == "empty_rows":
        mask = torch.rand(B, T, generator=gen) > 0.3
        mask[1] = False
        mask[-1] = False
        return mask
    raise ValueError(kind)


def away_from_clip_edges(
    lp: torch.Tensor, old: torch.Tensor, edges=(0.8, 1.28, 3.0), rel: float = 1e-4
) -> torch.Tensor:
    """Nudge `old` so that no ratio lies within `rel` of a clip edge of the default settings.

    The gradient jumps at the edges (-A r on one side, 0 on the other), so a token whose fp32
    ratio (GPU exp is approximate) and float64 ratio fall on different sides would fail a
    gradient comparison without anything being wrong.
    """
    ratio = (lp.double() - old.double()).exp()
    near = torch.zeros_like(ratio, dtype=torch.bool)
    for edge in edges:
        near |= (ratio / edge - 1).abs() < rel
    return torch.where(near, old - 1e-3, old)


def make_inputs(B: int, T: int, *, seed: int, mask: str = "random", spread: float = 0.3, per_seq_adv: bool = False):
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=gen) * 3.0
    old = away_from_clip_edges(lp, lp + torch.randn(B, T, generator=gen) * spread)
    ref = lp + torch.randn(B, T, generator=gen) * spread
    adv = torch.randn(B, generator=gen) if per_seq_adv else torch.randn(B, T, generator=gen)
    ent = torch.rand(B, T, generator=gen) * 2.0
    return dict(
        logprob=lp, old_logprob=old, advantages=adv, loss_mask=make_mask(mask, B, T, gen), ref_logprob=ref, entropy=ent
    )


def run(inputs: dict, impl: str, dtype: torch.dtype = torch.float32, **kw):
    """Loss, metrics and gradients (logprob, entropy) of one implementation on fresh leaf copies."""
    x = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    lp = x["logprob"].clone().requires_grad_(True)
    ent = x["entropy"].clone().requires_grad_(True) if "entropy" in x else None
    args = dict(x, logprob=lp, entropy=ent)
    if "ref_logprob" in kw or "entropy" in kw:
        raise AssertionError("pass tensors through inputs")
    loss, metrics = policy_loss(**args, impl=impl, **kw)
    loss.backward()
    d_ent = None if ent is None else (ent.grad if ent.grad is not None else torch.zeros_like(ent))
    return loss.detach(), metrics, lp.grad, d_ent


def assert_close_grad(got: torch.Tensor, want: torch.Tensor, what: str):
    assert torch.isfinite(got).all(), f"{what}: non-finite gradient"
    got64, want64 = got.double(), want.double()
    atol = GRAD_ATOL_REL * float(want64.abs().max()) + 1e-12
    torch.testing.assert_close(got64, want64, rtol=GRAD_RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def compare_to_reference(inputs: dict, metric_atol: float = LOSS_ATOL, impl: str = "triton", **kw):
    """`impl` (Triton through the interpreter by default; fp32) vs reference (float64): loss,
    every metric, both gradients.

    `metric_atol` widens the absolute tolerance of the metrics for inputs whose per-token terms
    are huge and cancel (fp32 sums of +-1e4 values carry ~1e-3 absolute error).
    """
    loss, metrics, d_lp, d_ent = run(inputs, impl, **kw)
    ref_loss, ref_metrics, ref_d_lp, ref_d_ent = run(inputs, "reference", torch.float64, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert set(metrics) == set(ref_metrics)
    for name, value in ref_metrics.items():
        assert torch.isfinite(metrics[name]), name
        torch.testing.assert_close(
            metrics[name].double(), value, rtol=LOSS_RTOL, atol=metric_atol, msg=lambda m: f"metric {name}: {m}"
        )
    assert_close_grad(d_lp, ref_d_lp, "dlogprob")
    if d_ent is not None:
        assert_close_grad(d_ent, ref_d_ent, "dentropy")
    # The metrics decompose the loss.
    kl = metrics.get("kl_loss", torch.tensor(0.0))
    ent = metrics.get("entropy", torch.tensor(0.0))
    recomposed = metrics["pg_loss"] + kw.get("kl_coef", 0.0) * kl - kw.get("entropy_coef", 0.0) * ent
    torch.testing.assert_close(recomposed, loss, rtol=1e-5, atol=1e-6)
    return loss, metrics, d_lp, d_ent


def without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


# ---------------------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("mask", ["random", "feedback", "empty_rows"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_matches_float64_reference(aggregation, mask):
    # 1300 and 5 are not multiples of the 1024-token block nor of the power-of-two grid.
    seed = AGGREGATIONS.index(aggregation) * 10 + ["random", "feedback", "empty_rows"].index(mask)
    inputs = without(make_inputs(5, 1300, seed=seed, mask=mask, spread=0.5), "ref_logprob", "entropy")
    loss, metrics, d_lp, _ = compare_to_reference(inputs, aggregation=aggregation)
    assert set(metrics) == {
        "pg_loss",
        "clipfrac_upper",
        "clipfrac_lower",
        "clipfrac_dual",
        "approx_kl",
        "ratio_mean",
        "ratio_max",
    }
    # Masked tokens get exactly zero gradient; trained tokens are not all zero.
    assert (d_lp[~inputs["loss_mask"]] == 0).all()
    assert (d_lp[inputs["loss_mask"]] != 0).any()
    # The random spread produces every clipping regime, so the metrics are exercised.
    assert metrics["clipfrac_upper"] > 0 and metrics["clipfrac_lower"] > 0 and metrics["clipfrac_dual"] > 0


@pytest.mark.parametrize("dual_clip", [3.0, None])
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_kl_entropy_and_dual_clip(kl_type, dual_clip):
    inputs = make_inputs(4, 777, seed=7 + len(kl_type) + (dual_clip is None), mask="feedback", spread=0.8)
    loss, metrics, d_lp, d_ent = compare_to_reference(
        inputs,
        kl_type=kl_type,
        kl_coef=0.1,
        entropy_coef=0.01,
        dual_clip=dual_clip,
        aggregation="seq-mean-token-mean",
    )
    assert "kl_loss" in metrics and "entropy" in metrics
    assert metrics["kl_loss"] != 0
    if dual_clip is None:
        assert metrics["clipfrac_dual"] == 0
    else:
        assert metrics["clipfrac_dual"] > 0
    # dloss/dentropy = -entropy_coef * (aggregation weight): nonzero exactly on trained tokens.
    mask = inputs["loss_mask"]
    assert (d_ent[~mask] == 0).all() and (d_ent[mask] < 0).all()


def test_dual_clip_changes_the_loss():
    inputs = without(make_inputs(3, 500, seed=3, spread=1.5), "ref_logprob", "entropy")
    with_dual = run(inputs, "triton", dual_clip=3.0)[0]
    no_dual = run(inputs, "triton", dual_clip=None)[0]
    # The dual clip caps positive per-token losses of A < 0 tokens, so it can only lower the loss.
    assert with_dual < no_dual


def test_metrics_without_gradient_for_coefficient_zero():
    # ref_logprob / entropy given with zero coefficients: reported, but they do not change the loss.
    inputs = make_inputs(3, 300, seed=11)
    loss, metrics, _, d_ent = compare_to_reference(inputs)
    plain = run(without(inputs, "ref_logprob", "entropy"), "triton")[0]
    torch.testing.assert_close(loss, plain)
    assert metrics["kl_loss"] != 0 and metrics["entropy"] > 0
    assert (d_ent == 0).all()


def test_per_sequence_advantages_broadcast():
    inputs = without(make_inputs(4, 600, seed=5, per_seq_adv=True, mask="feedback"), "ref_logprob", "entropy")
    assert inputs["advantages"].shape == (4,)
    compare_to_reference(inputs, aggregation="token-mean")
    expanded = dict(inputs, advantages=inputs["advantages"][:, None].expand(4, 600).contiguous())
    a = run(inputs, "triton")
    b = run(expanded, "triton")
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(a[2], b[2], rtol=1e-6, atol=0)
    # [B, 1] is accepted too.
    c = run(dict(inputs, advantages=inputs["advantages"][:, None]), "triton")
    torch.testing.assert_close(a[0], c[0])


def test_bf16_inputs_give_bf16_gradients():
    inputs = without(make_inputs(3, 400, seed=13), "ref_logprob")
    loss, metrics, d_lp, d_ent = run(inputs, "triton", torch.bfloat16, entropy_coef=0.01)
    assert d_lp.dtype == torch.bfloat16 and d_ent.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    # The reference on the same (bf16-rounded) values in float64; only the output rounding differs.
    ref = run(inputs, "reference", torch.bfloat16, entropy_coef=0.01)
    rounded = {k: (v.to(torch.bfloat16).double() if v.is_floating_point() else v) for k, v in inputs.items()}
    ref64 = run(rounded, "reference", torch.float64, entropy_coef=0.01)
    torch.testing.assert_close(loss.double(), ref64[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(d_lp.double(), ref64[2], rtol=1e-2, atol=1e-2 * float(ref64[2].abs().max()))
    torch.testing.assert_close(ref[0].double(), ref64[0], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_all_masked_batch_gives_zero_loss_and_gradient(aggregation):
    inputs = make_inputs(3, 200, seed=17)
    inputs["loss_mask"] = torch.zeros(3, 200, dtype=torch.bool)
    # Garbage in masked positions must not leak (padding is often uninitialised).
    inputs["logprob"][0, :5] = float("nan")
    inputs["old_logprob"][1, :5] = float("inf")
    for impl in ("triton", "reference"):
        loss, metrics, d_lp, d_ent = run(
            inputs, impl, aggregation=aggregation, kl_coef=0.1, kl_type="k3", entropy_coef=0.01
        )
        assert loss == 0, impl
        assert all(v == 0 for v in metrics.values()), (impl, metrics)
        assert (d_lp == 0).all() and (d_ent == 0).all(), impl


def test_all_masked_rows_contribute_nothing():
    inputs = without(make_inputs(5, 300, seed=19, mask="empty_rows"), "ref_logprob", "entropy")
    keep = [0, 2, 3]  # rows 1 and 4 are fully masked
    inputs["logprob"][1] = float("nan")  # and hold garbage
    kept = {k: v[keep] for k, v in inputs.items()}
    for aggregation in AGGREGATIONS:
        full = run(inputs, "triton", aggregation=aggregation, max_seq_len_norm=300)
        part = run(kept, "triton", aggregation=aggregation, max_seq_len_norm=300)
        assert torch.isfinite(full[2]).all()
        assert (full[2][[1, 4]] == 0).all()
        if aggregation in ("token-mean", "seq-mean-token-mean"):
            # Empty rows are not counted at all.
            torch.testing.assert_close(full[0], part[0], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(full[2][keep], part[2], rtol=1e-5, atol=1e-9)
        else:
            # seq-mean-token-sum(-norm) divide by B, which counts the empty rows.
            torch.testing.assert_close(full[0], part[0] * 3 / 5, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(full[2][keep], part[2] * 3 / 5, rtol=1e-5, atol=1e-9)


def test_garbage_in_masked_positions_is_ignored():
    inputs = make_inputs(3, 400, seed=23, mask="feedback")
    masked = ~inputs["loss_mask"]
    dirty = {k: v.clone() for k, v in inputs.items()}
    for key, bad in (
        ("logprob", float("nan")),
        ("old_logprob", float("-inf")),
        ("ref_logprob", float("inf")),
        ("entropy", float("nan")),
        ("advantages", float("nan")),
    ):
        dirty[key][masked] = bad
    kw = dict(kl_coef=0.1, kl_type="k2", entropy_coef=0.01)
    for impl in ("triton", "reference"):
        clean_res = run(inputs, impl, **kw)
        dirty_res = run(dirty, impl, **kw)
        assert (
            torch.isfinite(dirty_res[0]) and torch.isfinite(dirty_res[2]).all() and torch.isfinite(dirty_res[3]).all()
        )
        torch.testing.assert_close(dirty_res[0], clean_res[0])
        torch.testing.assert_close(dirty_res[2], clean_res[2])
        for name in clean_res[1]:
            torch.testing.assert_close(dirty_res[1][name], clean_res[1][name])


def test_extreme_log_ratios_are_clamped_without_nan():
    B, T = 2, 64
    gen = torch.Generator().manual_seed(29)
    lp = -torch.rand(B, T, generator=gen)
    offsets = torch.tensor([1e4, -1e4, 50.0, -50.0, 19.0, -19.0, 25.0, -25.0]).repeat(B, T // 8)
    inputs = dict(
        logprob=lp,
        old_logprob=lp - offsets,
        advantages=torch.randn(B, T, generator=gen),
        loss_mask=torch.ones(B, T, dtype=torch.bool),
        ref_logprob=lp + offsets,
        entropy=torch.rand(B, T, generator=gen),
    )
    for kl_type in ("k1", "k2", "k3"):
        loss, metrics, d_lp, _ = compare_to_reference(
            inputs, kl_type=kl_type, kl_coef=0.05, dual_clip=None, metric_atol=1e-2
        )
        assert math.isclose(float(metrics["ratio_max"]), math.exp(LOG_RATIO_CLAMP), rel_tol=1e-5)
        assert torch.isfinite(d_lp).all()


def test_branch_semantics_by_hand():
    """Five tokens, each in one clipping regime; loss and gradients from the formulas directly."""
    log_r = torch.tensor([0.5, -0.5, -0.5, 1.5, 0.2])  # ratios e^0.5=1.65, 0.61, 0.61, 4.48, 1.22
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0, -1.0])
    old = torch.full((5,), -1.0)
    inputs = dict(logprob=old + log_r, old_logprob=old, advantages=adv, loss_mask=torch.ones(5, dtype=torch.bool))
    r = log_r.exp()
    # token 0: A>0, ratio > 1.28 -> clipped at 1.28, no gradient      (upper clip)
    # token 1: A>0, ratio < 0.8  -> unclipped -A r, gradient -A r
    # token 2: A<0, ratio < 0.8  -> clipped at 0.8: -A 0.8, no grad   (lower clip)
    # token 3: A<0, ratio 4.48 > dual 3 -> -A 3, no gradient          (dual clip)
    # token 4: A<0, ratio 1.22 in [0.8, 1.28] -> -A r, gradient -A r
    per_token = torch.stack([-1.28 * adv[0], -adv[1] * r[1], -adv[2] * 0.8, -adv[3] * 3.0, -adv[4] * r[4]])
    grads = torch.stack([torch.tensor(0.0), -adv[1] * r[1], torch.tensor(0.0), torch.tensor(0.0), -adv[4] * r[4]]) / 5
    cu = torch.tensor([0, 5], dtype=torch.int32)
    for impl in ("triton", "reference"):
        loss, metrics, d_lp, _ = run(inputs, impl, cu_seqlens=cu)
        torch.testing.assert_close(loss, per_token.mean(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(d_lp, grads, rtol=1e-6, atol=1e-7)
        for name in ("clipfrac_upper", "clipfrac_lower", "clipfrac_dual"):
            torch.testing.assert_close(metrics[name], torch.tensor(0.2), msg=f"{impl} {name}")
        torch.testing.assert_close(metrics["approx_kl"], -log_r.mean(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(metrics["ratio_max"], r.max())


# ---------------------------------------------------------------------------- KL cap


def one_token_kl(kl_type: str, lp_minus_ref: float, **kw) -> tuple[float, float]:
    """Per-token KL and d loss / d logprob of a single token in float64 (reference, kl_coef 1).

    Ratio 1 and advantage 0 make the pg term and its gradient 0, so both are the KL's alone.
    """
    lp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    ref = lp.detach() - lp_minus_ref
    loss, metrics = policy_loss_reference(
        lp,
        lp.detach(),
        torch.zeros(1, 1, dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.bool),
        ref_logprob=ref,
        kl_coef=1.0,
        kl_type=kl_type,
        **kw,
    )
    loss.backward()
    assert float(loss.detach()) == float(metrics["kl_loss"])
    return float(metrics["kl_loss"]), float(lp.grad)


def test_kl_cap_bounds_one_token_by_hand():
    # k3 at a log-ratio ref - logprob = 10: exp(10) - 11 ~ 22015 uncapped, gradient 1 - exp(10).
    assert one_token_kl("k3", -10.0) == (10.0, 0.0)  # the default cap: exactly 10, no gradient
    assert one_token_kl("k3", -10.0, kl_cap=10.0) == (10.0, 0.0)
    for disabled in (None, float("inf")):
        value, grad = one_token_kl("k3", -10.0, kl_cap=disabled)
        assert math.isclose(value, math.exp(10.0) - 11.0, rel_tol=1e-14)
        assert math.isclose(grad, 1.0 - math.exp(10.0), rel_tol=1e-14)
    # Inside the cap nothing changes; a value exactly at the cap keeps its gradient (torch.clamp's edge).
    value, grad = one_token_kl("k3", -1.0)
    assert math.isclose(value, math.e - 2.0, rel_tol=1e-14) and math.isclose(grad, 1.0 - math.e, rel_tol=1e-14)
    assert one_token_kl("k2", 4.0, kl_cap=8.0) == (8.0, 4.0)
    # The range is symmetric: k1 is capped on both sides.
    assert one_token_kl("k1", -12.0) == (-10.0, 0.0)
    assert one_token_kl("k1", 12.0) == (10.0, 0.0)
    assert one_token_kl("k1", 3.0) == (3.0, 1.0)


def kl64(lp: torch.Tensor, ref: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Uncapped per-token KL in float64, as the reference computes it."""
    lp, ref = lp.double(), ref.double()
    if kl_type == "k1":
        return lp - ref
    if kl_type == "k2":
        return 0.5 * (lp - ref) ** 2
    d = (ref - lp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return d.exp() - d - 1


def capped_kl_inputs(kl_type: str, kl_cap: float | None, *, seed: int) -> dict:
    """Small random inputs whose KL values reach well past the cap (and past the log-ratio
    clamp for k3), with no token within 1e-4 (relative) of an edge where the KL gradient jumps:
    there an fp32 and a float64 value could fall on different sides of it."""
    inputs = make_inputs(3, 96, seed=seed, mask="random")
    gen = torch.Generator().manual_seed(seed + 1)
    offsets = torch.randn(3, 96, generator=gen) * 6.0
    offsets[:, :4] = torch.tensor([10.0, -12.0, 30.0, -30.0])  # logprob - ref; trained in every row
    inputs["loss_mask"][:, :4] = True
    lp = inputs["logprob"]
    for _ in range(3):
        ref = lp + offsets
        near = ((ref.double() - lp.double()).abs() / LOG_RATIO_CLAMP - 1).abs() < 1e-4
        if kl_cap is not None:
            near |= (kl64(lp, ref, kl_type).abs() / kl_cap - 1).abs() < 1e-4
        offsets = torch.where(near, offsets + 0.01, offsets)
    assert not near.any()
    return dict(inputs, ref_logprob=lp + offsets)


@pytest.mark.parametrize("kl_cap", [10.0, 0.5, None])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_kl_cap_all_implementations_agree(kl_type, aggregation, kl_cap):
    """Triton (interpreter) and torch in fp32 against the float64 reference, with the tolerances
    of `compare_to_reference` (loss and metrics rtol 1e-4, atol 1e-6; gradients rtol 1e-4 + 1e-6
    max|grad|), finite everywhere; and the cap is active on some trained tokens (both signs for k1)."""
    seed = 100 + 10 * ["k1", "k2", "k3"].index(kl_type) + AGGREGATIONS.index(aggregation)
    inputs = capped_kl_inputs(kl_type, kl_cap, seed=seed)
    kw = dict(kl_type=kl_type, kl_cap=kl_cap, kl_coef=0.1, entropy_coef=0.01, aggregation=aggregation)
    results = {impl: compare_to_reference(inputs, impl=impl, **kw) for impl in ("triton", "torch")}

    mask = inputs["loss_mask"]
    raw = kl64(inputs["logprob"], inputs["ref_logprob"], kl_type)[mask]
    if kl_cap is None:
        return
    assert (raw > kl_cap).any(), "no trained token beyond the cap: the test would not test it"
    if kl_type == "k1":
        assert (raw < -kl_cap).any()
    # The capped tokens' gradient is their pg term's alone: the same as with kl_coef = 0.
    capped = (kl64(inputs["logprob"], inputs["ref_logprob"], kl_type).abs() > kl_cap) & mask
    for impl, (_, metrics, d_lp, _) in results.items():
        pg_only = run(inputs, impl, **dict(kw, kl_coef=0.0))[2]
        torch.testing.assert_close(d_lp[capped], pg_only[capped], rtol=1e-5, atol=1e-9, msg=lambda m: f"{impl}: {m}")
        assert abs(float(metrics["kl_loss"])) <= kl_cap * (1 + 1e-6) * (
            1.0 if aggregation in ("token-mean", "seq-mean-token-mean") else float(mask.sum(1).max())
        )


def test_kl_cap_default_is_10():
    inputs = capped_kl_inputs("k3", 10.0, seed=7)
    kw = dict(kl_type="k3", kl_coef=0.1)
    for impl in ("triton", "torch"):
        default, explicit, off = (
            run(inputs, impl, **kw),
            run(inputs, impl, kl_cap=10.0, **kw),
            run(inputs, impl, kl_cap=None, **kw),
        )
        assert torch.equal(default[0], explicit[0]) and torch.equal(default[2], explicit[2])
        assert off[1]["kl_loss"] > 100 * default[1]["kl_loss"]


# ---------------------------------------------------------------------------- layouts


def to_packed(padded: dict, lengths: list[int]) -> tuple[dict, torch.Tensor]:
    packed = {}
    for k, v in padded.items():
        if k == "advantages" and v.dim() == 1:
            packed[k] = v
        else:
            packed[k] = torch.cat([v[b, :n] for b, n in enumerate(lengths)])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return packed, cu


@pytest.mark.parametrize("per_seq_adv", [False, True])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_padded_and_packed_layouts_agree(aggregation, per_seq_adv):
    B, T = 5, 2600
    lengths = [2600, 7, 0, 1500, 1031]  # includes an empty sequence; the first loops over several chunks
    inputs = make_inputs(B, T, seed=31, mask="feedback", per_seq_adv=per_seq_adv)
    for b, n in enumerate(lengths):
        inputs["loss_mask"][b, n:] = False
        inputs["logprob"][b, n:] = float("nan")  # padding garbage
    packed, cu = to_packed(inputs, lengths)
    kw = dict(aggregation=aggregation, kl_coef=0.1, kl_type="k3", entropy_coef=0.01, max_seq_len_norm=T)
    padded_res = run(inputs, "triton", **kw)
    for cu_dtype in (torch.int64, torch.int32):
        packed_res = run(packed, "triton", cu_seqlens=cu.to(cu_dtype), **kw)
        torch.testing.assert_close(packed_res[0], padded_res[0], rtol=1e-5, atol=1e-7)
        for name, value in padded_res[1].items():
            torch.testing.assert_close(packed_res[1][name], value, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
        for i in (2, 3):
            want = torch.cat([padded_res[i][b, :n] for b, n in enumerate(lengths)])
            torch.testing.assert_close(packed_res[i], want, rtol=1e-5, atol=1e-9)
            for b, n in enumerate(lengths):
                assert (padded_res[i][b, n:] == 0).all()
    # And the packed kernel agrees with the float64 reference on the packed layout.
    compare_to_reference(packed, cu_seqlens=cu, **kw)


def test_partition_of_work_does_not_change_results(monkeypatch):
    # One program per sequence (G = 1, each loops over all its chunks) vs the default split.
    inputs = without(make_inputs(2, 3000, seed=37), "ref_logprob", "entropy")
    default = run(inputs, "triton", aggregation="seq-mean-token-mean")
    monkeypatch.setattr(pl, "MAX_PARTS", 1)
    assert pl._parts_per_seq(6000, 2) == 1
    single = run(inputs, "triton", aggregation="seq-mean-token-mean")
    torch.testing.assert_close(single[0], default[0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(single[2], default[2], rtol=1e-6, atol=0)


def test_float_mask_weights():
    inputs = without(make_inputs(3, 500, seed=41), "ref_logprob", "entropy")
    gen = torch.Generator().manual_seed(1)
    inputs["loss_mask"] = torch.rand(3, 500, generator=gen) * inputs["loss_mask"]
    for aggregation in AGGREGATIONS:
        compare_to_reference(inputs, aggregation=aggregation)


# ---------------------------------------------------------------------------- dispatch and errors


def test_dispatch_picks_torch_on_cpu_and_respects_impl():
    inputs = without(make_inputs(2, 100, seed=43), "ref_logprob", "entropy")
    lp = inputs["logprob"].clone().requires_grad_(True)
    args = dict(inputs, logprob=lp)
    auto, _ = policy_loss(**args)  # CPU tensors: the torch path
    torch_loss, _ = policy_loss(**args, impl="torch")
    triton_loss, _ = policy_loss(**args, impl="triton")
    assert "PolicyLossTriton" not in type(auto.grad_fn).__name__
    assert "PolicyLossTriton" not in type(torch_loss.grad_fn).__name__
    assert "PolicyLossTriton" in type(triton_loss.grad_fn).__name__
    assert auto.item() == torch_loss.item()
    torch.testing.assert_close(triton_loss, torch_loss, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="impl"):
        policy_loss(**args, impl="cuda")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs = without(make_inputs(2, 10, seed=47), "ref_logprob", "entropy")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        policy_loss(**inputs, impl="triton")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(aggregation="mean"), "aggregation"),
        (dict(kl_type="k4"), "kl_type"),
        (dict(kl_coef=0.1), "ref_logprob"),
        (dict(entropy_coef=0.1), "entropy"),
        (dict(dual_clip=0.5), "dual_clip"),
        (dict(clip_low=1.5), "clip_low"),
        (dict(kl_cap=0.0), "kl_cap"),
        (dict(kl_cap=-10.0), "kl_cap"),
        (dict(kl_cap=float("nan")), "kl_cap"),
        (dict(old_logprob=torch.zeros(3, 7)), "old_logprob has shape"),
        (dict(advantages=torch.zeros(5)), "advantages has shape"),
        (dict(loss_mask=torch.ones(3, 8, dtype=torch.bool)[:, :7].T), "loss_mask has shape"),
        (dict(cu_seqlens=torch.tensor([0, 24])), "cu_seqlens is for packed"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    inputs = without(make_inputs(3, 8, seed=53), "ref_logprob", "entropy")
    for impl in ("triton", "torch"):
        with pytest.raises(ValueError, match=message):
            policy_loss(**dict(inputs, **change), impl=impl)


def test_bad_packed_offsets_are_a_clear_error():
    inputs = {k: v.reshape(-1) for k, v in without(make_inputs(2, 8, seed=59), "ref_logprob", "entropy").items()}
    with pytest.raises(ValueError, match="need cu_seqlens"):
        policy_loss(**inputs)
    with pytest.raises(ValueError, match="end at total_tokens=16"):
        policy_loss(**inputs, cu_seqlens=torch.tensor([0, 8, 15]))
    with pytest.raises(ValueError, match="decreases at sequence 1"):
        policy_loss(**inputs, cu_seqlens=torch.tensor([0, 9, 8, 16]))
    with pytest.raises(ValueError, match="int32 or int64"):
        policy_loss(**inputs, cu_seqlens=torch.tensor([0.0, 16.0]))
    with pytest.raises(ValueError, match="max_seq_len_norm"):
        policy_loss(**inputs, cu_seqlens=torch.tensor([0, 8, 16]), aggregation="seq-mean-token-sum-norm")


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_cuda_kernel_matches_reference_at_scale(aggregation):
    B, T = 64, 4100  # ~262k tokens, not a multiple of 16 (unaligned loads) in the first layout
    inputs = {k: v.cuda() for k, v in make_inputs(B, T, seed=61, mask="feedback", spread=0.8).items()}
    compare_to_reference(inputs, aggregation=aggregation, kl_coef=0.1, kl_type="k3", entropy_coef=0.01)
    lengths = torch.randint(0, 4096, (B,), generator=torch.Generator().manual_seed(2)).tolist()
    packed, cu = to_packed({k: v.cpu() for k, v in inputs.items()}, lengths)
    packed = {k: v.cuda() for k, v in packed.items()}
    compare_to_reference(packed, cu_seqlens=cu.cuda(), aggregation=aggregation, max_seq_len_norm=4096)


@pytest.mark.gpu
def test_cuda_bf16_and_auto_dispatch():
    inputs = {k: v.cuda() for k, v in without(make_inputs(16, 4096, seed=67), "ref_logprob").items()}
    loss, _ = policy_loss(**{k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()})
    ref, _ = policy_loss_reference(
        **{k: v.bfloat16().double() if v.is_floating_point() else v for k, v in inputs.items()}
    )
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-6)
