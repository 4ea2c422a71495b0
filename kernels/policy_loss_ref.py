"""Plain torch reference of the masked policy-gradient loss (and the eager baseline).

This module is the ground truth the Triton kernels in `policy_loss.py` are tested against
(run it on float64 inputs for that), the implementation `policy_loss(impl="torch")` uses on
CPU, and the "eager torch" baseline of `cir bench kernels`. It also holds the input checks
and the layout description both implementations share, so the two cannot disagree about what
an input means.

Definitions (per token t of sequence s; every quantity is computed in float32, or float64
when the inputs are float64):

    log_ratio = clamp(logprob - old_logprob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio     = exp(log_ratio)
    pg        = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
    pg        = min(pg, -A * dual_clip)                 where A < 0 and dual_clip is set
    kl        = k1: logprob - ref          k2: 0.5 * (logprob - ref)^2
                k3: exp(d) - d - 1 with d = clamp(ref - logprob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    kl        = clamp(kl, -kl_cap, kl_cap)              unless kl_cap is None (or inf)
    l         = pg + kl_coef * kl - entropy_coef * entropy

The log-ratio clamp keeps exp() finite for any finite input (exp(20) ~ 4.9e8); inside the
clamp nothing changes, outside it the ratio is constant, so its gradient there is 0 (the
token's pg term is clipped in every realistic setting anyway).

The KL cap (default 10, verl's choice) bounds what one token can add to the loss: uncapped,
k3 at a log-ratio of 10 is exp(10) - 11 ~ 22015 with a gradient of ~ -22025, so with
kl_coef > 0 a single token far from the reference would dominate the step. Where the cap is
active the value is constant, so the token's KL gradient is 0 (torch.clamp's gradient; a value
exactly at +-kl_cap still passes its gradient). The cap applies to every kl_type (k1 can be
negative, hence the symmetric range) and comes before kl_coef and the aggregation, so
`kl_loss` reports the capped KL.

Aggregation of l over the batch, with m the loss mask (1 = trained token) and n_s = sum_t m:

    token-mean               sum(m * l) / sum(m)
    seq-mean-token-sum       mean over all B sequences of sum_t(m * l)
    seq-mean-token-mean      mean over sequences with n_s > 0 of sum_t(m * l) / n_s
    seq-mean-token-sum-norm  sum(m * l) / (B * max_seq_len_norm)

Edge cases: tokens with m == 0 are ignored entirely -- their logprob/old/ref/advantage/entropy
values are never used, so garbage there (NaN, inf, padding) cannot leak into the loss or the
gradients. An all-masked sequence contributes 0 and gets zero gradient. An all-masked batch
gives loss 0 with zero gradient, and every metric 0.

Metrics (mask-weighted over the unmasked tokens, i.e. plain means when m is 0/1):
`clipfrac_upper` (A > 0 and ratio > 1 + clip_high: the upper clip is active),
`clipfrac_lower` (A < 0 and ratio < 1 - clip_low), `clipfrac_dual` (the dual clip is active),
`approx_kl` (the k1 estimate of KL(old || new): mean of old_logprob - logprob), `ratio_mean`,
`ratio_max`; and `pg_loss`, `kl_loss` (when ref_logprob is given), `entropy` (when entropy is
given), each aggregated exactly like the loss, so that
loss == pg_loss + kl_coef * kl_loss - entropy_coef * entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
"""Log-ratios (logprob - old, and ref - logprob for k3) are clamped to +-this before exp()."""

KL_CAP = 10.0
"""Default bound on the per-token KL value (clamped to +-this before kl_coef); as verl does."""

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3")
METRIC_NAMES = (
    "pg_loss",
    "kl_loss",
    "entropy",
    "clipfrac_upper",
    "clipfrac_lower",
    "clipfrac_dual",
    "approx_kl",
    "ratio_mean",
    "ratio_max",
)
"""Every metric either implementation can return; `kl_loss`/`entropy` only with their inputs."""


@dataclass(frozen=True)
class Layout:
    """How the 1-D token stream of a batch splits into sequences.

    `padded`: inputs were [B, T] (row s is sequence s, T tokens each, padding masked out).
    Packed: inputs are [total_tokens] and sequence s is tokens cu_seqlens[s]:cu_seqlens[s+1].
    """

    padded: bool
    num_seqs: int  # B
    seq_len: int  # T for padded; 0 for packed
    cu_seqlens: Tensor | None  # int tensor [B + 1] on the inputs' device (packed only)
    per_seq_advantages: bool  # advantages given per sequence ([B] or [B, 1]), broadcast over tokens
    norm_len: float  # max_seq_len_norm for seq-mean-token-sum-norm (1.0 when unused)


def check_inputs(
    logprob: Tensor,
    old_logprob: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    aggregation: str,
    ref_logprob: Tensor | None,
    kl_coef: float,
    kl_type: str,
    kl_cap: float | None,
    entropy: Tensor | None,
    entropy_coef: float,
    cu_seqlens: Tensor | None,
    max_seq_len_norm: int | None,
) -> Layout:
    """Validate the arguments of `policy_loss` and describe the layout; raise ValueError naming the field."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"policy_loss: aggregation={aggregation!r}; expected one of {AGGREGATIONS}")
    if kl_type not in KL_TYPES:
        raise ValueError(f"policy_loss: kl_type={kl_type!r}; expected one of {KL_TYPES}")
    if not (0.0 <= clip_low < 1.0):
        raise ValueError(f"policy_loss: clip_low={clip_low} must be in [0, 1)")
    if clip_high < 0.0:
        raise ValueError(f"policy_loss: clip_high={clip_high} must be >= 0")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"policy_loss: dual_clip={dual_clip} must be > 1 (or None to disable it)")
    if kl_cap is not None and not kl_cap > 0.0:  # `not >` also rejects NaN
        raise ValueError(f"policy_loss: kl_cap={kl_cap} must be > 0 (or None to disable the cap)")
    if kl_coef != 0.0 and ref_logprob is None:
        raise ValueError(f"policy_loss: kl_coef={kl_coef} needs ref_logprob")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"policy_loss: entropy_coef={entropy_coef} needs entropy")

    shape = tuple(logprob.shape)
    if logprob.dim() not in (1, 2):
        raise ValueError(f"policy_loss: logprob must be [B, T] (padded) or [total_tokens] (packed); got shape {shape}")
    if logprob.numel() == 0:
        raise ValueError(f"policy_loss: logprob is empty (shape {shape})")
    if not logprob.is_floating_point():
        raise ValueError(f"policy_loss: logprob must be a floating tensor; got {logprob.dtype}")
    named = {"old_logprob": old_logprob, "loss_mask": loss_mask}
    if ref_logprob is not None:
        named["ref_logprob"] = ref_logprob
    if entropy is not None:
        named["entropy"] = entropy
    for name, t in named.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"policy_loss: {name} has shape {tuple(t.shape)}; expected {shape} like logprob")
        if t.device != logprob.device:
            raise ValueError(f"policy_loss: {name} is on {t.device}; logprob is on {logprob.device}")
    for name in ("old_logprob", "ref_logprob", "entropy"):
        t = named.get(name)
        if t is not None and not t.is_floating_point():
            raise ValueError(f"policy_loss: {name} must be a floating tensor; got {t.dtype}")
    if advantages.device != logprob.device:
        raise ValueError(f"policy_loss: advantages is on {advantages.device}; logprob is on {logprob.device}")
    if not advantages.is_floating_point():
        raise ValueError(f"policy_loss: advantages must be a floating tensor; got {advantages.dtype}")

    if logprob.dim() == 2:
        if cu_seqlens is not None:
            raise ValueError("policy_loss: cu_seqlens is for packed 1-D inputs; logprob is 2-D [B, T]")
        num_seqs, seq_len = shape
        if tuple(advantages.shape) == shape:
            per_seq = False
        elif tuple(advantages.shape) in ((num_seqs,), (num_seqs, 1)):
            per_seq = True
        else:
            raise ValueError(
                f"policy_loss: advantages has shape {tuple(advantages.shape)}; expected {shape} (per token) "
                f"or [{num_seqs}] (per sequence)"
            )
        norm_len = float(seq_len if max_seq_len_norm is None else max_seq_len_norm)
        cu = None
    else:
        if cu_seqlens is None:
            raise ValueError("policy_loss: 1-D (packed) inputs need cu_seqlens [B + 1]")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"policy_loss: cu_seqlens must be 1-D with B + 1 >= 2 entries; got shape {tuple(cu_seqlens.shape)}"
            )
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"policy_loss: cu_seqlens must be int32 or int64; got {cu_seqlens.dtype}")
        num_seqs, seq_len = cu_seqlens.numel() - 1, 0
        if cu_seqlens.device.type == "cpu":
            # Checked only when it costs no device sync; on the GPU the offsets are trusted.
            total = shape[0]
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
                raise ValueError(
                    f"policy_loss: cu_seqlens must start at 0 and end at total_tokens={total}; "
                    f"got {int(cu_seqlens[0])} .. {int(cu_seqlens[-1])}"
                )
            steps = cu_seqlens[1:] - cu_seqlens[:-1]
            if bool((steps < 0).any()):
                bad = int(torch.nonzero(steps < 0)[0, 0])
                raise ValueError(f"policy_loss: cu_seqlens decreases at sequence {bad}")
        cu = cu_seqlens.to(device=logprob.device)
        if tuple(advantages.shape) == shape:
            per_seq = False
        elif tuple(advantages.shape) in ((num_seqs,), (num_seqs, 1)):
            per_seq = True
        else:
            raise ValueError(
                f"policy_loss: advantages has shape {tuple(advantages.shape)}; expected {shape} (per token) "
                f"or [{num_seqs}] (per sequence)"
            )
        if aggregation == "seq-mean-token-sum-norm" and max_seq_len_norm is None:
            raise ValueError(
                "policy_loss: seq-mean-token-sum-norm on packed inputs needs max_seq_len_norm "
                "(the fixed length constant, e.g. the response-length budget)"
            )
        norm_len = float(1 if max_seq_len_norm is None else max_seq_len_norm)
    if max_seq_len_norm is not None and not max_seq_len_norm > 0:
        raise ValueError(f"policy_loss: max_seq_len_norm={max_seq_len_norm} must be > 0")
    return Layout(
        padded=logprob.dim() == 2,
        num_seqs=num_seqs,
        seq_len=seq_len,
        cu_seqlens=cu,
        per_seq_advantages=per_seq,
        norm_len=norm_len,
    )


def effective_kl_cap(kl_cap: float | None) -> float | None:
    """The cap as the implementations apply it: a float, or None when disabled (None or inf)."""
    return None if kl_cap is None or math.isinf(kl_cap) else float(kl_cap)


def _sequence_ids(layout: Layout, total: int, device: torch.device) -> Tensor:
    """Sequence index of every token of the flattened batch."""
    if layout.padded:
        return torch.arange(layout.num_seqs, device=device).repeat_interleave(layout.seq_len)
    lengths = (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).long()
    return torch.arange(layout.num_seqs, device=device).repeat_interleave(lengths, output_size=total)


@dataclass(frozen=True)
class TokenTerms:
    """The per-token quantities of the loss, before the mask and the aggregation."""

    loss: Tensor  # l = pg + kl_coef * kl - entropy_coef * entropy
    pg: Tensor
    kl: Tensor | None  # capped; None without a reference
    ratio: Tensor
    dual_active: Tensor  # bool: the dual clip holds the token's loss


def _token_terms(
    lp: Tensor,
    old: Tensor,
    adv: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    ref: Tensor | None,
    kl_coef: float,
    kl_type: str,
    cap: float | None,
    ent: Tensor | None,
    entropy_coef: float,
) -> TokenTerms:
    """Each token's loss from its own values alone (the definitions of the module docstring):
    what `policy_loss_reference` aggregates and `ppo_clip_token_loss` hands to a fused pass."""
    log_ratio = torch.clamp(lp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    dual_active = torch.zeros(pg.shape, dtype=torch.bool, device=pg.device)
    if dual_clip is not None:
        pg_dual = -adv * dual_clip
        dual_active = (adv < 0) & (pg > pg_dual)
        pg = torch.where(adv < 0, torch.minimum(pg, pg_dual), pg)
    per_token = pg

    kl = None
    if ref is not None:
        if kl_type == "k1":
            kl = lp - ref
        elif kl_type == "k2":
            kl = 0.5 * (lp - ref) ** 2
        else:
            d = torch.clamp(ref - lp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            kl = torch.exp(d) - d - 1.0
        if cap is not None:
            # Gradient 0 where the cap holds the value (torch.clamp's; the kernel copies it).
            kl = torch.clamp(kl, -cap, cap)
        per_token = per_token + kl_coef * kl
    if ent is not None:
        per_token = per_token - entropy_coef * ent
    return TokenTerms(per_token, pg, kl, ratio, dual_active)


def policy_loss_reference(
    logprob: Tensor,
    old_logprob: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    aggregation: str = "token-mean",
    ref_logprob: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k1",
    kl_cap: float | None = KL_CAP,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    cu_seqlens: Tensor | None = None,
    max_seq_len_norm: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The masked policy-gradient loss in plain torch ops; differentiable by autograd.

    Arguments and results are those of `cir.kernels.policy_loss` (see the module docstring for
    the exact definitions). Computes in float32, or in float64 when `logprob` is float64 (the
    ground truth in tests). Gradients flow to `logprob` and `entropy` only.
    """
    layout = check_inputs(
        logprob,
        old_logprob,
        advantages,
        loss_mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        aggregation=aggregation,
        ref_logprob=ref_logprob,
        kl_coef=kl_coef,
        kl_type=kl_type,
        kl_cap=kl_cap,
        entropy=entropy,
        entropy_coef=entropy_coef,
        cu_seqlens=cu_seqlens,
        max_seq_len_norm=max_seq_len_norm,
    )
    cap = effective_kl_cap(kl_cap)
    dtype = torch.promote_types(logprob.dtype, torch.float32)
    device = logprob.device
    total = logprob.numel()
    B = layout.num_seqs
    # Padded rows are reduced with a plain row sum; packed sequences through their token ids.
    seq_id = None if layout.padded else _sequence_ids(layout, total, device)

    # Work on the flattened token stream; masked tokens are replaced by 0 before any arithmetic
    # so that their values (padding garbage, NaN, inf) never reach the loss or the gradients.
    mask_w = loss_mask.reshape(-1).to(dtype)
    valid = mask_w != 0
    zero = torch.zeros((), dtype=dtype, device=device)

    def clean(t: Tensor) -> Tensor:
        return torch.where(valid, t.reshape(-1).to(dtype), zero)

    lp = clean(logprob)
    old = clean(old_logprob).detach()
    adv = advantages.to(dtype)
    if layout.per_seq_advantages:
        adv = adv.reshape(B, 1).expand(B, layout.seq_len) if layout.padded else adv.reshape(-1)[seq_id]
    adv = clean(adv).detach()

    ref = None if ref_logprob is None else clean(ref_logprob).detach()
    ent = None if entropy is None else clean(entropy)
    terms = _token_terms(
        lp,
        old,
        adv,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        ref=ref,
        kl_coef=kl_coef,
        kl_type=kl_type,
        cap=cap,
        ent=ent,
        entropy_coef=entropy_coef,
    )
    per_token, pg, kl, ratio, dual_active = terms.loss, terms.pg, terms.kl, terms.ratio, terms.dual_active

    # Per-sequence masked sums, then the aggregation's weights.
    def seq_sum(x: Tensor) -> Tensor:
        if layout.padded:
            return x.view(B, layout.seq_len).sum(dim=1)
        return torch.zeros(B, dtype=dtype, device=device).index_add(0, seq_id, x)

    n_seq = seq_sum(mask_w)
    n_total = mask_w.sum()

    def aggregate(x: Tensor) -> Tensor:
        s = seq_sum(mask_w * x)
        if aggregation == "token-mean":
            return torch.where(n_total > 0, s.sum() / torch.where(n_total > 0, n_total, 1.0), zero)
        if aggregation == "seq-mean-token-sum":
            return s.sum() / B
        if aggregation == "seq-mean-token-sum-norm":
            return s.sum() / (B * layout.norm_len)
        has_tokens = n_seq > 0
        per_seq = torch.where(has_tokens, s / torch.where(has_tokens, n_seq, 1.0), zero)
        n_valid = has_tokens.sum()
        return torch.where(n_valid > 0, per_seq.sum() / n_valid.clamp(min=1), zero)

    loss = aggregate(per_token)

    def token_mean(x: Tensor) -> Tensor:
        return torch.where(n_total > 0, (mask_w * x).sum() / torch.where(n_total > 0, n_total, 1.0), zero)

    with torch.no_grad():
        adv_pos, adv_neg = adv > 0, adv < 0
        metrics = {
            "pg_loss": aggregate(pg),
            "clipfrac_upper": token_mean((adv_pos & (ratio > 1.0 + clip_high)).to(dtype)),
            "clipfrac_lower": token_mean((adv_neg & (ratio < 1.0 - clip_low)).to(dtype)),
            "clipfrac_dual": token_mean(dual_active.to(dtype)),
            "approx_kl": token_mean(old - lp),
            "ratio_mean": token_mean(ratio),
            "ratio_max": torch.where(valid, ratio, zero).max(),
        }
        if kl is not None:
            metrics["kl_loss"] = aggregate(kl)
        if ent is not None:
            metrics["entropy"] = aggregate(ent)
    return loss, {k: v.detach() for k, v in metrics.items()}


# ------------------------------------------------------------------------- the loss token by token
#
# Every aggregation above is linear in the per-token loss: loss = sum_t w_t * l_t with weights
# that depend only on the mask and the layout (`aggregation_weights`), and l_t depends only on
# token t's own values (`_token_terms`). A pass that sees the tokens a slice at a time (the fused
# LM head + loss, `cir.kernels.linear_loss`) can therefore compute each slice's share of the loss
# and its gradient, the slices adding up to `policy_loss_reference`'s loss.


def ppo_clip_token_loss(
    logprob: Tensor,
    old_logprob: Tensor,
    advantages: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    ref_logprob: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k1",
    kl_cap: float | None = KL_CAP,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> Tensor:
    """The per-token loss l_t of `policy_loss_reference` (its definition, before the mask and
    the aggregation) on per-token inputs of one shape; differentiable in logprob and entropy."""
    return _token_terms(
        logprob,
        old_logprob.detach(),
        advantages.detach(),
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        ref=None if ref_logprob is None else ref_logprob.detach(),
        kl_coef=kl_coef,
        kl_type=kl_type,
        cap=effective_kl_cap(kl_cap),
        ent=entropy,
        entropy_coef=entropy_coef,
    ).loss


def aggregation_weights(loss_mask: Tensor, layout: Layout, aggregation: str, dtype: torch.dtype) -> Tensor:
    """Per-token weights w of the flattened batch with aggregate(x) == sum_t w_t x_t for the
    aggregation's formula (module docstring); 0 on masked tokens."""
    mask_w = loss_mask.reshape(-1).to(dtype)
    B = layout.num_seqs
    if aggregation == "token-mean":
        return mask_w / mask_w.sum().clamp(min=torch.finfo(dtype).tiny)
    if aggregation == "seq-mean-token-sum":
        return mask_w / B
    if aggregation == "seq-mean-token-sum-norm":
        return mask_w / (B * layout.norm_len)
    if aggregation != "seq-mean-token-mean":
        raise ValueError(f"policy_loss: aggregation={aggregation!r}; expected one of {AGGREGATIONS}")
    if layout.padded:
        n_seq = mask_w.view(B, layout.seq_len).sum(dim=1)
        per_token_n = n_seq.repeat_interleave(layout.seq_len)
    else:
        seq_id = _sequence_ids(layout, mask_w.numel(), mask_w.device)
        n_seq = torch.zeros(B, dtype=dtype, device=mask_w.device).index_add(0, seq_id, mask_w)
        per_token_n = n_seq[seq_id]
    n_valid = (n_seq > 0).sum().clamp(min=1)
    return torch.where(mask_w != 0, mask_w / (per_token_n * n_valid), torch.zeros_like(mask_w))


class TokenSeparableLoss:
    """A policy loss over one batch as a sum over its tokens, evaluated a slice of tokens at a
    time: `loss(rows, logprob, entropy)` is the share of the tokens `rows` (a slice of the
    flattened batch), sum over them of w_t * l_t, differentiable in `logprob` and `entropy`
    (those tokens' values, [rows]). The slices of a partition add up to the batch's loss.

    `per_token` computes l_t from per-token tensors (`ppo_clip_token_loss`'s signature); the
    other arguments are those of `policy_loss_reference`, checked the same way. `old_logprob`
    None means strictly on-policy: each token's own log-prob, detached. `uses_entropy` says
    whether the loss depends on the entropy (entropy_coef != 0), so that a pass that does not
    need its gradient can skip it.
    """

    def __init__(
        self,
        per_token,
        old_logprob: Tensor | None,
        advantages: Tensor,
        loss_mask: Tensor,
        *,
        clip_low: float = 0.2,
        clip_high: float = 0.28,
        dual_clip: float | None = 3.0,
        aggregation: str = "token-mean",
        ref_logprob: Tensor | None = None,
        kl_coef: float = 0.0,
        kl_type: str = "k1",
        kl_cap: float | None = KL_CAP,
        entropy_coef: float = 0.0,
        cu_seqlens: Tensor | None = None,
        max_seq_len_norm: int | None = None,
    ):
        shape_of = loss_mask.to(torch.float32)  # stands for the log-probs and entropies not computed yet
        layout = check_inputs(
            shape_of,
            shape_of if old_logprob is None else old_logprob,
            advantages,
            loss_mask,
            clip_low=clip_low,
            clip_high=clip_high,
            dual_clip=dual_clip,
            aggregation=aggregation,
            ref_logprob=ref_logprob,
            kl_coef=kl_coef,
            kl_type=kl_type,
            kl_cap=kl_cap,
            entropy=shape_of,
            entropy_coef=entropy_coef,
            cu_seqlens=cu_seqlens,
            max_seq_len_norm=max_seq_len_norm,
        )
        self.per_token = per_token
        # Held in float64 and cast to the slice's dtype (the pass's: fp32, or float64) on use.
        wide = torch.float64
        self.weights = aggregation_weights(loss_mask, layout, aggregation, wide)
        self.valid = self.weights != 0
        zero = torch.zeros((), dtype=wide, device=self.weights.device)

        def clean(t: Tensor) -> Tensor:
            return torch.where(self.valid, t.reshape(-1).to(wide), zero).detach()

        adv = advantages.to(wide)
        if layout.per_seq_advantages:
            B = layout.num_seqs
            if layout.padded:
                adv = adv.reshape(B, 1).expand(B, layout.seq_len)
            else:
                adv = adv.reshape(-1)[_sequence_ids(layout, loss_mask.numel(), adv.device)]
        self.advantages = clean(adv)
        self.old = None if old_logprob is None else clean(old_logprob)
        self.ref = None if ref_logprob is None else clean(ref_logprob)
        self.uses_entropy = entropy_coef != 0.0
        self.kwargs = dict(
            clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef, kl_type=kl_type,
            kl_cap=kl_cap, entropy_coef=entropy_coef,
        )  # fmt: skip

    def __call__(self, rows: slice, logprob: Tensor, entropy: Tensor | None) -> Tensor:
        dtype = torch.promote_types(logprob.dtype, torch.float32)
        valid = self.valid[rows]
        zero = torch.zeros((), dtype=dtype, device=valid.device)
        lp = torch.where(valid, logprob.to(dtype), zero)
        ent = None
        if self.uses_entropy:
            if entropy is None:
                raise ValueError("policy_loss: entropy_coef != 0 needs the entropy of every token")
            ent = torch.where(valid, entropy.to(dtype), zero)
        per_token = self.per_token(
            lp,
            lp.detach() if self.old is None else self.old[rows].to(dtype),
            self.advantages[rows].to(dtype),
            ref_logprob=None if self.ref is None else self.ref[rows].to(dtype),
            entropy=ent,
            **self.kwargs,
        )
        return (self.weights[rows].to(dtype) * per_token).sum()
