"""The train batch: the one hand-off from (trajectories, advantages) to tensors.

`build_train_batch` splits the step's trajectories into mini-batches (one optimizer step
each) and those into right-padded micro-batches under a token budget (one forward/backward
each). Response tokens are packed per micro-batch, with `loss_mask` zero on interpreter
feedback exactly as the rollout built it. The trajectories are read, never changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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


def collate(
    trajectories: Sequence[Trajectory], index: list[int], advantages: torch.Tensor, pad_id: int, device
) -> MicroBatch:
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


@dataclass
class TrainBatch:
    """What the actor trains on in one RL step: `mini_batches[k]` is the list of micro-batches
    of optimizer step k (per PPO epoch). `temperature` and `max_response_tokens` are those the
    trajectories were sampled under (the log-probs and the length-normalised loss need them)."""

    mini_batches: list[list[MicroBatch]]
    advantages: torch.Tensor  # [n] per trajectory, in the order they were given
    temperature: float
    max_response_tokens: int

    @property
    def micro_batches(self) -> list[MicroBatch]:
        return [mb for mini in self.mini_batches for mb in mini]

    @property
    def num_trajectories(self) -> int:
        return int(self.advantages.numel())


def build_train_batch(
    trajectories: Sequence[Trajectory],
    advantages: torch.Tensor,
    *,
    pad_id: int,
    device,
    mini_batches: int,
    micro_batch_tokens: int,
    temperature: float,
    max_response_tokens: int,
) -> TrainBatch:
    """Trajectory i goes to mini-batch i % mini_batches; within a mini-batch, micro-batches are
    planned by length (`plan_micro_batches`)."""
    if len(advantages) != len(trajectories):
        raise ValueError(f"{len(advantages)} advantages for {len(trajectories)} trajectories")
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajectories]
    order = list(range(len(trajectories)))
    minis = [order[i::mini_batches] for i in range(mini_batches)]
    plans = [
        [[mini[k] for k in group] for group in plan_micro_batches([lengths[i] for i in mini], micro_batch_tokens)]
        for mini in minis
    ]
    batches = [[collate(trajectories, index, advantages, pad_id, device) for index in plan] for plan in plans]
    return TrainBatch(batches, advantages, temperature=temperature, max_response_tokens=max_response_tokens)
