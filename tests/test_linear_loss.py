"""linear_loss (the LM head, log-softmax and the policy loss in one pass, its gradients computed in
the forward) against its plain reference: `linear_logprob` then the registered policy loss, on
fresh random inputs.

Tolerances: in float64 both sides do the same arithmetic in another order, so every output and
gradient agrees to 1e-10 of its tensor's scale (rtol 1e-10, atol 1e-10 x max|reference|). fp32
inputs against the float64 reference: 1e-4 of the scale, as `linear_logprob`'s fp32 tests. With
logits of ~1e4, fp32 log-probs and entropies are only right to ~1e-2 absolute (the logits'
own rounding), gradients to 1e-2 of their scale (tests/test_linear_logprob.py explains why).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from cir.algorithms import compute_policy_loss
from cir.algorithms.losses import token_loss
from cir.kernels import linear_loss
from cir.kernels.linear_logprob_ref import linear_logprob_reference
from cir.kernels.linear_loss import ROW_CHUNK_BYTES, default_row_chunk, linear_loss_reference
from cir.kernels.policy_loss_ref import AGGREGATIONS

TOL64, TOL32 = 1e-10, 1e-4
# n rows in several sequences, hidden H, vocabulary V: not multiples of the chunks and blocks below.
N, H, V = 71, 24, 333
# (row_chunk, vocab_block): several ragged row chunks and vocabulary blocks; one of each; defaults.
LAYOUTS = [(16, 64), (N, V), (None, None)]
# The loss's terms: a plain clipped surrogate; KL (k3, capped) and an entropy bonus; KL k2 alone.
TERMS = {
    "pg": dict(),
    "kl_k3+entropy": dict(kl_coef=0.1, kl_type="k3", kl_cap=3.0, entropy_coef=0.05),
    "kl_k2": dict(kl_coef=0.2, kl_type="k2"),
}


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def make_case(seed: int, n: int = N, hdim: int = H, vocab: int = V, logit_scale: float = 3.0):
    """float64 inputs of one micro-batch: hidden rows and LM head (logits of std ~logit_scale),
    targets, sequences of random lengths (cu_seqlens) whose loss mask has interior runs of
    interpreter feedback (0), per-sequence advantages, old and reference log-probs near the
    current ones (the ratio spans both clip edges)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hdim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hdim, generator=g, dtype=torch.float64) * (logit_scale / hdim**0.5)
    targets = torch.randint(0, vocab, (n,), generator=g)
    cuts = sorted(torch.randperm(n - 1, generator=g)[:4].add(1).tolist())
    cu = torch.tensor([0, *cuts, n])
    mask = torch.ones(n, dtype=torch.float64)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e - s >= 6:  # a feedback run inside the sequence
            start = s + int(torch.randint(1, e - s - 3, (1,), generator=g))
            mask[start : start + 3] = 0.0
    with torch.no_grad():
        lp, _ = linear_logprob_reference(hidden, weight, targets)
    old = lp + torch.randn(n, generator=g, dtype=torch.float64) * 0.4
    ref = lp + torch.randn(n, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(len(cu) - 1, generator=g, dtype=torch.float64)
    return dict(hidden=hidden, weight=weight, targets=targets, cu=cu, mask=mask, old=old, ref=ref, adv=adv)


def loss_args(case, aggregation, terms):
    args = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, aggregation=aggregation, kl_cap=10.0)
    args |= terms
    args |= dict(cu_seqlens=case["cu"], max_seq_len_norm=40)
    if args.get("kl_coef", 0.0):
        args["ref_logprob"] = case["ref"]
    return args


def composed(case, dtype, *, aggregation, terms, temperature, on_policy, scale=1.7):
    """The reference: linear_logprob (naive), then the registered loss; grads of scale x loss."""
    h = case["hidden"].to(dtype).clone().requires_grad_(True)
    w = case["weight"].to(dtype).clone().requires_grad_(True)
    lp, ent = linear_logprob_reference(h, w, case["targets"], temperature=temperature, with_entropy=True)
    old = lp.detach() if on_policy else case["old"].to(lp.dtype)
    loss, metrics = compute_policy_loss(
        "ppo_clip", lp, old, case["adv"], case["mask"], entropy=ent, impl="reference",
        **loss_args(case, aggregation, terms),
    )  # fmt: skip
    (loss * scale).backward()
    return dict(loss=loss.detach(), logprob=lp.detach(), entropy=ent.detach(), grad_hidden=h.grad, grad_weight=w.grad)


def fused(case, dtype, *, aggregation, terms, temperature, on_policy, layout=(None, None), scale=1.7):
    h = case["hidden"].to(dtype).clone().requires_grad_(True)
    w = case["weight"].to(dtype).clone().requires_grad_(True)
    per_token = token_loss(
        "ppo_clip", None if on_policy else case["old"], case["adv"], case["mask"], **loss_args(case, aggregation, terms)
    )
    loss, lp, ent = linear_loss(
        h, w, case["targets"], per_token, temperature=temperature, with_entropy=True,
        row_chunk=layout[0], vocab_block=layout[1],
    )  # fmt: skip
    assert not lp.requires_grad and not ent.requires_grad
    (loss * scale).backward()
    return dict(loss=loss.detach(), logprob=lp, entropy=ent, grad_hidden=h.grad, grad_weight=w.grad)


def assert_close(got: dict, want: dict, tol: float, atol: dict | None = None):
    for name, w in want.items():
        g = got[name]
        assert torch.isfinite(g).all(), f"{name}: NaN or inf"
        bound = (atol or {}).get(name, tol * max(w.abs().max().item(), 1e-30))
        torch.testing.assert_close(
            g.double(), w.double(), rtol=tol, atol=bound, msg=lambda m, n=name: f"{n}: {m}"
        )  # fmt: skip


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("terms", list(TERMS))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("on_policy", [True, False], ids=["on-policy", "off-policy"])
def test_matches_the_composition_in_float64(aggregation, terms, temperature, on_policy):
    case = make_case(seed_of(aggregation, terms, temperature, on_policy))
    kw = dict(aggregation=aggregation, terms=TERMS[terms], temperature=temperature, on_policy=on_policy)
    want = composed(case, torch.float64, **kw)
    assert want["grad_hidden"].abs().max() > 0 and want["grad_weight"].abs().max() > 0
    layout = LAYOUTS[seed_of(aggregation, terms) % len(LAYOUTS)]
    got = fused(case, torch.float64, layout=layout, **kw)
    assert_close(got, want, TOL64)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["chunks", "one-chunk", "defaults"])
def test_fp32_matches_the_float64_reference(layout):
    case = make_case(seed_of("fp32", layout))
    kw = dict(aggregation="token-mean", terms=TERMS["kl_k3+entropy"], temperature=0.8, on_policy=False)
    rounded = dict(case, hidden=case["hidden"].float().double(), weight=case["weight"].float().double())
    want = composed(rounded, torch.float64, **kw)
    got = fused(case, torch.float32, layout=layout, **kw)
    assert got["logprob"].dtype == torch.float32 and got["grad_hidden"].dtype == torch.float32
    assert_close(got, want, TOL32)


def test_the_layout_does_not_change_the_result():
    case = make_case(seed_of("layouts"), n=130, vocab=1000)
    kw = dict(aggregation="seq-mean-token-mean", terms=TERMS["kl_k3+entropy"], temperature=1.2, on_policy=False)
    results = [fused(case, torch.float64, layout=lay, **kw) for lay in [(7, 33), (64, 512), (130, 1000), (1, 1000)]]
    for other in results[1:]:
        assert_close(other, results[0], 1e-12)


def test_plain_reference_is_the_composition():
    """`linear_loss_reference` is linear_logprob (naive) then the registered loss."""
    case = make_case(seed_of("reference"))
    per_token = token_loss("ppo_clip", case["old"], case["adv"], case["mask"], cu_seqlens=case["cu"])
    h = case["hidden"].clone().requires_grad_(True)
    loss, lp, ent = linear_loss_reference(h, case["weight"], case["targets"], per_token, with_entropy=True)
    want = composed(case, torch.float64, aggregation="token-mean", terms={}, temperature=1.0, on_policy=False, scale=1)
    loss.backward()
    got = dict(loss=loss.detach(), logprob=lp, entropy=ent, grad_hidden=h.grad)
    assert_close(got, {k: want[k] for k in got}, TOL64)


def test_ignored_rows_give_zero_and_no_gradient():
    case = make_case(seed_of("ignore"))
    targets = case["targets"].clone()
    ignored = torch.tensor([0, 5, 17, 70])
    targets[ignored] = -1
    mask = case["mask"].clone()
    mask[ignored] = 0.0  # what the loss sees there does not matter; the pass must give zeros
    per_token = token_loss("ppo_clip", case["old"], case["adv"], mask, cu_seqlens=case["cu"], entropy_coef=0.1)
    h = case["hidden"].clone().requires_grad_(True)
    loss, lp, ent = linear_loss(h, case["weight"], targets, per_token, with_entropy=True, ignore_index=-1,
                                row_chunk=16, vocab_block=64)  # fmt: skip
    loss.backward()
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all() and (h.grad[ignored] == 0).all()
    keep = torch.ones(N, dtype=torch.bool)
    keep[ignored] = False
    assert (lp[keep] < 0).all() and (ent[keep] > 0).all() and h.grad[keep].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_extreme_logits_stay_finite_and_right(dtype):
    """Logits of ~1e4: most probabilities underflow to 0 (exp2 of -1e4), where the entropy
    term's log p would be -inf; the gradients must be finite and right."""
    case = make_case(seed_of("extreme"), n=21, hdim=32, vocab=77, logit_scale=1.0)
    case["hidden"] = case["hidden"] * (1e4 / (case["hidden"] @ case["weight"].T).abs().max())
    kw = dict(aggregation="token-mean", terms=dict(entropy_coef=0.3), temperature=1.0, on_policy=True)
    rounded = dict(case, hidden=case["hidden"].to(dtype).double(), weight=case["weight"].to(dtype).double())
    want = composed(rounded, torch.float64, **kw)
    got = fused(case, dtype, layout=(8, 32), **kw)
    if dtype == torch.float64:
        assert_close(got, want, TOL64)
    else:
        assert_close(got, want, 1e-2, atol={"loss": 2e-2, "logprob": 2e-2, "entropy": 2e-2})


def test_only_the_inputs_that_need_a_gradient_get_one():
    case = make_case(seed_of("needs"))
    per_token = token_loss("ppo_clip", case["old"], case["adv"], case["mask"], cu_seqlens=case["cu"])
    want = composed(case, torch.float64, aggregation="token-mean", terms={}, temperature=1.0, on_policy=False, scale=1)
    w = case["weight"].clone().requires_grad_(True)  # frozen hidden states
    linear_loss(case["hidden"], w, case["targets"], per_token, row_chunk=16)[0].backward()
    torch.testing.assert_close(w.grad, want["grad_weight"], rtol=TOL64, atol=1e-14)
    h = case["hidden"].clone().requires_grad_(True)  # frozen LM head
    linear_loss(h, case["weight"], case["targets"], per_token, row_chunk=16)[0].backward()
    torch.testing.assert_close(h.grad, want["grad_hidden"], rtol=TOL64, atol=1e-14)
    with torch.no_grad():  # no gradient at all: the loss and log-probs still
        loss, lp, _ = linear_loss(case["hidden"], case["weight"], case["targets"], per_token)
    torch.testing.assert_close(loss, want["loss"], rtol=TOL64, atol=1e-14)
    torch.testing.assert_close(lp, want["logprob"], rtol=TOL64, atol=1e-12)


def test_a_second_backward_is_refused_not_wrong():
    case = make_case(seed_of("twice"))
    per_token = token_loss("ppo_clip", case["old"], case["adv"], case["mask"], cu_seqlens=case["cu"])
    h = case["hidden"].clone().requires_grad_(True)
    loss = linear_loss(h, case["weight"], case["targets"], per_token)[0]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_bad_token_loss_and_missing_entropy_are_clear_errors():
    case = make_case(seed_of("errors"))
    with pytest.raises(ValueError, match="0-d tensor"):
        linear_loss(case["hidden"], case["weight"], case["targets"], lambda rows, lp, ent: lp)
    per_token = token_loss("ppo_clip", case["old"], case["adv"], case["mask"], cu_seqlens=case["cu"], entropy_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        linear_loss(case["hidden"], case["weight"], case["targets"], per_token, with_entropy=False)


def test_default_row_chunk_keeps_the_buffer_within_its_budget():
    for rows, vocab in [(4096, 151_936), (100_000, 32_000), (50, 151_936), (10, 300), (4096, 10**8)]:
        chunk = default_row_chunk(rows, vocab)
        assert 1 <= chunk <= rows
        if chunk < rows:
            assert chunk % 16 == 0
            assert chunk * vocab * 4 <= ROW_CHUNK_BYTES or chunk == 16
    assert default_row_chunk(4096, 151_936) == 384  # the `cir bench step` shape


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from cir.algorithms.losses import token_loss
    from cir.kernels.linear_loss import linear_loss, linear_loss_reference

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    n, hdim = 2048, 64
    results = {}
    for impl, vocab in [tuple(c.split(":")) for c in sys.argv[1:]]:
        vocab = int(vocab)
        torch.manual_seed(0)
        h = torch.randn(n, hdim, requires_grad=True)
        w = (torch.randn(vocab, hdim) * 0.1).requires_grad_(True)
        t = torch.randint(0, vocab, (n,))
        cu = torch.arange(0, n + 1, 128)
        per_token = token_loss("ppo_clip", None, torch.randn(16), torch.ones(n), cu_seqlens=cu, entropy_coef=0.01)
        fn = linear_loss_reference if impl == "reference" else linear_loss
        kw = {} if impl == "reference" else {"row_chunk": 128}
        # warm-up on a tiny problem: thread pools and code paths, not the memory under test
        small = token_loss("ppo_clip", None, torch.randn(1), torch.ones(8), cu_seqlens=torch.tensor([0, 8]))
        h8, w8 = h[:8].detach().requires_grad_(True), w[:256].detach().requires_grad_(True)
        fn(h8, w8, t[:8] % 256, small, with_entropy=True, **kw)[0].backward()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status("VmRSS")
        loss = fn(h, w, t, per_token, with_entropy=True, **kw)[0]
        loss.backward()
        results[f"{impl}:{vocab}"] = (status("VmHWM") - base) / 2**20
        del loss, h, w, t
    print(json.dumps(results))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_bounded_by_the_row_chunk_while_naive_grows():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cases = ["reference:8192", "fused:8192", "reference:32768", "fused:32768"]
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, *cases], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    # Naive: [2048, 32768] fp32 logits (256 MiB) and several tensors of that size. Fused at 128
    # rows: a [128, 32768] buffer (16 MiB), the [V, 64] weight gradient (8 MiB) and small things.
    assert peak["reference:32768"] > 512, peak
    assert peak["fused:32768"] < 64, peak
    assert peak["fused:32768"] - peak["fused:8192"] < (peak["reference:32768"] - peak["reference:8192"]) / 10, peak
