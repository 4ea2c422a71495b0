"""The LM head, log-softmax and a token-separable loss in one pass: gradients during the forward.

`linear_loss(hidden, weight, targets, token_loss)` computes, with z = hidden @ weight.T / T,

    logprob[i] = log_softmax(z[i])[targets[i]],    entropy[i] = entropy of softmax(z[i]),
    loss       = sum over row slices of token_loss(rows, logprob[rows], entropy[rows]),

and the gradients of `loss` with respect to hidden and weight, in 6 N H V FLOPs with bounded
memory: the rows are taken a chunk at a time, each chunk's probabilities over the whole
vocabulary ([rows, V], bounded by a byte budget) are kept while the chunk's share of the loss
and its gradient dL/dlogprob, dL/dentropy are computed (torch autograd on the chunk's [rows]
values), then dL/dlogits, grad_hidden[rows] = dL/dlogits @ W and grad_weight += dL/dlogits^T @ h.
The backward only scales the stored gradients by the upstream scalar. This is the structure of
Liger's fused linear cross-entropy, with the loss handed in instead of fixed.

`token_loss` must be token-separable: the loss is the sum of its values over any partition of
the rows into slices, and a slice's value depends only on that slice's log-probs and entropies
(every policy loss cir has: `cir.kernels.policy_loss_ref.TokenSeparableLoss`). Against
`linear_logprob` followed by the loss (`linear_loss_reference`, its plain reference), which
needs the logits again in the backward once the loss's gradient is known (8 N H V), this saves
the recomputation; what it costs is the [rows, V] buffer (the chunked log-prob path holds
[N, chunk] blocks) and a [V, H] weight gradient from the forward on.

CPU layout (torch, fp32; float64 for float64 inputs). Each row chunk walks the vocabulary in
blocks of `vocab_block` columns, so that every elementwise pass runs on a block in the cache
right after its GEMM wrote it:

- forward, per block: z = h_c @ W_b.T (h already divided by T, and multiplied by log2(e) so that
  exp2, several times faster than exp here and as accurate, gives the exponentials), the block's
  row max m_b, e_b = exp(z - m_b) stored in the chunk's buffer, its row sums (and
  sum e_b (z - m_b) for the entropy), the targets' logits picked up; the blocks' statistics are
  merged per row as the online log-sum-exp does (`linear_logprob_ref`), giving
  log p = (z - M) - log s with M the row max, the entropy and the target's log-prob;
- the loss: `token_loss` on leaves of the chunk's log-probs (and entropies), torch.autograd.grad;
- backward, per block: p = e_b exp(m_b - M - log s), dL/dz = p (a + b log p) + g_lp onehot with
  a = -(g_lp + g_ent entropy), b = -g_ent (just p a when the loss ignores the entropy: one pass,
  no second exp), then the two GEMMs; the one-hot part is added once per chunk.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .linear_logprob_ref import (
    _rows_of,
    _scaled_hidden,
    _TargetsByChunk,
    _weight_chunk,
    check_inputs,
    compute_dtype,
    linear_logprob_reference,
)

__all__ = ["linear_loss", "linear_loss_reference", "default_row_chunk"]

# The [rows, V] buffer of one row chunk holds at most this many bytes (256 MiB: 384 rows of the
# 151,936-token Qwen vocabulary in fp32, against 2.3 GiB for the naive form's [4096, V] logits
# alone on the `cir bench step` shape). Fewer rows re-read the weight more often and add
# Python steps per row; at 208 rows the pass was ~3% slower here, at 512 no faster.
ROW_CHUNK_BYTES = 1 << 28
# Vocabulary columns per block: a [rows, 512] fp32 block (768 KiB at 384 rows) stays in the
# cache between its GEMM and the passes over it, and the block GEMMs run as fast as wide ones.
VOCAB_BLOCK = 512
_ROW_ALIGN = 64  # row chunks in multiples of this (GEMM-friendly), unless the budget allows fewer
_MIN_ROWS = 16


def default_row_chunk(num_rows: int, vocab: int, itemsize: int = 4, budget: int = ROW_CHUNK_BYTES) -> int:
    """Rows per chunk so that the chunk's [rows, V] buffer fits `budget` bytes: all the rows when
    they fit, else a multiple of 64 (of 16 below 64 rows; at least 16)."""
    rows = budget // max(vocab * itemsize, 1)
    if rows >= num_rows:
        return max(num_rows, 1)
    align = _ROW_ALIGN if rows >= _ROW_ALIGN else _MIN_ROWS
    return max(_MIN_ROWS, rows - rows % align)


LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


class _Blocks:
    """The vocabulary blocks of a row chunk of `rows` rows: views into the pass's buffers, made
    once per row count (every chunk but the last has the same), so that the per-block loop is
    the GEMMs and the passes and little else."""

    def __init__(self, probs, scratch, stats, weight, rows, rows_max, block, cd):
        vocab = weight.shape[0]
        self.bounds = [(v0, min(vocab, v0 + block)) for v0 in range(0, vocab, block)]
        self.e = [
            probs[k * rows_max * block : k * rows_max * block + rows * (v1 - v0)].view(rows, v1 - v0)
            for k, (v0, v1) in enumerate(self.bounds)
        ]
        self.z = [scratch[: rows * (v1 - v0)].view(rows, v1 - v0) for v0, v1 in self.bounds]
        # Per block and row: the block's max (log2 units), sum of e, sum of e (z - max); the
        # backward's per-row factor p / e.
        self.m, self.s, self.t, self.scale = (x[:, :rows] for x in stats)
        self.m_col = [self.m[k][:, None] for k in range(len(self.bounds))]
        self.scale_col = [self.scale[k][:, None] for k in range(len(self.bounds))]
        # The weight's blocks in the compute dtype (views when it already is; else cast on use).
        self.cast = weight.dtype != cd
        self.w = [None if self.cast else weight[v0:v1] for v0, v1 in self.bounds]
        self.w_t = [None if w is None else w.T for w in self.w]

    def weight(self, weight, k, cd):
        return _weight_chunk(weight, *self.bounds[k], cd) if self.cast else self.w[k]


class _LinearLoss(torch.autograd.Function):
    """Forward: the log-probs, entropies, the loss and both gradients (see the module docstring);
    backward: the stored gradients times the upstream scalar."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_loss, temperature, with_entropy, ignore_index, row_chunk, block):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cd = compute_dtype(hidden.dtype)
        dev = hidden.device
        n, hdim, vocab = hidden.shape[0], hidden.shape[1], weight.shape[0]
        h = _scaled_hidden(hidden, temperature, cd)
        # The logits GEMM runs on h * log2(e): its output is z / ln 2, so exp2 (several times
        # faster than exp on a CPU, as accurate) gives exp(z - m) directly.
        h2 = h * LOG2E
        valid = targets != ignore_index
        num_blocks = -(-vocab // block)
        rows_max = min(row_chunk, n)
        # One chunk's exp(z - m_b), block after block, each block a contiguous [rows, width] view.
        probs = torch.empty(rows_max * num_blocks * block, dtype=cd, device=dev)
        scratch = torch.empty(rows_max * min(block, vocab), dtype=cd, device=dev)
        stats = torch.empty((4, num_blocks, rows_max), dtype=cd, device=dev)
        grad_h = torch.empty((n, hdim), dtype=cd, device=dev) if need_h else None
        grad_w = torch.zeros((vocab, hdim), dtype=cd, device=dev) if need_w else None
        grad_w_blocks = None
        logprob = torch.zeros(n, dtype=cd, device=dev)
        entropy = torch.zeros(n, dtype=cd, device=dev)
        loss = torch.zeros((), dtype=cd, device=dev)
        # Below log of the smallest normal number, exp() is 0 or subnormal: log p is clamped there
        # so that p * (a + b log p) is 0, not 0 * inf (its exact value is < 1e-38 anyway).
        log_floor = math.log(torch.finfo(cd).tiny)
        views: dict[int, _Blocks] = {}

        for r0 in range(0, n, rows_max):
            r1 = min(n, r0 + rows_max)
            c = r1 - r0
            if c not in views:
                views[c] = _Blocks(probs, scratch, stats, weight, c, rows_max, block, cd)
            bl = views[c]
            hc, h2c, valid_c = h[r0:r1], h2[r0:r1], valid[r0:r1]
            picks = _TargetsByChunk(targets[r0:r1], valid_c, block, num_blocks)
            target_z = torch.zeros(c, dtype=cd, device=dev)  # log2 units
            for k in range(num_blocks):
                z, e = bl.z[k], bl.e[k]
                if bl.cast:
                    torch.mm(h2c, bl.weight(weight, k, cd).T, out=z)
                else:
                    torch.mm(h2c, bl.w_t[k], out=z)
                pick = picks.of(k)
                if pick is not None:
                    target_z.index_copy_(0, pick[0], z[pick[0], pick[1]])
                torch.amax(z, dim=1, out=bl.m[k])
                z.sub_(bl.m_col[k])
                torch.exp2(z, out=e)
                torch.sum(e, dim=1, out=bl.s[k])
                if with_entropy:
                    torch.sum(z.mul_(e), dim=1, out=bl.t[k])
            # Merge the blocks (log2 units): M the row max, s = sum exp(z - M); then natural units:
            # log p = (z - M) ln 2 - log s.
            row_max = bl.m.amax(dim=0)
            alpha = torch.exp2(bl.m - row_max)
            s = (alpha * bl.s).sum(dim=0)
            log_s = torch.log(s)
            zero = torch.zeros_like(log_s)
            lp_c = torch.where(valid_c, (target_z - row_max) * LN2 - log_s, zero)
            logprob[r0:r1] = lp_c
            ent_c = None
            if with_entropy:
                # sum p (z - M) = sum_b alpha_b (t_b + (m_b - M) s_b) / s; entropy = log s - that.
                t = (alpha * (bl.t + (bl.m - row_max) * bl.s)).sum(dim=0) * LN2
                ent_c = torch.where(valid_c, log_s - t / s, zero)
                entropy[r0:r1] = ent_c
            part, g_lp, g_ent = _loss_and_grads(token_loss, slice(r0, r1), lp_c, ent_c)
            loss += part
            if not (need_h or need_w):
                continue
            if need_h:
                grad_h[r0:r1] = 0.0
            if g_lp is not None:
                g_lp = torch.where(valid_c, g_lp.to(cd), zero)
            if g_ent is not None:
                g_ent = torch.where(valid_c, g_ent.to(cd), zero)
            if g_lp is None and g_ent is None:
                continue
            # dL/dz = p (a + b log p) + g_lp onehot, p = e_b * exp(m_b - M - log s) per block.
            a = torch.zeros(c, dtype=cd, device=dev)
            if g_lp is not None:
                a -= g_lp
            if g_ent is not None:
                a -= g_ent * ent_c
            log_scale = (bl.m - row_max) * LN2 - log_s  # [blocks, rows]: log p = log e_b + log_scale
            torch.exp(log_scale, out=bl.scale)
            if g_ent is None:
                bl.scale.mul_(a)
            gh_c = grad_h[r0:r1] if need_h else None
            if need_w and grad_w_blocks is None:
                grad_w_blocks = [grad_w[v0:v1] for v0, v1 in bl.bounds]
            for k in range(num_blocks):
                e = bl.e[k]
                if g_ent is None:
                    dz = e.mul_(bl.scale_col[k])
                else:
                    log_p = bl.z[k]
                    torch.log(e, out=log_p)
                    log_p.clamp_(min=log_floor).add_(log_scale[k][:, None])
                    p = e.mul_(bl.scale_col[k])
                    dz = log_p.mul_(-g_ent[:, None]).add_(a[:, None]).mul_(p)
                w_k = bl.weight(weight, k, cd)
                if need_h:
                    gh_c.addmm_(dz, w_k)
                if need_w:
                    grad_w_blocks[k].addmm_(dz.T, hc)
            if g_lp is not None:
                # The one-hot part, g_lp at each row's target: its rows of W and of h, once.
                safe = torch.where(valid_c, targets[r0:r1], torch.zeros_like(targets[r0:r1]))
                if need_h:
                    gh_c.addcmul_(g_lp[:, None], _rows_of(weight, safe, cd))
                if need_w:
                    grad_w.index_add_(0, safe, g_lp[:, None] * hc)
        if need_h:
            grad_h = grad_h.mul_(1.0 / temperature).to(hidden.dtype)
        if need_w and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        ctx.grads = (grad_h, grad_w)
        out_dtype = torch.float64 if cd == torch.float64 else torch.float32
        logprob, entropy = logprob.to(out_dtype), entropy.to(out_dtype)
        ctx.mark_non_differentiable(logprob, entropy)
        return loss.to(out_dtype), logprob, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_logprob, _grad_entropy):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_loss: its gradients were computed in the forward and handed out by the first "
                "backward; a second backward through the same call (retain_graph) is not supported"
            )
        grad_h, grad_w = ctx.grads
        ctx.grads = None  # scaled in place below: hand them out once
        if grad_loss is None:
            return (None,) * 9
        g = grad_loss.to(grad_h.dtype if grad_h is not None else grad_w.dtype)
        # The micro-batch's weight in the step's loss: 1 for a single micro-batch, a [V, H] pass saved.
        unit = g.device.type == "cpu" and float(g) == 1.0
        if grad_h is not None and not unit:
            grad_h = grad_h.mul_(g)
        if grad_w is not None and not unit:
            grad_w = grad_w.mul_(g)
        return grad_h, grad_w, None, None, None, None, None, None, None


def _loss_and_grads(token_loss, rows: slice, logprob: Tensor, entropy: Tensor | None):
    """The slice's loss value and its gradients with respect to the slice's log-probs and
    entropies (None where the loss does not depend on them)."""
    with torch.enable_grad():
        lp = logprob.detach().requires_grad_(True)
        ent = None if entropy is None else entropy.detach().requires_grad_(True)
        part = token_loss(rows, lp, ent)
        if not isinstance(part, Tensor) or part.dim() != 0:
            raise ValueError(f"linear_loss: token_loss must return a 0-d tensor, got {part!r}")
        leaves = [lp] if ent is None else [lp, ent]
        if not part.requires_grad:
            return part.detach(), None, None
        grads = torch.autograd.grad(part, leaves, allow_unused=True)
    return part.detach(), grads[0], (grads[1] if ent is not None else None)


def linear_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    token_loss,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
    row_chunk: int | None = None,
    vocab_block: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The LM head and a token-separable loss in one pass (see the module docstring).

    Args:
        hidden [..., H], weight [V, H], targets [...]: as `cir.kernels.linear_logprob`.
        token_loss: `token_loss(rows, logprob, entropy) -> 0-d tensor`, the loss's share over the
            rows `rows` (a slice of the flattened rows) given their log-probs and entropies
            ([rows] each; entropy None without `with_entropy`); must be token-separable.
        row_chunk: rows per chunk (default: a [rows, V] buffer of ROW_CHUNK_BYTES);
        vocab_block: vocabulary columns per block (default VOCAB_BLOCK).

    Returns:
        (loss, logprob, entropy): the loss (0-d, differentiable in hidden and weight; fp32, or
        float64 for float64 inputs), and the log-probs and entropies (hidden's leading shape,
        no gradient; entropy None without `with_entropy`). Rows whose target is `ignore_index`
        have log-prob and entropy 0 and get no gradient.
    """
    inp = check_inputs(hidden, weight, targets, temperature, ignore_index)
    n, vocab = inp.hidden.shape[0], inp.weight.shape[0]
    cd = compute_dtype(inp.hidden.dtype)
    itemsize = torch.empty((), dtype=cd).element_size()
    rows = default_row_chunk(n, vocab, itemsize) if row_chunk is None else int(row_chunk)
    block = VOCAB_BLOCK if vocab_block is None else int(vocab_block)
    if rows < 1 or block < 1:
        raise ValueError(f"linear_loss: row_chunk and vocab_block must be >= 1, got {rows} and {block}")
    if n == 0:
        empty = inp.hidden.new_zeros(inp.lead_shape, dtype=cd)
        loss = inp.hidden.sum().to(cd) * 0 + inp.weight.sum().to(cd) * 0
        return loss, empty, (empty.clone() if with_entropy else None)
    loss, logprob, entropy = _LinearLoss.apply(
        inp.hidden, inp.weight, inp.targets, token_loss, inp.temperature, with_entropy, inp.ignore_index, rows, block
    )
    logprob = logprob.reshape(inp.lead_shape)
    return loss, logprob, (entropy.reshape(inp.lead_shape) if with_entropy else None)


def linear_loss_reference(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    token_loss,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """`linear_loss` composed of its parts: the naive `linear_logprob_reference`, then
    `token_loss` on all the rows at once, differentiated by autograd ([N, V] memory)."""
    logprob, entropy = linear_logprob_reference(
        hidden, weight, targets, temperature=temperature, with_entropy=with_entropy, ignore_index=ignore_index
    )
    flat_lp = logprob.reshape(-1)
    flat_ent = None if entropy is None else entropy.reshape(-1)
    loss = token_loss(slice(0, flat_lp.numel()), flat_lp, flat_ent)
    return loss, logprob.detach(), (None if entropy is None else entropy.detach())
