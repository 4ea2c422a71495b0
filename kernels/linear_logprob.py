"""Fused linear log-prob (and entropy): Triton kernels, autograd function and the dispatch.

`linear_logprob(hidden, weight, targets)` returns, per row i,

    logprob[i] = log_softmax(hidden[i] @ weight.T / temperature)[targets[i]]
    entropy[i] = entropy of that softmax                           (with_entropy=True)

without ever holding the [N, V] logits. The plain torch definitions (and the chunked CPU
fallback) live in `linear_logprob_ref.py`; design, cost model and tuning notes in
`NOTES_linear_logprob.md`.

Triton path (z = hidden @ weight.T / temperature, computed in fp32 by `tl.dot`):

* forward, grid (row blocks x vocabulary splits): each program walks its split of the
  vocabulary a [BLOCK_N, BLOCK_V] tile at a time, keeping an online log-sum-exp per row
  (running max m, s = sum exp(z - m), and for the entropy t = sum exp(z - m) * (z - m)) and
  picking up the target's logit when it falls in the tile. The per-split statistics
  ([4, splits, N] fp32) are merged in torch. Only the row max, log(sum exp(z - max)) and the
  entropy ([N] each) are saved; log p = (z - max) - log_s keeps full precision even for
  logits of ~1e4, where a rounded lse would shift every log p by ~1e-3.
* backward, per vocabulary chunk of `chunk_size` columns: a kernel recomputes the chunk's
  logits tile by tile and writes dz = dL/dlogits for that chunk ([N, chunk], input dtype; fp32
  for fp16 inputs); two GEMMs then give grad_weight[chunk] = dz.T @ hidden (complete, no
  accumulation across chunks) and add dz @ weight[chunk] into an fp32 grad_hidden. No atomics,
  deterministic, and no [N, V] tensor: the largest temporary is [N, chunk].

Gradient of one row (p = softmax(z), H = entropy, g_lp / g_ent the upstream grads):
    dlogprob/dz_j = onehot_j - p_j
    dH/dz_j       = -p_j * (z_j - sum_k p_k z_k) = -p_j * (log p_j + H)
    dL/dlogits_j  = (g_lp * (onehot_j - p_j) - g_ent * p_j * (log p_j + H)) / temperature
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .linear_logprob_ref import (
    LinearLogprobInputs,
    _chunked_from_inputs,
    _reshape_outputs,
    check_inputs,
    linear_logprob_chunked,
    linear_logprob_reference,
)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU installs without the triton extra use the torch fallback
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "IMPLS",
    "linear_logprob",
    "linear_logprob_triton",
    "linear_logprob_chunked",
    "linear_logprob_reference",
]

IMPLS = ("auto", "triton", "torch", "reference")

# Triton's interpreter runs kernels on CPU tensors (tests on machines without a GPU). It is
# chosen when triton.jit decorates the kernels, i.e. at import, so read the variable once.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Backward: largest [N, chunk] dz temporary, in elements (2^28 = 512 MiB in bf16), and at
# most 1/8 of the vocabulary per chunk so the temporary stays well below [N, V].
_DZ_CHUNK_ELEMENTS = 1 << 28
_DZ_CHUNK_MIN = 1024
_DZ_CHUNK_ALIGN = 256
# Forward: vocabulary splits are multiples of this many columns (whole tiles for every config).
_SPLIT_ALIGN = 256


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

if HAS_TRITON:
    if _INTERPRET:
        # One small config: autotuning in the interpreter is slow, and small blocks make the
        # tests cover many tiles and ragged edges on small shapes.
        _FWD_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16})]
        _BWD_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16, "GROUP_N": 2})]
    else:
        # H100/H200 candidates. SMEM per stage is (BLOCK_N + BLOCK_V) * BLOCK_H * elt bytes;
        # configs that do not fit (e.g. fp32 inputs with large tiles) fail to launch and the
        # autotuner drops them. Every config, forward and backward, uses BLOCK_H = 64: the
        # backward recomputes the logits with the same accumulation order over H as the
        # forward, so log p = (z - max) - log_s is consistent to the last bit (this matters
        # for very large logits, where one ulp of z is ~1e-3).
        _FWD_CONFIGS = [
            triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_H": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_H": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 64}, num_warps=4, num_stages=3),
        ]
        _BWD_CONFIGS = [
            triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 256, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=4, num_stages=3),
        ]

    @triton.jit
    def _scaled_logits_tile(
        h_ptr,
        w_ptr,
        rows64,
        row_mask,
        cols64,
        col_mask,
        H,
        stride_hn,
        stride_hh,
        stride_wv,
        stride_wh,
        inv_temp,
        DOT_IEEE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        """One [BLOCK_N, BLOCK_V] tile of logits / temperature: hidden rows x weight columns,
        accumulated in fp32 over H. Shared by the forward and the backward (which recomputes)."""
        offs_h = tl.arange(0, BLOCK_H)
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + offs_h
            k_mask = ks < H
            h = tl.load(
                h_ptr + rows64[:, None] * stride_hn + ks[None, :] * stride_hh,
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            # weight tile loaded transposed, [BLOCK_H, BLOCK_V]
            w = tl.load(
                w_ptr + cols64[None, :] * stride_wv + ks[:, None] * stride_wh,
                mask=col_mask[None, :] & k_mask[:, None],
                other=0.0,
            )
            if DOT_IEEE:
                acc = tl.dot(h, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(h, w, acc)
        return acc * inv_temp

    @triton.autotune(configs=_FWD_CONFIGS, key=["H", "V", "ROWS_BUCKET"])
    @triton.jit
    def _linear_logprob_fwd_kernel(
        h_ptr,  # [N, H]
        w_ptr,  # [V, H]
        tgt_ptr,  # [N] int64, contiguous
        part_ptr,  # [4, num_splits, N] fp32: running max, sum exp, sum exp * (z - max), target z
        N,
        V,
        H,
        SPLIT,  # vocabulary columns per split (the last split may be shorter)
        ROWS_BUCKET,  # autotuning key only: power of two of N
        stride_hn,
        stride_hh,
        stride_wv,
        stride_wh,
        inv_temp,
        WITH_ENTROPY: tl.constexpr,
        DOT_IEEE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        # Row block is the fastest-varying program id, so programs running together share the
        # same vocabulary split and stream the same weight tiles through L2.
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        num_splits = tl.num_programs(1)

        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        rows64 = rows.to(tl.int64)
        tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)

        v_start = pid_s * SPLIT
        v_end = tl.minimum(v_start + SPLIT, V)
        offs_v = tl.arange(0, BLOCK_V)

        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        t = tl.zeros([BLOCK_N], tl.float32)
        target_z = tl.zeros([BLOCK_N], tl.float32)

        for v0 in range(v_start, v_end, BLOCK_V):
            cols = v0 + offs_v
            col_mask = cols < v_end
            cols64 = cols.to(tl.int64)
            z = _scaled_logits_tile(
                h_ptr,
                w_ptr,
                rows64,
                row_mask,
                cols64,
                col_mask,
                H,
                stride_hn,
                stride_hh,
                stride_wv,
                stride_wh,
                inv_temp,
                DOT_IEEE,
                BLOCK_N,
                BLOCK_V,
                BLOCK_H,
            )

            # Every tile holds at least one valid column, so m_new is finite from the first
            # tile on and s >= 1 afterwards (the max element contributes exp(0)).
            m_new = tl.maximum(m, tl.max(tl.where(col_mask[None, :], z, float("-inf")), axis=1))
            alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf)
            # Padding columns get zc = 0 (not z - m_new, which can overflow exp) and e = 0.
            zc = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
            e = tl.where(col_mask[None, :], tl.exp(zc), 0.0)
            if WITH_ENTROPY:
                # Rescale t to the new max: sum e'(z - m_new) = alpha * (t + (m - m_new) * s).
                # Before the first tile s = 0 and m = -inf: the shift must be 0, not -inf * 0.
                shift = (tl.where(s > 0.0, m, m_new) - m_new) * s
                t = alpha * (t + shift) + tl.sum(e * zc, axis=1)
            s = alpha * s + tl.sum(e, axis=1)
            m = m_new

            hit = (cols[None, :] == tgt[:, None]) & col_mask[None, :]
            target_z += tl.sum(tl.where(hit, z, 0.0), axis=1)

        plane = num_splits * N
        out = part_ptr + pid_s * N + rows
        tl.store(out, m, mask=row_mask)
        tl.store(out + plane, s, mask=row_mask)
        tl.store(out + 2 * plane, t, mask=row_mask)
        tl.store(out + 3 * plane, target_z, mask=row_mask)

    @triton.autotune(configs=_BWD_CONFIGS, key=["H", "ROWS_BUCKET"])
    @triton.jit
    def _linear_logprob_dlogits_kernel(
        h_ptr,  # [N, H]
        w_ptr,  # [V, H]
        tgt_ptr,  # [N] int64, contiguous
        max_ptr,  # [N] fp32: row max of z
        log_s_ptr,  # [N] fp32: log sum exp(z - max)
        ent_ptr,  # [N] fp32 (read only when HAS_GRAD_ENTROPY)
        g_lp_ptr,  # [N] fp32: grad of logprob / temperature, 0 on ignored rows
        g_ent_ptr,  # [N] fp32: grad of entropy / temperature, 0 on ignored rows
        dz_ptr,  # [N, VC] out: dL/dlogits for vocabulary columns [v_off, v_off + VC)
        N,
        H,
        v_off,
        VC,
        ROWS_BUCKET,  # autotuning key only: power of two of N
        stride_hn,
        stride_hh,
        stride_wv,
        stride_wh,
        stride_dzn,
        inv_temp,
        HAS_GRAD_LOGPROB: tl.constexpr,
        HAS_GRAD_ENTROPY: tl.constexpr,
        DOT_IEEE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        GROUP_N: tl.constexpr,
    ):
        # Grouped program order: GROUP_N row blocks sweep the vocabulary columns together, so
        # their hidden tiles and the weight tiles are reused from L2.
        pid = tl.program_id(0)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_v = tl.cdiv(VC, BLOCK_V)
        num_pid_in_group = GROUP_N * num_pid_v
        group_id = pid // num_pid_in_group
        first_n = group_id * GROUP_N
        group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
        pid_n = first_n + (pid % num_pid_in_group) % group_size
        pid_v = (pid % num_pid_in_group) // group_size

        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        rows64 = rows.to(tl.int64)
        local_cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = local_cols < VC
        cols = v_off + local_cols
        cols64 = cols.to(tl.int64)
        z = _scaled_logits_tile(
            h_ptr,
            w_ptr,
            rows64,
            row_mask,
            cols64,
            col_mask,
            H,
            stride_hn,
            stride_hh,
            stride_wv,
            stride_wh,
            inv_temp,
            DOT_IEEE,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
        )

        row_max = tl.load(max_ptr + rows, mask=row_mask, other=0.0)
        log_s = tl.load(log_s_ptr + rows, mask=row_mask, other=0.0)
        # Padding lanes (not stored) get log p = 0 so they cannot overflow (z = 0 there while
        # the row max may be very negative).
        in_tile = row_mask[:, None] & col_mask[None, :]
        log_p = tl.where(in_tile, (z - row_max[:, None]) - log_s[:, None], 0.0)
        p = tl.exp(log_p)
        dz = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        if HAS_GRAD_LOGPROB:
            g_lp = tl.load(g_lp_ptr + rows, mask=row_mask, other=0.0)
            tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
            onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
            dz += g_lp[:, None] * (onehot - p)
        if HAS_GRAD_ENTROPY:
            g_ent = tl.load(g_ent_ptr + rows, mask=row_mask, other=0.0)
            ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
            dz -= g_ent[:, None] * p * (log_p + ent[:, None])

        tl.store(
            dz_ptr + rows64[:, None] * stride_dzn + local_cols[None, :],
            dz.to(dz_ptr.dtype.element_ty),
            mask=in_tile,
        )


# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------


def _rows_bucket(num_rows: int) -> int:
    """Autotuning key for the row count: its power of two, capped (N varies from step to step)."""
    return min(triton.next_power_of_2(max(num_rows, 1)), 1 << 15)


_SM_COUNT: dict[int, int] = {}


def _target_programs(device: torch.device) -> int:
    """Programs to aim for in the forward grid: two waves over the GPU's SMs."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 2 * _SM_COUNT[index]


def _default_vocab_split(num_rows: int, vocab: int, device: torch.device) -> int:
    """Columns per vocabulary split: split only when there are too few row blocks to fill the GPU."""
    row_blocks = math.ceil(num_rows / 64)  # nominal BLOCK_N; the autotuned one may differ
    splits = max(1, math.ceil(_target_programs(device) / max(row_blocks, 1)))
    splits = min(splits, math.ceil(vocab / _SPLIT_ALIGN))
    split = math.ceil(vocab / splits)
    return math.ceil(split / _SPLIT_ALIGN) * _SPLIT_ALIGN


def _default_dz_chunk(num_rows: int, vocab: int) -> int:
    """Vocabulary columns per backward chunk (see _DZ_CHUNK_ELEMENTS)."""
    chunk = min(_DZ_CHUNK_ELEMENTS // max(num_rows, 1), math.ceil(vocab / 8))
    chunk = max(_DZ_CHUNK_MIN, math.ceil(chunk / _DZ_CHUNK_ALIGN) * _DZ_CHUNK_ALIGN)
    return min(chunk, vocab)


def _forward_stats(
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, with_entropy: bool, vocab_split: int
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Run the forward kernel; return (row_max, log_s, target_z, entropy or None), all [N] fp32."""
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    num_splits = math.ceil(vocab / vocab_split)
    part = torch.empty((4, num_splits, n), dtype=torch.float32, device=hidden.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), num_splits)

    _linear_logprob_fwd_kernel[grid](
        hidden,
        weight,
        targets,
        part,
        n,
        vocab,
        hdim,
        vocab_split,
        _rows_bucket(n),
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        1.0 / temperature,
        WITH_ENTROPY=with_entropy,
        DOT_IEEE=hidden.dtype == torch.float32,
    )
    # Merge the per-split statistics (each split holds >= 1 column, so every m is finite).
    m, s, t, target_z = part.unbind(0)
    m_max = m.max(dim=0).values
    scale = torch.exp(m - m_max)
    s_total = (scale * s).sum(dim=0)
    log_s = torch.log(s_total)
    target_z = target_z.sum(dim=0)
    entropy = None
    if with_entropy:
        t_total = (scale * (t + (m - m_max) * s)).sum(dim=0)
        entropy = log_s - t_total / s_total
    return m_max, log_s, target_z, entropy


class _TritonLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, ignore_index, chunk_size, vocab_split):
        ctx.set_materialize_grads(False)
        row_max, log_s, target_z, entropy = _forward_stats(
            hidden, weight, targets, temperature, with_entropy, vocab_split
        )
        valid = targets != ignore_index
        zero = torch.zeros_like(log_s)
        logprob = torch.where(valid, (target_z - row_max) - log_s, zero)
        entropy = torch.where(valid, entropy, zero) if with_entropy else zero
        ctx.save_for_backward(hidden, weight, targets, row_max, log_s, entropy)
        ctx.temperature = temperature
        ctx.with_entropy = with_entropy
        ctx.ignore_index = ignore_index
        ctx.chunk_size = chunk_size
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprob, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, targets, row_max, log_s, entropy = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not ctx.with_entropy:
            grad_entropy = None
        if (grad_logprob is None and grad_entropy is None) or not (need_h or need_w):
            return None, None, None, None, None, None, None, None
        grad_h, grad_w = _backward(
            hidden, weight, targets, row_max, log_s, entropy, grad_logprob, grad_entropy,
            ctx.temperature, ctx.ignore_index, ctx.chunk_size, need_h, need_w,
        )  # fmt: skip
        return grad_h, grad_w, None, None, None, None, None, None


def _backward(hidden, weight, targets, row_max, log_s, entropy, grad_logprob, grad_entropy,
              temperature, ignore_index, chunk_size, need_h, need_w):  # fmt: skip
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    inv_temp = 1.0 / temperature
    valid = targets != ignore_index
    # Upstream grads times dz/dlogits' 1/temperature, zeroed on ignored rows.
    g_lp = None if grad_logprob is None else torch.where(valid, grad_logprob.float(), 0.0) * inv_temp
    g_ent = None if grad_entropy is None else torch.where(valid, grad_entropy.float(), 0.0) * inv_temp
    dummy = log_s  # placeholder pointer for an unused [N] fp32 argument

    # dz is stored in the input dtype for bf16 (same exponent range as fp32) and fp32, but in
    # fp32 for fp16: scaled gradients (e.g. 1/num_tokens * p) would underflow fp16.
    dz_dtype = torch.float32 if hidden.dtype == torch.float16 else hidden.dtype
    mm_hidden = hidden if dz_dtype == hidden.dtype else hidden.float()
    chunk = min(chunk_size, vocab) if chunk_size is not None else _default_dz_chunk(n, vocab)
    num_chunks = math.ceil(vocab / chunk)

    grad_h = None
    if need_h and num_chunks > 1:
        grad_h = torch.zeros((n, hdim), dtype=torch.float32, device=hidden.device)
    grad_w = torch.empty_like(weight) if need_w else None

    for v0 in range(0, vocab, chunk):
        vc = min(chunk, vocab - v0)
        dz = torch.empty((n, vc), dtype=dz_dtype, device=hidden.device)

        def grid(meta, vc=vc):
            return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(vc, meta["BLOCK_V"]),)

        _linear_logprob_dlogits_kernel[grid](
            hidden,
            weight,
            targets,
            row_max,
            log_s,
            entropy if g_ent is not None else dummy,
            g_lp if g_lp is not None else dummy,
            g_ent if g_ent is not None else dummy,
            dz,
            n,
            hdim,
            v0,
            vc,
            _rows_bucket(n),
            hidden.stride(0),
            hidden.stride(1),
            weight.stride(0),
            weight.stride(1),
            dz.stride(0),
            inv_temp,
            HAS_GRAD_LOGPROB=g_lp is not None,
            HAS_GRAD_ENTROPY=g_ent is not None,
            DOT_IEEE=hidden.dtype == torch.float32,
        )
        w_chunk = weight[v0 : v0 + vc]
        if dz_dtype != weight.dtype:
            w_chunk = w_chunk.to(dz_dtype)
        if need_w:
            grad_w[v0 : v0 + vc] = dz.T @ mm_hidden
        if need_h:
            if num_chunks == 1:
                grad_h = dz @ w_chunk
            elif dz_dtype == torch.float32:
                grad_h.addmm_(dz, w_chunk)
            else:  # bf16: the GEMM accumulates in fp32, the sum over chunks in fp32 too
                grad_h += dz @ w_chunk
        del dz
    if need_h:
        grad_h = grad_h.to(hidden.dtype)
    return grad_h, grad_w


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _empty_result(inp: LinearLogprobInputs, with_entropy: bool):
    return _chunked_from_inputs(inp, with_entropy, None)


def linear_logprob_triton(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    vocab_split: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The Triton path of `linear_logprob` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

    `chunk_size`: vocabulary columns per backward chunk (the [N, chunk] dz temporary); default
    min(2^28 / N, V / 8) rounded up to a multiple of 256, at least 1024.
    `vocab_split`: vocabulary columns per forward program; default splits the vocabulary only
    when N has too few row blocks to fill the GPU.
    """
    if not HAS_TRITON:
        raise RuntimeError("linear_logprob: impl='triton' needs the triton package (pip install 'cir[triton]')")
    inp = check_inputs(hidden, weight, targets, temperature, ignore_index)
    return _triton_from_inputs(inp, with_entropy, chunk_size, vocab_split)


def _triton_from_inputs(inp: LinearLogprobInputs, with_entropy: bool, chunk_size, vocab_split):
    h, w = inp.hidden, inp.weight
    if h.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"linear_logprob: impl='triton' supports fp16, bf16 and fp32, got {h.dtype}")
    if h.device.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"linear_logprob: impl='triton' needs CUDA tensors (got {h.device}); "
            "set TRITON_INTERPRET=1 before importing cir to run the kernels on CPU"
        )
    n, vocab = h.shape[0], w.shape[0]
    if n == 0:
        return _empty_result(inp, with_entropy)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"linear_logprob: chunk_size must be >= 1, got {chunk_size}")
    if vocab_split is None:
        vocab_split = _default_vocab_split(n, vocab, h.device)
    elif int(vocab_split) < 1:
        raise ValueError(f"linear_logprob: vocab_split must be >= 1, got {vocab_split}")
    logprob, entropy = _TritonLinearLogprob.apply(
        h,
        w,
        inp.targets.contiguous(),
        inp.temperature,
        with_entropy,
        inp.ignore_index,
        None if chunk_size is None else int(chunk_size),
        min(int(vocab_split), vocab),
    )
    return _reshape_outputs(logprob, entropy if with_entropy else None, inp.lead_shape)


def linear_logprob(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each target token (and the entropy) under softmax(hidden @ weight.T / temperature).

    Args:
        hidden: [..., H] last hidden states (fp16, bf16, fp32; fp64 on the torch paths).
        weight: [V, H] LM-head weight, same dtype and device as hidden.
        targets: [...] token ids in [0, V), or `ignore_index` for rows to skip.
        temperature: the sampling temperature the logits are divided by (> 0).
        with_entropy: also return the entropy of each row's distribution.
        ignore_index: target value whose rows give logprob = entropy = 0 and zero gradient.
        impl: "auto" (Triton for CUDA tensors when triton imports, else the chunked torch
            fallback), "triton", "torch" (the chunked fallback) or "reference" (the naive
            form that materialises [N, V] logits; for tests and benchmarks).
        chunk_size: vocabulary columns per chunk: the fallback's [N, chunk] temporaries, or
            the Triton backward's [N, chunk] dz buffer. Default: chosen from N and V.

    Returns:
        (logprob, entropy): fp32 tensors shaped like `targets` (float64 for float64 inputs);
        entropy is None unless `with_entropy`. Both are differentiable with respect to hidden
        and weight; gradients come back in the input dtypes. The logits are never held whole:
        peak extra memory is O(N * chunk), not O(N * V) (except impl="reference").
    """
    if impl not in IMPLS:
        raise ValueError(f"linear_logprob: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return linear_logprob_reference(hidden, weight, targets, temperature, with_entropy, ignore_index)
    inp = check_inputs(hidden, weight, targets, temperature, ignore_index)
    if impl == "auto":
        use_triton = HAS_TRITON and inp.hidden.is_cuda and inp.hidden.dtype != torch.float64
        impl = "triton" if use_triton else "torch"
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("linear_logprob: impl='triton' needs the triton package (pip install 'cir[triton]')")
        return _triton_from_inputs(inp, with_entropy, chunk_size, None)
    return _chunked_from_inputs(inp, with_entropy, chunk_size)
