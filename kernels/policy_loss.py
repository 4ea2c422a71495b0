"""Masked clipped policy-gradient loss: Triton forward and backward, and the dispatch `policy_loss`.

The loss, its edge cases and its metrics are defined in `policy_loss_ref.py` (the plain torch
reference, which is also what runs on CPU). The Triton path computes the same numbers in
three launches:

1. forward (grid B x G): program (s, g) walks the tokens of sequence s in BLOCK-sized chunks
   g, g + G, g + 2G, ... and writes one row of partial sums (mask count, pg, kl, entropy, clip
   counts, ratio sum, approx-kl sum, ratio max) to a [fields, B, G] buffer. Every program
   writes its own slot, so there are no atomics and the result is deterministic.
2. finalize (one program): reduces the partials per sequence, derives the per-sequence weight
   the aggregation gives (1/n_s for seq-mean-token-mean, else 1) and the global scale
   (1/sum(mask), 1/B, 1/#non-empty sequences, 1/(B * max_seq_len_norm)), and writes the
   loss, the metrics and those weights. Nothing returns to the host: no device sync.
3. backward (grid B x G, same walk): recomputes the per-token derivative from the inputs and
   writes dlogprob = grad * scale * weight_s * mask * d(l)/d(logprob) (and dentropy).

Padded [B, T] inputs are the packed layout with cu_seqlens = arange(B + 1) * T, so one kernel
serves both; the row offset is computed instead of loaded. Per-sequence advantages are read
once per program, never broadcast in memory.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .policy_loss_ref import (
    AGGREGATIONS,
    KL_CAP,
    KL_TYPES,
    LOG_RATIO_CLAMP,
    Layout,
    check_inputs,
    effective_kl_cap,
    policy_loss_reference,
)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch path needs no Triton (CPU installs without the extra)
    triton = None
    tl = None
    HAS_TRITON = False

IMPLS = ("auto", "triton", "torch", "reference")

# Partial-sum fields written by the forward kernel, in buffer order.
_F_N, _F_PG, _F_KL, _F_ENT, _F_CLIP_UP, _F_CLIP_LO, _F_CLIP_DUAL, _F_RATIO, _F_APPROX_KL, _F_RATIO_MAX = range(10)
_NUM_FIELDS = 10
# Metric vector written by the finalize kernel, in this order (+ the global scale last).
_OUT_NAMES = (
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
_OUT_SCALE = len(_OUT_NAMES)
_NUM_OUT = _OUT_SCALE + 1

BLOCK = 1024  # tokens per chunk: 8 warps x 32 lanes x 4 elements
NUM_WARPS = 8  # 4 elements per thread keeps the fwd kernel at 70-110 registers on sm_90 (8/thread: 120-170)
MAX_PARTS = 1024  # cap on G, the programs per sequence
TARGET_PROGRAMS = 1024  # enough programs to keep every SM of an H100/H200 busy several times over
FINALIZE_TILE = 4096  # elements per [BLOCK_B, G] tile in the finalize kernel


if HAS_TRITON:

    @triton.jit
    def _seq_bounds(cu_ptr, seq, seq_len, IS_PACKED: tl.constexpr):
        if IS_PACKED:
            start = tl.load(cu_ptr + seq).to(tl.int64)
            end = tl.load(cu_ptr + seq + 1).to(tl.int64)
        else:
            start = seq.to(tl.int64) * seq_len
            end = start + seq_len
        return start, end

    @triton.jit
    def _load_token_inputs(
        lp_ptr,
        old_ptr,
        adv_ptr,
        mask_ptr,
        idx,
        inb,
        adv_seq,
        ADV_PER_SEQ: tl.constexpr,
    ):
        # Masked tokens are zeroed before any arithmetic: their stored values never matter.
        m = tl.load(mask_ptr + idx, mask=inb, other=0).to(tl.float32)
        valid = m != 0.0
        lp = tl.where(valid, tl.load(lp_ptr + idx, mask=inb, other=0.0).to(tl.float32), 0.0)
        old = tl.where(valid, tl.load(old_ptr + idx, mask=inb, other=0.0).to(tl.float32), 0.0)
        if ADV_PER_SEQ:
            adv = tl.where(valid, adv_seq, 0.0)
        else:
            adv = tl.where(valid, tl.load(adv_ptr + idx, mask=inb, other=0.0).to(tl.float32), 0.0)
        return m, valid, lp, old, adv

    @triton.jit
    def _kl_term(lp, ref, log_ratio_clamp, kl_cap, KL_TYPE: tl.constexpr, HAS_CAP: tl.constexpr):
        # Per-token KL and its derivative d kl / d logprob, capped. One helper for both kernels,
        # so the forward's clamp and the backward's "is the cap active" test see the same fp32
        # value and cannot disagree on a token at the edge. (The forward discards d_kl.)
        if KL_TYPE == 1:
            kl = lp - ref
            d_kl = tl.full(lp.shape, 1.0, tl.float32)
        elif KL_TYPE == 2:
            kl = 0.5 * (lp - ref) * (lp - ref)
            d_kl = lp - ref
        else:
            d_raw = ref - lp
            d = tl.minimum(tl.maximum(d_raw, -log_ratio_clamp), log_ratio_clamp)
            e = tl.exp(d)
            kl = e - d - 1.0
            # d = ref - logprob, so d kl / d logprob = 1 - exp(d); 0 where the log-ratio clamp holds d.
            d_kl = tl.where((d_raw >= -log_ratio_clamp) & (d_raw <= log_ratio_clamp), 1.0 - e, 0.0)
        if HAS_CAP:
            # One token must not dominate a step: clamp to +-kl_cap; where the clamp is active the
            # value is constant, so the gradient is 0 (the edge itself passes it, as torch.clamp).
            in_cap = (kl >= -kl_cap) & (kl <= kl_cap)
            kl = tl.minimum(tl.maximum(kl, -kl_cap), kl_cap)
            d_kl = tl.where(in_cap, d_kl, 0.0)
        return kl, d_kl

    @triton.jit
    def _policy_loss_fwd_kernel(
        lp_ptr,
        old_ptr,
        adv_ptr,
        mask_ptr,
        ref_ptr,
        ent_ptr,
        cu_ptr,
        part_ptr,
        num_seqs,
        seq_len,
        clip_lo,
        clip_hi,
        dual_clip,
        log_ratio_clamp,
        kl_cap,
        IS_PACKED: tl.constexpr,
        ADV_PER_SEQ: tl.constexpr,
        HAS_REF: tl.constexpr,
        HAS_ENT: tl.constexpr,
        USE_DUAL: tl.constexpr,
        KL_TYPE: tl.constexpr,
        HAS_CAP: tl.constexpr,
        G: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        seq = tl.program_id(0)
        part = tl.program_id(1)
        start, end = _seq_bounds(cu_ptr, seq, seq_len, IS_PACKED)
        adv_seq = 0.0
        if ADV_PER_SEQ:
            adv_seq = tl.load(adv_ptr + seq).to(tl.float32)
        lo = 1.0 - clip_lo
        hi = 1.0 + clip_hi

        acc_n = tl.zeros([BLOCK], dtype=tl.float32)
        acc_pg = tl.zeros([BLOCK], dtype=tl.float32)
        acc_kl = tl.zeros([BLOCK], dtype=tl.float32)
        acc_ent = tl.zeros([BLOCK], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK], dtype=tl.float32)
        acc_lo = tl.zeros([BLOCK], dtype=tl.float32)
        acc_dual = tl.zeros([BLOCK], dtype=tl.float32)
        acc_ratio = tl.zeros([BLOCK], dtype=tl.float32)
        acc_akl = tl.zeros([BLOCK], dtype=tl.float32)
        acc_rmax = tl.zeros([BLOCK], dtype=tl.float32)  # ratios are > 0, so 0 means "no token"
        for off in range(start + part * BLOCK, end, G * BLOCK):
            idx = off + tl.arange(0, BLOCK)
            inb = idx < end
            m, valid, lp, old, adv = _load_token_inputs(
                lp_ptr, old_ptr, adv_ptr, mask_ptr, idx, inb, adv_seq, ADV_PER_SEQ
            )
            log_ratio = tl.minimum(tl.maximum(lp - old, -log_ratio_clamp), log_ratio_clamp)
            ratio = tl.exp(log_ratio)
            pg = tl.maximum(-adv * ratio, -adv * tl.minimum(tl.maximum(ratio, lo), hi))
            if USE_DUAL:
                pg_dual = -adv * dual_clip
                dual = (adv < 0.0) & (pg > pg_dual)
                pg = tl.where(dual, pg_dual, pg)
                acc_dual += tl.where(dual, m, 0.0)
            acc_n += m
            acc_pg += m * pg
            acc_up += tl.where((adv > 0.0) & (ratio > hi), m, 0.0)
            acc_lo += tl.where((adv < 0.0) & (ratio < lo), m, 0.0)
            acc_ratio += m * ratio
            acc_akl += m * (old - lp)
            acc_rmax = tl.maximum(acc_rmax, tl.where(valid, ratio, 0.0))
            if HAS_REF:
                ref = tl.where(valid, tl.load(ref_ptr + idx, mask=inb, other=0.0).to(tl.float32), 0.0)
                kl, _ = _kl_term(lp, ref, log_ratio_clamp, kl_cap, KL_TYPE, HAS_CAP)
                acc_kl += m * kl
            if HAS_ENT:
                ent = tl.where(valid, tl.load(ent_ptr + idx, mask=inb, other=0.0).to(tl.float32), 0.0)
                acc_ent += m * ent

        slot = part_ptr + seq * G + part
        stride = num_seqs * G
        tl.store(slot + 0 * stride, tl.sum(acc_n, axis=0))
        tl.store(slot + 1 * stride, tl.sum(acc_pg, axis=0))
        tl.store(slot + 2 * stride, tl.sum(acc_kl, axis=0))
        tl.store(slot + 3 * stride, tl.sum(acc_ent, axis=0))
        tl.store(slot + 4 * stride, tl.sum(acc_up, axis=0))
        tl.store(slot + 5 * stride, tl.sum(acc_lo, axis=0))
        tl.store(slot + 6 * stride, tl.sum(acc_dual, axis=0))
        tl.store(slot + 7 * stride, tl.sum(acc_ratio, axis=0))
        tl.store(slot + 8 * stride, tl.sum(acc_akl, axis=0))
        tl.store(slot + 9 * stride, tl.max(acc_rmax, axis=0))

    @triton.jit
    def _policy_loss_finalize_kernel(
        part_ptr,
        weight_ptr,
        loss_ptr,
        out_ptr,
        num_seqs,
        kl_coef,
        ent_coef,
        norm_len,
        AGG: tl.constexpr,
        G: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        stride = num_seqs * G
        cols = tl.arange(0, G)
        acc_n = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_pg = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_kl = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_ent = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_lo = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_dual = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_ratio = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_akl = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_rmax = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_valid = tl.zeros([BLOCK_B], dtype=tl.float32)
        for b0 in range(0, num_seqs, BLOCK_B):
            rows = b0 + tl.arange(0, BLOCK_B)
            row_ok = rows < num_seqs
            offs = rows[:, None] * G + cols[None, :]
            tile_ok = row_ok[:, None] & (cols[None, :] < G)
            n_s = tl.sum(tl.load(part_ptr + 0 * stride + offs, mask=tile_ok, other=0.0), axis=1)
            pg_s = tl.sum(tl.load(part_ptr + 1 * stride + offs, mask=tile_ok, other=0.0), axis=1)
            kl_s = tl.sum(tl.load(part_ptr + 2 * stride + offs, mask=tile_ok, other=0.0), axis=1)
            ent_s = tl.sum(tl.load(part_ptr + 3 * stride + offs, mask=tile_ok, other=0.0), axis=1)
            if AGG == 2:  # seq-mean-token-mean: each non-empty sequence weighs 1/n_s
                has_tokens = n_s > 0.0
                w = tl.where(has_tokens, 1.0 / tl.where(has_tokens, n_s, 1.0), 0.0)
                acc_valid += tl.where(has_tokens, 1.0, 0.0)
            else:
                w = tl.where(row_ok, 1.0, 0.0)
            tl.store(weight_ptr + rows, w, mask=row_ok)
            acc_n += n_s
            acc_pg += w * pg_s
            acc_kl += w * kl_s
            acc_ent += w * ent_s
            acc_up += tl.sum(tl.load(part_ptr + 4 * stride + offs, mask=tile_ok, other=0.0), axis=1)
            acc_lo += tl.sum(tl.load(part_ptr + 5 * stride + offs, mask=tile_ok, other=0.0), axis=1)
            acc_dual += tl.sum(tl.load(part_ptr + 6 * stride + offs, mask=tile_ok, other=0.0), axis=1)
            acc_ratio += tl.sum(tl.load(part_ptr + 7 * stride + offs, mask=tile_ok, other=0.0), axis=1)
            acc_akl += tl.sum(tl.load(part_ptr + 8 * stride + offs, mask=tile_ok, other=0.0), axis=1)
            acc_rmax = tl.maximum(
                acc_rmax, tl.max(tl.load(part_ptr + 9 * stride + offs, mask=tile_ok, other=0.0), axis=1)
            )

        n_total = tl.sum(acc_n, axis=0)
        inv_n = tl.where(n_total > 0.0, 1.0 / tl.where(n_total > 0.0, n_total, 1.0), 0.0)
        if AGG == 0:  # token-mean
            scale = inv_n
        elif AGG == 1:  # seq-mean-token-sum
            scale = 1.0 / (num_seqs * 1.0)
        elif AGG == 2:  # seq-mean-token-mean
            n_valid = tl.sum(acc_valid, axis=0)
            scale = tl.where(n_valid > 0.0, 1.0 / tl.where(n_valid > 0.0, n_valid, 1.0), 0.0)
        else:  # seq-mean-token-sum-norm
            scale = 1.0 / (num_seqs * norm_len)
        pg_loss = tl.sum(acc_pg, axis=0) * scale
        kl_loss = tl.sum(acc_kl, axis=0) * scale
        entropy = tl.sum(acc_ent, axis=0) * scale
        tl.store(loss_ptr, pg_loss + kl_coef * kl_loss - ent_coef * entropy)
        tl.store(out_ptr + 0, pg_loss)
        tl.store(out_ptr + 1, kl_loss)
        tl.store(out_ptr + 2, entropy)
        tl.store(out_ptr + 3, tl.sum(acc_up, axis=0) * inv_n)
        tl.store(out_ptr + 4, tl.sum(acc_lo, axis=0) * inv_n)
        tl.store(out_ptr + 5, tl.sum(acc_dual, axis=0) * inv_n)
        tl.store(out_ptr + 6, tl.sum(acc_akl, axis=0) * inv_n)
        tl.store(out_ptr + 7, tl.sum(acc_ratio, axis=0) * inv_n)
        tl.store(out_ptr + 8, tl.max(acc_rmax, axis=0))
        tl.store(out_ptr + 9, scale)

    @triton.jit
    def _policy_loss_bwd_kernel(
        grad_ptr,
        weight_ptr,
        out_ptr,
        lp_ptr,
        old_ptr,
        adv_ptr,
        mask_ptr,
        ref_ptr,
        cu_ptr,
        dlp_ptr,
        dent_ptr,
        seq_len,
        clip_lo,
        clip_hi,
        dual_clip,
        log_ratio_clamp,
        kl_cap,
        kl_coef,
        ent_coef,
        IS_PACKED: tl.constexpr,
        ADV_PER_SEQ: tl.constexpr,
        HAS_REF: tl.constexpr,
        ENT_GRAD: tl.constexpr,
        USE_DUAL: tl.constexpr,
        KL_TYPE: tl.constexpr,
        HAS_CAP: tl.constexpr,
        REF_IN_BWD: tl.constexpr,
        SCALE_IDX: tl.constexpr,
        G: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        seq = tl.program_id(0)
        part = tl.program_id(1)
        start, end = _seq_bounds(cu_ptr, seq, seq_len, IS_PACKED)
        # d loss / d l_t = grad * scale * weight_s * mask_t
        w_seq = tl.load(grad_ptr).to(tl.float32) * tl.load(out_ptr + SCALE_IDX) * tl.load(weight_ptr + seq)
        adv_seq = 0.0
        if ADV_PER_SEQ:
            adv_seq = tl.load(adv_ptr + seq).to(tl.float32)
        lo = 1.0 - clip_lo
        hi = 1.0 + clip_hi
        for off in range(start + part * BLOCK, end, G * BLOCK):
            idx = off + tl.arange(0, BLOCK)
            inb = idx < end
            m, valid, lp, old, adv = _load_token_inputs(
                lp_ptr, old_ptr, adv_ptr, mask_ptr, idx, inb, adv_seq, ADV_PER_SEQ
            )
            raw = lp - old
            log_ratio = tl.minimum(tl.maximum(raw, -log_ratio_clamp), log_ratio_clamp)
            ratio = tl.exp(log_ratio)
            # d ratio / d logprob: ratio inside the clamp, 0 where the clamp holds it constant.
            d_ratio = tl.where((raw >= -log_ratio_clamp) & (raw <= log_ratio_clamp), ratio, 0.0)
            pg1 = -adv * ratio
            pg2 = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
            d_pg1 = -adv * d_ratio
            d_pg2 = tl.where((ratio >= lo) & (ratio <= hi), d_pg1, 0.0)
            # max(): the larger branch's derivative; on an exact tie the mean of both (as autograd does).
            d_pg = tl.where(pg1 > pg2, d_pg1, tl.where(pg1 < pg2, d_pg2, 0.5 * (d_pg1 + d_pg2)))
            if USE_DUAL:
                pg = tl.maximum(pg1, pg2)
                pg_dual = -adv * dual_clip
                d_dual = tl.where(pg > pg_dual, 0.0, tl.where(pg < pg_dual, d_pg, 0.5 * d_pg))
                d_pg = tl.where(adv < 0.0, d_dual, d_pg)
            d_l = d_pg
            if REF_IN_BWD:
                ref = tl.where(valid, tl.load(ref_ptr + idx, mask=inb, other=0.0).to(tl.float32), 0.0)
                _, d_kl = _kl_term(lp, ref, log_ratio_clamp, kl_cap, KL_TYPE, HAS_CAP)
                d_l += kl_coef * d_kl
            elif HAS_REF:
                d_l += kl_coef  # uncapped k1: d kl / d logprob = 1 everywhere, no need to read ref
            w = w_seq * m
            tl.store(dlp_ptr + idx, (w * d_l).to(dlp_ptr.dtype.element_ty), mask=inb)
            if ENT_GRAD:
                tl.store(dent_ptr + idx, (-ent_coef * w).to(dent_ptr.dtype.element_ty), mask=inb)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _parts_per_seq(total_tokens: int, num_seqs: int) -> int:
    """G: programs per sequence, a power of two (few compiled variants) that fills the GPU."""
    chunks = -(-max(1, total_tokens // num_seqs) // BLOCK)
    wanted = -(-TARGET_PROGRAMS // num_seqs)
    return max(1, min(_next_pow2(chunks), _next_pow2(wanted), MAX_PARTS))


def _flat_mask(loss_mask: Tensor) -> Tensor:
    m = loss_mask.reshape(-1).contiguous()
    return m.view(torch.uint8) if m.dtype == torch.bool else m


class _PolicyLossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprob, entropy, old_logprob, advantages, loss_mask, ref_logprob, layout: Layout, cfg: dict):
        device = logprob.device
        total = logprob.numel()
        B = layout.num_seqs
        G = _parts_per_seq(total, B)
        lp = logprob.reshape(-1).contiguous()
        old = old_logprob.reshape(-1).contiguous()
        adv = advantages.reshape(-1).contiguous()
        mask = _flat_mask(loss_mask)
        ref = ref_logprob.reshape(-1).contiguous() if ref_logprob is not None else lp  # dummy pointer when unused
        ent = entropy.reshape(-1).contiguous() if entropy is not None else lp
        cu = layout.cu_seqlens if layout.cu_seqlens is not None else lp  # dummy pointer for padded
        common = dict(
            IS_PACKED=not layout.padded,
            ADV_PER_SEQ=layout.per_seq_advantages,
            HAS_REF=ref_logprob is not None,
            USE_DUAL=cfg["dual_clip"] is not None,
            KL_TYPE=KL_TYPES.index(cfg["kl_type"]) + 1,
            HAS_CAP=cfg["kl_cap"] is not None,
            G=G,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
        dual = float(cfg["dual_clip"]) if cfg["dual_clip"] is not None else 0.0
        kl_cap = cfg["kl_cap"] if cfg["kl_cap"] is not None else 0.0  # unused without HAS_CAP

        partials = torch.empty((_NUM_FIELDS, B, G), dtype=torch.float32, device=device)
        _policy_loss_fwd_kernel[(B, G)](
            lp,
            old,
            adv,
            mask,
            ref,
            ent,
            cu,
            partials,
            B,
            layout.seq_len,
            cfg["clip_low"],
            cfg["clip_high"],
            dual,
            LOG_RATIO_CLAMP,
            kl_cap,
            HAS_ENT=entropy is not None,
            **common,
        )
        seq_weight = torch.empty(B, dtype=torch.float32, device=device)
        loss = torch.empty((), dtype=torch.float32, device=device)
        out = torch.empty(_NUM_OUT, dtype=torch.float32, device=device)
        _policy_loss_finalize_kernel[(1,)](
            partials,
            seq_weight,
            loss,
            out,
            B,
            cfg["kl_coef"],
            cfg["entropy_coef"],
            layout.norm_len,
            AGG=AGGREGATIONS.index(cfg["aggregation"]),
            G=G,
            BLOCK_B=max(1, FINALIZE_TILE // G),
            num_warps=4,
        )

        ctx.save_for_backward(lp, old, adv, mask, ref, cu, seq_weight, out)
        ctx.common = common
        ctx.cfg = cfg
        ctx.dual = dual
        ctx.kl_cap = kl_cap
        ctx.layout = layout
        ctx.shapes = (logprob.shape, logprob.dtype, None if entropy is None else (entropy.shape, entropy.dtype))
        ctx.mark_non_differentiable(out)
        return loss, out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_out):
        lp, old, adv, mask, ref, cu, seq_weight, out = ctx.saved_tensors
        cfg, layout = ctx.cfg, ctx.layout
        lp_shape, lp_dtype, ent_meta = ctx.shapes
        ent_grad = ent_meta is not None and cfg["entropy_coef"] != 0.0 and ctx.needs_input_grad[1]
        # Packed offsets on the GPU are not validated (no host sync), so tokens outside every
        # sequence must still get a defined gradient: start from zeros there.
        alloc = torch.empty if layout.padded else torch.zeros
        dlp = alloc(lp.numel(), dtype=lp_dtype, device=lp.device)
        dent = alloc(lp.numel(), dtype=ent_meta[1], device=lp.device) if ent_grad else dlp
        B, G = layout.num_seqs, ctx.common["G"]
        # The backward reads ref_logprob unless its KL derivative is the constant 1 (uncapped k1).
        ref_in_bwd = ctx.common["HAS_REF"] and (cfg["kl_type"] != "k1" or cfg["kl_cap"] is not None)
        _policy_loss_bwd_kernel[(B, G)](
            grad_loss.contiguous(),
            seq_weight,
            out,
            lp,
            old,
            adv,
            mask,
            ref,
            cu,
            dlp,
            dent,
            layout.seq_len,
            cfg["clip_low"],
            cfg["clip_high"],
            ctx.dual,
            LOG_RATIO_CLAMP,
            ctx.kl_cap,
            cfg["kl_coef"],
            cfg["entropy_coef"],
            ENT_GRAD=ent_grad,
            REF_IN_BWD=ref_in_bwd,
            SCALE_IDX=_OUT_SCALE,
            **ctx.common,
        )
        d_entropy = dent.view(ent_meta[0]) if ent_grad else None
        return dlp.view(lp_shape), d_entropy, None, None, None, None, None, None


def triton_available_for(t: Tensor) -> bool:
    """Whether the Triton path can run on this tensor: CUDA, or CPU under Triton's interpreter."""
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return True
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def policy_loss(
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
    impl: str = "auto",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Masked clipped policy-gradient loss (PPO / GRPO / REINFORCE++ family) and its metrics.

    Args:
        logprob: log-probs of the sampled tokens under the current policy; [B, T] (padded) or
            [total_tokens] (packed, with `cu_seqlens`). Receives the gradient.
        old_logprob: log-probs under the policy that sampled (same shape; no gradient).
        advantages: per token (same shape) or per sequence ([B], broadcast over its tokens).
        loss_mask: 1 (or True) for trained tokens, 0 for interpreter feedback, prompt and padding.
            Float values act as non-negative per-token weights.
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
        dual_clip: for A < 0, cap the loss at -A * dual_clip (must be > 1); None disables it.
        aggregation: "token-mean" | "seq-mean-token-sum" | "seq-mean-token-mean" |
            "seq-mean-token-sum-norm" (see `policy_loss_ref` for the formulas).
        ref_logprob, kl_coef, kl_type: add kl_coef * KL(logprob, ref) per token, kl_type "k1"
            (logprob - ref), "k2" (0.5 (logprob - ref)^2) or "k3" (exp(d) - d - 1, d = ref - logprob).
        kl_cap: clamp the per-token KL to [-kl_cap, kl_cap] before kl_coef and the aggregation,
            for every kl_type, so that one token far from the reference cannot dominate a step
            (uncapped k3 at a log-ratio of 10 is ~22015). Capped tokens get no KL gradient.
            Default 10 (as verl); must be > 0; None (or inf) disables the cap.
        entropy, entropy_coef: subtract entropy_coef * entropy per token; `entropy` receives a
            gradient when entropy_coef != 0.
        cu_seqlens: int32/int64 [B + 1] sequence offsets for packed 1-D inputs.
        max_seq_len_norm: the constant of seq-mean-token-sum-norm (default T for padded inputs;
            required for packed ones).
        impl: "auto" (Triton for CUDA tensors, torch elsewhere and for float64), "triton" (CUDA, or CPU under
            TRITON_INTERPRET=1), "torch" / "reference" (the plain torch implementation).

    Returns:
        (loss, metrics): a 0-dim float32 loss, and a dict of detached 0-dim float32 tensors:
        pg_loss, clipfrac_upper, clipfrac_lower, clipfrac_dual, approx_kl (mean of
        old_logprob - logprob), ratio_mean, ratio_max, plus kl_loss with ref_logprob and entropy
        with entropy. loss == pg_loss + kl_coef * kl_loss - entropy_coef * entropy. No metric
        forces a device sync.
    """
    if impl not in IMPLS:
        raise ValueError(f"policy_loss: impl={impl!r}; expected one of {IMPLS}")
    kwargs = dict(
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
    # float64 callers want float64 arithmetic, which the fp32 kernels do not give: torch path.
    use_triton = impl == "triton" or (
        impl == "auto" and logprob.is_cuda and HAS_TRITON and logprob.dtype != torch.float64
    )
    if not use_triton:
        return policy_loss_reference(logprob, old_logprob, advantages, loss_mask, **kwargs)
    if not triton_available_for(logprob):
        raise RuntimeError(
            "policy_loss(impl='triton') needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 set before "
            f"triton is imported, for CPU tensors); got a {logprob.device} tensor"
            + ("" if HAS_TRITON else " and triton is not installed")
        )
    layout = check_inputs(logprob, old_logprob, advantages, loss_mask, **kwargs)
    cfg = dict(
        clip_low=float(clip_low),
        clip_high=float(clip_high),
        dual_clip=None if dual_clip is None else float(dual_clip),
        aggregation=aggregation,
        kl_coef=float(kl_coef),
        kl_type=kl_type,
        kl_cap=effective_kl_cap(kl_cap),
        entropy_coef=float(entropy_coef),
    )
    loss, out = _PolicyLossTriton.apply(logprob, entropy, old_logprob, advantages, loss_mask, ref_logprob, layout, cfg)
    metrics = {name: out[i] for i, name in enumerate(_OUT_NAMES)}
    if ref_logprob is None:
        del metrics["kl_loss"]
    if entropy is None:
        del metrics["entropy"]
    return loss, metrics
