"""Plain torch forms of `linear_logprob`: the naive reference and the chunked fallback.

`linear_logprob_reference` materialises the full [N, V] logits and lets autograd do the rest.
It is the ground truth in tests (pass float64 tensors to get float64 arithmetic) and the
"naive" baseline in benchmarks. Its memory grows as N * V.

`linear_logprob_chunked` computes the same numbers with bounded memory and no Triton. It
walks the vocabulary in chunks of `chunk_size` columns with an online log-sum-exp, exactly the
algorithm of the Triton kernel, saves only per-row statistics (log-sum-exp and entropy) for
backward, and recomputes each chunk's logits there. Peak extra memory is O(N * chunk_size),
not O(N * V). This is the path the trainer uses on CPU (and on CUDA without Triton).

Definitions (shared by every implementation), with z = hidden @ weight.T / temperature:
    logprob[i] = z[i, targets[i]] - logsumexp(z[i])
    entropy[i] = -sum_j p[i, j] * log p[i, j],  p = softmax(z[i])
Rows whose target equals `ignore_index` give 0 for both and receive zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Default size (in logits) of each [N, chunk] temporary of the chunked fallback: 2^21 fp32
# values = 8 MiB. Each chunk is still one efficient matmul on a CPU, and its two temporaries stay
# in the last-level cache between the passes over them; the fallback's peak stays far below the
# naive form's at LM vocabulary sizes.
FALLBACK_CHUNK_ELEMENTS = 1 << 21
_MIN_CHUNK = 128


@dataclass(frozen=True)
class LinearLogprobInputs:
    """Validated, flattened inputs shared by every implementation."""

    hidden: Tensor  # [N, H]
    weight: Tensor  # [V, H]
    targets: Tensor  # [N], int64
    lead_shape: torch.Size  # the leading dims of the caller's hidden, to reshape outputs
    temperature: float
    ignore_index: int


def check_inputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float,
    ignore_index: int,
    check_target_range: bool = True,
) -> LinearLogprobInputs:
    """Validate shapes, dtypes and devices; flatten hidden [..., H] to [N, H].

    `check_target_range` verifies that every target is in [0, V) or equals `ignore_index`
    (one host sync on CUDA; the cost is negligible next to the 2*N*H*V matmul).
    """
    if not isinstance(hidden, Tensor) or not isinstance(weight, Tensor) or not isinstance(targets, Tensor):
        raise TypeError("linear_logprob: hidden, weight and targets must be torch tensors")
    if hidden.dim() < 1:
        raise ValueError(f"linear_logprob: hidden must have shape [..., H], got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"linear_logprob: weight must have shape [V, H], got {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_logprob: hidden size mismatch: hidden is {tuple(hidden.shape)} (H={hidden.shape[-1]}) "
            f"but weight is {tuple(weight.shape)} (H={weight.shape[1]})"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_logprob: targets must have shape {tuple(hidden.shape[:-1])} (hidden's leading dims), "
            f"got {tuple(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"linear_logprob: targets must be an integer tensor, got {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"linear_logprob: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"linear_logprob: unsupported dtype {hidden.dtype} (use fp16, bf16, fp32 or fp64)")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(
            f"linear_logprob: hidden ({hidden.device}), weight ({weight.device}) and targets ({targets.device}) "
            "must be on the same device"
        )
    temperature = float(temperature)
    if not temperature > 0.0 or temperature != temperature or temperature == float("inf"):
        raise ValueError(f"linear_logprob: temperature must be a positive finite number, got {temperature}")
    if weight.shape[0] == 0:
        raise ValueError("linear_logprob: weight has an empty vocabulary (V = 0)")

    lead_shape = hidden.shape[:-1]
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    targets1 = targets.reshape(-1).long()
    vocab = weight.shape[0]
    if check_target_range and targets1.numel() > 0:
        bad = ((targets1 < 0) | (targets1 >= vocab)) & (targets1 != ignore_index)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"linear_logprob: targets[{first}] = {int(targets1[first])} is outside the vocabulary "
                f"[0, {vocab}) and is not ignore_index ({ignore_index}) (index into the flattened targets)"
            )
    return LinearLogprobInputs(hidden2, weight, targets1, lead_shape, temperature, int(ignore_index))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of the torch paths: float64 stays float64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_logprob_reference(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor | None]:
    """Naive `linear_logprob`: materialise the [N, V] logits, log_softmax, gather.

    Arithmetic is fp32 (float64 for float64 inputs, which makes it the ground truth in tests);
    outputs have that dtype and hidden's leading shape. Differentiable by plain autograd.
    """
    inp = check_inputs(hidden, weight, targets, temperature, ignore_index)
    cd = compute_dtype(inp.hidden.dtype)
    logits = (inp.hidden.to(cd) @ inp.weight.to(cd).T) / inp.temperature
    logp = torch.log_softmax(logits, dim=-1)
    valid = inp.targets != inp.ignore_index
    safe_targets = torch.where(valid, inp.targets, torch.zeros_like(inp.targets))
    logprob = logp.gather(1, safe_targets[:, None]).squeeze(1)
    logprob = torch.where(valid, logprob, torch.zeros_like(logprob)).reshape(inp.lead_shape)
    if not with_entropy:
        return logprob, None
    entropy = -(logp.exp() * logp).sum(dim=-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy)).reshape(inp.lead_shape)
    return logprob, entropy


def default_fallback_chunk(num_rows: int, vocab: int) -> int:
    """Vocabulary columns per chunk so that one [N, chunk] temporary is FALLBACK_CHUNK_ELEMENTS."""
    chunk = max(_MIN_CHUNK, FALLBACK_CHUNK_ELEMENTS // max(num_rows, 1))
    return min(chunk, vocab)


class _TargetsByChunk:
    """Which rows have their target in which vocabulary chunk, sorted once, so that a chunk's
    target logits are picked up with one gather (no per-chunk scan over every row)."""

    def __init__(self, targets: Tensor, valid: Tensor, chunk: int, num_chunks: int):
        rows = valid.nonzero().squeeze(1)
        which = targets.index_select(0, rows) // chunk
        order = torch.argsort(which, stable=True)
        self.rows = rows.index_select(0, order)
        self.cols = targets.index_select(0, self.rows) - which.index_select(0, order) * chunk
        counts = torch.bincount(which, minlength=num_chunks).tolist()
        self.offsets = [0]
        for c in counts:
            self.offsets.append(self.offsets[-1] + c)

    def of(self, k: int) -> tuple[Tensor, Tensor] | None:
        """(rows, their target's column within chunk k), or None when no target falls there."""
        lo, hi = self.offsets[k], self.offsets[k + 1]
        return None if lo == hi else (self.rows[lo:hi], self.cols[lo:hi])


def _scaled_hidden(hidden: Tensor, temperature: float, cd: torch.dtype) -> Tensor:
    """hidden / temperature in the compute dtype: (h / T) @ W.T is the scaled logits, so no chunk
    needs its own pass to divide by T."""
    h = hidden.to(cd)
    return h if temperature == 1.0 else h * (1.0 / temperature)


def _weight_chunk(weight: Tensor, v0: int, v1: int, cd: torch.dtype) -> Tensor:
    w = weight[v0:v1]
    return w if w.dtype == cd else w.to(cd)


class _ChunkedLinearLogprob(torch.autograd.Function):
    """Vocabulary-chunked forward (per-chunk log-sum-exp, merged online) and a recomputing
    backward, both written to make as few passes over each [N, chunk] block as torch allows.

    Cost on a CPU (fp32, N rows, H hidden, V vocabulary): the forward is one GEMM (2NHV) and four
    cheap passes per chunk (max, subtract, exp, sum; two more for the entropy); the backward
    recomputes the logits (2NHV, the price of bounded memory), forms dz in three or four passes and
    runs two GEMMs (4NHV), writing grad_weight's rows in place. Targets and the one-hot part of
    the gradient are handled once for all chunks, not per chunk. Rows whose upstream gradients are
    all zero (ignored rows, interpreter feedback, zero advantages) are left out of the backward's
    GEMMs. The chunk is chosen so a [N, chunk] block stays in the CPU's caches between passes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, ignore_index, chunk):
        cd = compute_dtype(hidden.dtype)
        n, vocab = hidden.shape[0], weight.shape[0]
        h = _scaled_hidden(hidden, temperature, cd)
        valid = targets != ignore_index
        num_chunks = -(-vocab // chunk)
        picks = _TargetsByChunk(targets, valid, chunk, num_chunks)
        # Running per-row statistics over the chunks seen so far, relative to the running max m:
        # s = sum exp(z - m), t = sum exp(z - m) * (z - m); the target's logit.
        m = torch.full((n,), float("-inf"), dtype=cd, device=hidden.device)
        s = torch.zeros(n, dtype=cd, device=hidden.device)
        t = torch.zeros(n, dtype=cd, device=hidden.device) if with_entropy else None
        target_z = torch.zeros(n, dtype=cd, device=hidden.device)
        z_buf = torch.empty((n, min(chunk, vocab)), dtype=cd, device=hidden.device)
        e_buf = torch.empty_like(z_buf)
        for k in range(num_chunks):
            v0, v1 = k * chunk, min((k + 1) * chunk, vocab)
            z, e = z_buf[:, : v1 - v0], e_buf[:, : v1 - v0]
            torch.mm(h, _weight_chunk(weight, v0, v1, cd).T, out=z)
            pick = picks.of(k)
            if pick is not None:
                target_z.index_copy_(0, pick[0], z[pick[0], pick[1]])
            m_chunk = z.amax(dim=1)
            z.sub_(m_chunk[:, None])  # z - m_chunk <= 0
            torch.exp(z, out=e)
            s_chunk = e.sum(dim=1)
            t_chunk = e.mul_(z).sum(dim=1) if with_entropy else None
            # Merge: rescale both sides to the new max (alpha = 0 on the first chunk, m = -inf).
            m_new = torch.maximum(m, m_chunk)
            alpha, beta = torch.exp(m - m_new), torch.exp(m_chunk - m_new)
            if with_entropy:
                # sum e'(z - m_new) = alpha (t + (m - m_new) s) + beta (t_c + (m_c - m_new) s_c);
                # before the first chunk s = 0 and m = -inf: that shift must be 0, not -inf * 0.
                shift = torch.where(s > 0, (m - m_new) * s, torch.zeros_like(s))
                t = alpha * (t + shift) + beta * (t_chunk + (m_chunk - m_new) * s_chunk)
            s = alpha * s + beta * s_chunk
            m = m_new
        del z_buf, e_buf
        # log p = (z - m) - log s: keeping the row max m apart from the small log s avoids the
        # rounding of a large lse (logits of ~1e4 would otherwise lose ~1e-3 of every log p).
        log_s = torch.log(s)
        zero = torch.zeros_like(log_s)
        logprob = torch.where(valid, (target_z - m) - log_s, zero)
        entropy = torch.where(valid, log_s - t / s, zero) if with_entropy else zero
        ctx.save_for_backward(hidden, weight, targets, m, log_s, entropy)
        ctx.temperature = temperature
        ctx.with_entropy = with_entropy
        ctx.ignore_index = ignore_index
        ctx.chunk = chunk
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        out_dtype = torch.float64 if cd == torch.float64 else torch.float32
        return logprob.to(out_dtype), entropy.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, targets, row_max, log_s, entropy = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not ctx.with_entropy:
            grad_entropy = None
        if grad_logprob is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        cd = compute_dtype(hidden.dtype)
        n, vocab, chunk = hidden.shape[0], weight.shape[0], ctx.chunk
        inv_temp = 1.0 / ctx.temperature
        valid = targets != ctx.ignore_index
        # dL/dz for the scaled logits z = (h / T) @ W.T, row i, column j:
        #   g_lp (onehot_j - p_j) - g_ent p_j (log p_j + entropy) = p_j (a + b log p_j) + g_lp onehot_j
        # with a = -(g_lp + g_ent entropy), b = -g_ent, zero on ignored rows.
        g_lp = None if grad_logprob is None else torch.where(valid, grad_logprob.to(cd), 0.0)
        g_ent = None if grad_entropy is None else torch.where(valid, grad_entropy.to(cd), 0.0)
        active = torch.zeros_like(valid)
        for g in (g_lp, g_ent):
            if g is not None:
                active |= g != 0
        rows = active.nonzero().squeeze(1)
        h = _scaled_hidden(hidden, ctx.temperature, cd)
        grad_h = torch.zeros((n, hidden.shape[1]), dtype=cd, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
        if rows.numel() > 0:
            all_rows = rows.numel() == n
            pick = (lambda x: x) if all_rows else (lambda x: x.index_select(0, rows))
            h_a, m_a, log_s_a = pick(h), pick(row_max), pick(log_s)
            a = torch.zeros(rows.numel(), dtype=cd, device=hidden.device)
            if g_lp is not None:
                a -= pick(g_lp)
            b = None
            if g_ent is not None:
                b = -pick(g_ent)
                a += b * pick(entropy)
            a, b = a[:, None], (None if b is None else b[:, None])
            gh_a = torch.zeros_like(h_a) if need_h else None
            z_buf = torch.empty((rows.numel(), min(chunk, vocab)), dtype=cd, device=hidden.device)
            p_buf = torch.empty_like(z_buf)
            gw_buf = (
                None if weight.dtype == cd else torch.empty((min(chunk, vocab), h.shape[1]), dtype=cd, device=h.device)
            )
            for v0 in range(0, vocab, chunk):
                v1 = min(v0 + chunk, vocab)
                z, p = z_buf[:, : v1 - v0], p_buf[:, : v1 - v0]
                w_chunk = _weight_chunk(weight, v0, v1, cd)
                torch.mm(h_a, w_chunk.T, out=z)
                z.sub_(m_a[:, None]).sub_(log_s_a[:, None])  # log p
                torch.exp(z, out=p)
                if b is not None:
                    dz = z.mul_(b).add_(a).mul_(p)
                else:
                    dz = p.mul_(a)
                if need_h:
                    gh_a.addmm_(dz, w_chunk)
                if need_w:
                    if gw_buf is None:
                        torch.mm(dz.T, h_a, out=grad_w[v0:v1])
                    else:
                        gw = gw_buf[: v1 - v0]
                        torch.mm(dz.T, h_a, out=gw)
                        grad_w[v0:v1] = gw
            if need_h:
                if all_rows:
                    grad_h = gh_a
                else:
                    grad_h.index_copy_(0, rows, gh_a)
        if g_lp is not None:
            # The one-hot part, g_lp at each row's target: its rows of W and of h, once.
            safe = torch.where(valid, targets, torch.zeros_like(targets))
            if need_h:
                grad_h.addcmul_(g_lp[:, None], _rows_of(weight, safe, cd))
            if need_w:
                grad_w.index_add_(0, safe, (g_lp[:, None] * h).to(weight.dtype))
        if need_h:
            grad_h = grad_h.mul_(inv_temp).to(hidden.dtype)
        return grad_h, grad_w, None, None, None, None, None


def _rows_of(weight: Tensor, index: Tensor, cd: torch.dtype) -> Tensor:
    rows = weight.index_select(0, index)
    return rows if rows.dtype == cd else rows.to(cd)


def _reshape_outputs(logprob: Tensor, entropy: Tensor | None, lead_shape: torch.Size):
    """Give the outputs hidden's leading shape (no view op when it is already [N])."""
    if logprob.shape != lead_shape:
        logprob = logprob.reshape(lead_shape)
        entropy = None if entropy is None else entropy.reshape(lead_shape)
    return logprob, entropy


def linear_logprob_chunked(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Bounded-memory torch `linear_logprob` (see the module docstring).

    `chunk_size` is the number of vocabulary columns per chunk (default: so that one [N, chunk]
    fp32 temporary is ~32 MiB). Peak extra memory is a few [N, chunk] temporaries plus the
    gradients themselves. Outputs are fp32 (float64 for float64 inputs) with hidden's leading
    shape; gradients come back in the input dtypes.
    """
    inp = check_inputs(hidden, weight, targets, temperature, ignore_index)
    return _chunked_from_inputs(inp, with_entropy, chunk_size)


def _chunked_from_inputs(inp: LinearLogprobInputs, with_entropy: bool, chunk_size: int | None):
    n, vocab = inp.hidden.shape[0], inp.weight.shape[0]
    if chunk_size is None:
        chunk = default_fallback_chunk(n, vocab)
    else:
        if int(chunk_size) < 1:
            raise ValueError(f"linear_logprob: chunk_size must be >= 1, got {chunk_size}")
        chunk = min(int(chunk_size), vocab)
    if n == 0:
        cd = compute_dtype(inp.hidden.dtype)
        empty = inp.hidden.new_zeros(inp.lead_shape, dtype=cd) + inp.hidden.sum() * 0 + inp.weight.sum() * 0
        return empty, (empty.clone() if with_entropy else None)
    logprob, entropy = _ChunkedLinearLogprob.apply(
        inp.hidden, inp.weight, inp.targets, inp.temperature, with_entropy, inp.ignore_index, chunk
    )
    return _reshape_outputs(logprob, entropy if with_entropy else None, inp.lead_shape)
