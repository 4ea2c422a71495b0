"""From trajectories to the policy-gradient update: batching, log-probs and the masked loss.

Trajectories are turned into right-padded micro-batches under a token budget. Log-probs are
computed from the decoder's last hidden states and the LM-head weight by
`cir.kernels.linear_logprob` (Triton on CUDA, a bounded-memory chunked path on CPU), so the
[tokens, vocab] logits are never materialised, and only for response positions. The loss is
`cir.kernels.policy_loss` on the packed response tokens, with `loss_mask` zero on interpreter
feedback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from cir.kernels import linear_logprob, policy_loss
from cir.trajectory import Trajectory


@dataclass
class MicroBatch:
    """One forward/backward's worth of trajectories (right-padded)."""

    index: list[int]  # positions of these trajectories in the step's list
    input_ids: torch.Tensor  # [b, L] prompt + response, padded
    attention_mask: torch.Tensor  # [b, L]
    hidden_index: torch.Tensor  # [n] rows of hidden.view(b*L, H) that predict the response tokens
    targets: torch.Tensor  # [n] the response tokens
    loss_mask: torch.Tensor  # [n] 1 on model tokens, 0 on feedback
    cu_seqlens: torch.Tensor  # [b + 1] offsets of each trajectory's response tokens in the packed [n]
    advantages: torch.Tensor  # [b] per trajectory
    sampler_logprobs: torch.Tensor  # [n]
    old_logprobs: torch.Tensor | None = None  # [n], filled before the update
    ref_logprobs: torch.Tensor | None = None

    @property
    def num_model_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def num_seqs(self) -> int:
        return len(self.index)


def plan_micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group trajectory indices so that each group's padded size (count x longest) stays
    within `token_budget` (a single longer trajectory gets a group of its own). Trajectories
    are taken in length order so that padding stays small; the plan is deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if current and new_longest * (len(current) + 1) > token_budget:
            groups.append(current)
            current, longest = [], 0
            new_longest = lengths[i]
        current.append(i)
        longest = new_longest
    if current:
        groups.append(current)
    return groups


def collate(trajectories: Sequence[Trajectory], index: list[int], advantages: torch.Tensor, pad_id: int, device) -> MicroBatch:
    trajs = [trajectories[i] for i in index]
    seqs = [t.prompt_ids + t.response_ids for t in trajs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(trajs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(trajs), width), dtype=torch.long)
    hidden_index, cu = [], [0]
    for b, (t, s) in enumerate(zip(trajs, seqs)):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[b, : len(s)] = 1
        p, r = len(t.prompt_ids), len(t.response_ids)
        # The hidden state at position j predicts token j + 1.
        hidden_index.append(torch.arange(p - 1, p + r - 1) + b * width)
        cu.append(cu[-1] + r)
    targets = torch.tensor([tok for t in trajs for tok in t.response_ids], dtype=torch.long)
    mask = torch.tensor([m for t in trajs for m in t.loss_mask], dtype=torch.float32)
    sampler = torch.tensor([lp for t in trajs for lp in t.sampler_logprobs], dtype=torch.float32)
    return MicroBatch(
        index=list(index),
        input_ids=ids.to(device),
        attention_mask=attn.to(device),
        hidden_index=torch.cat(hidden_index).to(device),
        targets=targets.to(device),
        loss_mask=mask.to(device),
        cu_seqlens=torch.tensor(cu, dtype=torch.int64, device=device),
        advantages=advantages[index].to(device=device, dtype=torch.float32),
        sampler_logprobs=sampler.to(device),
    )


def decoder_and_head(model):
    """The decoder stack (returning last hidden states, final norm applied) and the LM-head
    weight of a `transformers` causal LM."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head) to compute log-probs from")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: an LM head with a bias is not supported by the fused log-prob path")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    return decoder, head.weight


def token_logprobs(model, mb: MicroBatch, *, temperature: float, with_entropy: bool, impl: str = "auto"):
    """Log-probs (and entropies) of the response tokens of `mb` under `model`, [n] fp32 each."""
    decoder, weight = decoder_and_head(model)
    out = decoder(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, mb.hidden_index)
    return linear_logprob(rows, weight, mb.targets, temperature=temperature, with_entropy=with_entropy, impl=impl)


def micro_batch_weight(mb: MicroBatch, aggregation: str, total_tokens: int, total_seqs: int) -> float:
    """The share of the mini-batch's loss that `mb`'s (self-normalised) loss stands for, so
    that summing weighted micro-batch losses gives the loss of the whole mini-batch."""
    if aggregation == "token-mean":
        return mb.num_model_tokens / max(total_tokens, 1)
    return mb.num_seqs / max(total_seqs, 1)


def micro_batch_loss(model, mb: MicroBatch, algo, *, temperature: float, max_response_tokens: int, compute_entropy: bool = True):
    """Loss (self-normalised over `mb`) and metrics of one micro-batch, with gradient."""
    logprob, entropy = token_logprobs(model, mb, temperature=temperature, with_entropy=compute_entropy, impl=algo.logprob_impl)
    old = mb.old_logprobs if mb.old_logprobs is not None else logprob.detach()
    loss, metrics = policy_loss(
        logprob,
        old,
        mb.advantages,
        mb.loss_mask,
        clip_low=algo.clip_low,
        clip_high=algo.clip_high,
        dual_clip=algo.dual_clip,
        aggregation=algo.aggregation,
        ref_logprob=mb.ref_logprobs,
        kl_coef=algo.kl_coef,
        kl_type=algo.kl_type,
        entropy=entropy if entropy is not None else None,
        entropy_coef=algo.entropy_coef,
        cu_seqlens=mb.cu_seqlens,
        max_seq_len_norm=max_response_tokens,
        impl=algo.loss_impl,
    )
    # How far the trainer's log-probs are from the sampler's (same weights): should be ~0;
    # a large value means the engine and the trainer disagree (e.g. a tokenization drift).
    m = mb.loss_mask
    n = m.sum().clamp(min=1)
    metrics = dict(metrics)
    metrics["logprob_diff_sampler"] = ((logprob.detach() - mb.sampler_logprobs).abs() * m).sum() / n
    if entropy is not None and "entropy" not in metrics:
        metrics["entropy"] = (entropy.detach() * m).sum() / n
    return loss, metrics
