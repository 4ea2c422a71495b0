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

# Default size (in logits) of the largest [N, chunk] temporary of the chunked fallback: 2^23
# fp32 values = 32 MiB. Big enough that each chunk is one efficient matmul on CPU, small enough
# that the fallback's peak stays far below the naive form's at LM vocabulary sizes.
FALLBACK_CHUNK_ELEMENTS = 1 << 23
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
    """Vocabulary columns per chunk so that one [N, chunk] fp32 temporary is ~32 MiB."""
    chunk = max(_MIN_CHUNK, FALLBACK_CHUNK_ELEMENTS // max(num_rows, 1))
    return min(chunk, vocab)


def _chunk_logits(h: Tensor, weight: Tensor, v0: int, v1: int, inv_temp: float, cd: torch.dtype) -> Tensor:
    """z[:, v0:v1] in the compute dtype (a fresh tensor the caller may modify in place)."""
    z = h @ weight[v0:v1].to(cd).T
    return z.mul_(inv_temp)


class _ChunkedLinearLogprob(torch.autograd.Function):
    """Vocabulary-chunked forward (online log-sum-exp) and recomputing backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, ignore_index, chunk):
        cd = compute_dtype(hidden.dtype)
        n, vocab = hidden.shape[0], weight.shape[0]
        inv_temp = 1.0 / temperature
        h = hidden.to(cd)
        valid = targets != ignore_index
        # Running per-row statistics over the chunks seen so far, relative to the running max m:
        # s = sum exp(z - m), t = sum exp(z - m) * (z - m), target_z = the target's logit.
        m = torch.full((n,), float("-inf"), dtype=cd, device=hidden.device)
        s = torch.zeros(n, dtype=cd, device=hidden.device)
        t = torch.zeros(n, dtype=cd, device=hidden.device)
        target_z = torch.zeros(n, dtype=cd, device=hidden.device)
        for v0 in range(0, vocab, chunk):
            v1 = min(v0 + chunk, vocab)
            z = _chunk_logits(h, weight, v0, v1, inv_temp, cd)
            local = targets - v0
            inside = (local >= 0) & (local < v1 - v0)
            picked = z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            target_z += torch.where(inside, picked, torch.zeros_like(picked))
            m_new = torch.maximum(m, z.amax(dim=1))
            alpha = torch.exp(m - m_new)  # 0 on the first chunk (m = -inf)
            z.sub_(m_new[:, None])  # z now holds z - m_new
            e = torch.exp(z)
            if with_entropy:
                # Rescale t to the new max: sum e'(z - m_new) = alpha * (t + (m - m_new) * s);
                # on the first chunk s = 0 and m = -inf, so the shift is 0 (not -inf * 0).
                shift = torch.where(s > 0, (m - m_new) * s, torch.zeros_like(s))
                s_chunk = e.sum(dim=1)
                t = alpha * (t + shift) + e.mul_(z).sum(dim=1)
            else:
                s_chunk = e.sum(dim=1)
            s = alpha * s + s_chunk
            m = m_new
            del z, e
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
        vocab = weight.shape[0]
        inv_temp = 1.0 / ctx.temperature
        valid = targets != ctx.ignore_index
        # d(output)/dz combined with the upstream grads, zeroed on ignored rows; the final
        # 1/temperature of dz/dlogits is folded in here.
        g_lp = None if grad_logprob is None else torch.where(valid, grad_logprob.to(cd), 0.0) * inv_temp
        g_ent = None if grad_entropy is None else torch.where(valid, grad_entropy.to(cd), 0.0) * inv_temp
        h = hidden.to(cd)
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        for v0 in range(0, vocab, ctx.chunk):
            v1 = min(v0 + ctx.chunk, vocab)
            z = _chunk_logits(h, weight, v0, v1, inv_temp, cd)
            z.sub_(row_max[:, None]).sub_(log_s[:, None])  # log p
            p = torch.exp(z)
            # dz = g_lp * (onehot - p) - g_ent * p * (log p + entropy)
            if g_ent is not None:
                dz = z.add_(entropy[:, None]).mul_(p).mul_(-g_ent[:, None])
                if g_lp is not None:
                    dz.sub_(p.mul_(g_lp[:, None]))
            else:
                dz = p.mul_(-g_lp[:, None])
            if g_lp is not None:
                local = targets - v0
                inside = (local >= 0) & (local < v1 - v0)
                picked = torch.where(inside, g_lp, torch.zeros_like(g_lp))
                dz.scatter_add_(1, local.clamp(0, v1 - v0 - 1)[:, None], picked[:, None])
            if need_h:
                grad_h.addmm_(dz, weight[v0:v1].to(cd))
            if need_w:
                grad_w[v0:v1] = (dz.T @ h).to(weight.dtype)
            del z, p, dz
        if need_h:
            grad_h = grad_h.to(hidden.dtype)
        return grad_h, grad_w, None, None, None, None, None


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
