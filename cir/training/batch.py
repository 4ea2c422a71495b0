"""The train batch: the one hand-off from (trajectories, advantages) to tensors.

`build_train_batch` splits the step's trajectories into mini-batches (one optimizer step
each) and those into micro-batches under a token budget (one forward/backward each), in one of
two layouts:

- padded: a micro-batch is a [b, L] block of right-padded rows with an attention mask;
- packed: a micro-batch's sequences are concatenated into one [1, total] row, no padding, with
  position ids restarting at 0 at each sequence start. `transformers` reads those restarts as
  sequence boundaries: a block-diagonal causal mask for sdpa/eager, flash-attn's varlen kernel
  for `flash_attention_2` (no attention across sequences either way).

Either way the response tokens are concatenated per micro-batch (`hidden_index`, `targets`,
`loss_mask`, `cu_seqlens`), with `loss_mask` zero on interpreter feedback exactly as the
rollout built it, so the loss code cannot tell the layouts apart. The trajectories are read,
never changed, and so is the batch once built: what the actor computes from it (old and
reference log-probs) it keeps itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cir.trajectory import Trajectory


@dataclass
class MicroBatch:
    """One forward/backward's worth of trajectories, right-padded (`position_ids` None) or
    packed into one row (`attention_mask` None)."""

    index: list[int]  # positions of these trajectories in the step's list
    input_ids: torch.Tensor  # [b, L] prompt + response, padded; packed: [1, total]
    attention_mask: torch.Tensor | None  # [b, L]; None when packed (the position ids mark the sequences)
    hidden_index: torch.Tensor  # [n] rows of hidden.view(b*L, H) that predict the response tokens
    targets: torch.Tensor  # [n] the response tokens
    loss_mask: torch.Tensor  # [n] 1 on model tokens, 0 on feedback
    cu_seqlens: torch.Tensor  # [b + 1] offsets of each trajectory's response tokens in the concatenated [n]
    advantages: torch.Tensor  # [b] per trajectory
    sampler_logprobs: torch.Tensor  # [n]
    position_ids: torch.Tensor | None = None  # packed: [1, total], 0, 1, ... from each sequence's start

    @property
    def num_model_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def num_input_slots(self) -> int:
        """Token slots the forward runs over, padding included."""
        return self.input_ids.numel()

    @property
    def num_padding_slots(self) -> int:
        """Slots holding padding rather than a token (0 when packed)."""
        if self.attention_mask is None:
            return 0
        return self.input_ids.numel() - int(self.attention_mask.sum())

    @property
    def num_seqs(self) -> int:
        return len(self.index)

    @classmethod
    def placeholder(cls, pad_id: int, device) -> MicroBatch:
        """A two-token micro-batch with nothing to learn from (mask and advantage 0): what a rank
        runs, its loss multiplied by zero, when others have more micro-batches than it, so that
        every rank joins each collective of a sharded model (one per forward/backward)."""
        zero = torch.zeros(1, device=device)
        return cls(
            index=[],
            input_ids=torch.full((1, 2), pad_id, dtype=torch.long, device=device),
            attention_mask=torch.ones((1, 2), dtype=torch.long, device=device),
            hidden_index=torch.zeros(1, dtype=torch.long, device=device),
            targets=torch.full((1,), pad_id, dtype=torch.long, device=device),
            loss_mask=zero,
            cu_seqlens=torch.tensor([0, 1], dtype=torch.int64, device=device),
            advantages=zero,
            sampler_logprobs=zero,
        )


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


def plan_packed_micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group trajectory indices so that each group's total length stays within `token_budget`
    (a single longer trajectory gets a group of its own): first-fit decreasing, which fills the
    groups closely so that there are few of them. Each group lists its indices in ascending
    order; the plan is deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    room: list[int] = []  # budget left in each group
    for i in order:
        n = lengths[i]
        slot = next((g for g, left in enumerate(room) if n <= left), None)
        if slot is None:
            groups.append([i])
            room.append(token_budget - n)
        else:
            groups[slot].append(i)
            room[slot] -= n
    return [sorted(g) for g in groups]


def collate(
    trajectories: Sequence[Trajectory],
    index: list[int],
    advantages: torch.Tensor,
    pad_id: int,
    device,
    *,
    packed: bool = False,
) -> MicroBatch:
    """The micro-batch of `trajectories[index]`: right-padded rows, or one packed row."""
    trajs = [trajectories[i] for i in index]
    seqs = [t.prompt_ids + t.response_ids for t in trajs]
    hidden_index, cu = [], [0]
    position_ids = attn = None
    if packed:
        ids = torch.tensor([tok for s in seqs for tok in s], dtype=torch.long).unsqueeze(0)
        position_ids = torch.cat([torch.arange(len(s)) for s in seqs]).unsqueeze(0)
        starts = [0]
        for s in seqs[:-1]:
            starts.append(starts[-1] + len(s))
    else:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(trajs), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(trajs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
            attn[b, : len(s)] = 1
        starts = [b * width for b in range(len(seqs))]
    for t, start in zip(trajs, starts):
        p, r = len(t.prompt_ids), len(t.response_ids)
        # The hidden state at position j predicts token j + 1.
        hidden_index.append(torch.arange(p - 1, p + r - 1) + start)
        cu.append(cu[-1] + r)
    targets = torch.tensor([tok for t in trajs for tok in t.response_ids], dtype=torch.long)
    mask = torch.tensor([m for t in trajs for m in t.loss_mask], dtype=torch.float32)
    sampler = torch.tensor([lp for t in trajs for lp in t.sampler_logprobs], dtype=torch.float32)
    return MicroBatch(
        index=list(index),
        input_ids=ids.to(device),
        attention_mask=None if attn is None else attn.to(device),
        hidden_index=torch.cat(hidden_index).to(device),
        targets=targets.to(device),
        loss_mask=mask.to(device),
        cu_seqlens=torch.tensor(cu, dtype=torch.int64, device=device),
        advantages=advantages[index].to(device=device, dtype=torch.float32),
        sampler_logprobs=sampler.to(device),
        position_ids=None if position_ids is None else position_ids.to(device),
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
    # The old log-probs of the PPO ratio: "current" (the policy as the update starts, recomputed,
    # or the update's own forward when strictly on-policy), "sampler" (the sampler's log-probs:
    # the behaviour policy of tokens sampled under older weights), "decoupled" (recomputed as
    # "current", with the correction to the sampler that algo.rollout_correction sets).
    behaviour: str = "current"

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
    packing: bool = False,
    positions: Sequence[int] | None = None,
    behaviour: str = "current",
) -> TrainBatch:
    """The trajectory at position j of the step's global list goes to mini-batch j % mini_batches
    (`positions`: each trajectory's global position; default 0, 1, ...: this process holds the
    whole list). So which optimizer step a trajectory joins does not depend on how the list is
    sharded over ranks. Within a mini-batch, micro-batches are planned by length: padded
    (`plan_micro_batches`, count x longest within the budget) or, with `packing`, packed
    (`plan_packed_micro_batches`, the sum of lengths within the budget)."""
    if len(advantages) != len(trajectories):
        raise ValueError(f"{len(advantages)} advantages for {len(trajectories)} trajectories")
    if positions is None:
        positions = range(len(trajectories))
    elif len(positions) != len(trajectories):
        raise ValueError(f"{len(positions)} positions for {len(trajectories)} trajectories")
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajectories]
    minis = [[i for i, j in enumerate(positions) if j % mini_batches == k] for k in range(mini_batches)]
    planner = plan_packed_micro_batches if packing else plan_micro_batches
    plans = [
        [[mini[k] for k in group] for group in planner([lengths[i] for i in mini], micro_batch_tokens)]
        for mini in minis
    ]
    batches = [
        [collate(trajectories, index, advantages, pad_id, device, packed=packing) for index in plan] for plan in plans
    ]
    return TrainBatch(
        batches,
        advantages,
        temperature=temperature,
        max_response_tokens=max_response_tokens,
        behaviour=behaviour,
    )
