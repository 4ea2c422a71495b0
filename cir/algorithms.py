"""RL algorithms as pure functions of tensors, registered by name.

- Advantage estimators: ``compute_advantages(name, rewards, group_ids, ...)`` returns one
  advantage per trajectory (the trainer broadcasts it over the trajectory's model tokens).
- Dynamic sampling: ``informative_groups`` tells which prompt groups carry a learning signal.
- The progressive interaction budget: ``Schedule`` maps a training step to the tool-call
  budget and response length of the stage it falls in.

Every function here takes and returns plain tensors or dataclasses, so each can be checked
alone against hand-computed values (tests/test_algorithms.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

AdvantageFn = Callable[..., torch.Tensor]
_ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register an advantage estimator under `name`.

    The function takes ``(rewards [n] float, group_ids [n] long, *, num_tokens [n] | None,
    eps: float)`` and returns advantages ``[n]`` (float32).
    """

    def wrap(fn: AdvantageFn) -> AdvantageFn:
        if name in _ADVANTAGES:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        _ADVANTAGES[name] = fn
        return fn

    return wrap


def advantage_names() -> list[str]:
    return sorted(_ADVANTAGES)


def compute_advantages(
    name: str,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    num_tokens: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages of `n` trajectories; `group_ids[i]` is the prompt trajectory i samples.

    `num_tokens[i]` (model tokens of trajectory i) is used by estimators that normalise over
    tokens rather than trajectories (REINFORCE++).
    """
    if name not in _ADVANTAGES:
        raise KeyError(f"unknown advantage estimator {name!r}; known: {', '.join(advantage_names())}")
    rewards = rewards.to(torch.float64)
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-D shapes")
    out = _ADVANTAGES[name](rewards, group_ids.to(torch.long), num_tokens=num_tokens, eps=eps)
    return out.to(torch.float32)


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor):
    """Per-trajectory group mean, group (unbiased) std and group size."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    g = counts.numel()
    sums = torch.zeros(g, dtype=rewards.dtype).index_add_(0, inverse, rewards)
    mean = sums / counts
    dev2 = torch.zeros(g, dtype=rewards.dtype).index_add_(0, inverse, (rewards - mean[inverse]) ** 2)
    # Unbiased std, as torch.std; a group of one has std 0.
    std = torch.where(counts > 1, (dev2 / (counts - 1).clamp(min=1)).sqrt(), torch.zeros_like(dev2))
    return mean[inverse], std[inverse], counts[inverse]


@register_advantage("grpo")
def grpo(rewards, group_ids, *, num_tokens=None, eps=1e-6):
    """GRPO: reward minus its group mean, divided by the group std."""
    mean, std, _ = _group_stats(rewards, group_ids)
    # A group whose rewards are all equal has std 0 and zero centred rewards: advantage 0.
    return torch.where(std > 0, (rewards - mean) / (std + eps), torch.zeros_like(mean))


@register_advantage("grpo_no_std")
def grpo_no_std(rewards, group_ids, *, num_tokens=None, eps=1e-6):
    """GRPO without std normalisation: reward minus its group mean."""
    mean, _, _ = _group_stats(rewards, group_ids)
    return rewards - mean


@register_advantage("dr_grpo")
def dr_grpo(rewards, group_ids, *, num_tokens=None, eps=1e-6):
    """Dr. GRPO: group-mean baseline, no std division. Pair it with the length-unbiased
    ``seq-mean-token-sum-norm`` loss aggregation (the trainer's preset does)."""
    return grpo_no_std(rewards, group_ids)


@register_advantage("rloo")
def rloo(rewards, group_ids, *, num_tokens=None, eps=1e-6):
    """RLOO: reward minus the mean of the *other* samples of the same prompt.

    r_i - (S - r_i)/(k - 1) = k/(k-1) * (r_i - mean); a group of one gets 0.
    """
    mean, _, k = _group_stats(rewards, group_ids)
    scale = torch.where(k > 1, k / (k - 1).clamp(min=1), torch.zeros_like(mean))
    return scale * (rewards - mean)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(rewards, group_ids, *, num_tokens=None, eps=1e-6):
    """REINFORCE++ with a per-group baseline (the paper's estimator).

    Subtract the group mean reward, then whiten over the whole batch. The batch statistics
    are taken over tokens (each trajectory weighted by its model-token count) when
    `num_tokens` is given, as the per-token advantages of the batch are what gets whitened.
    """
    mean, _, _ = _group_stats(rewards, group_ids)
    centred = rewards - mean
    w = torch.ones_like(centred) if num_tokens is None else num_tokens.to(centred.dtype).clamp(min=0)
    total = w.sum()
    if total <= 0:
        return torch.zeros_like(centred)
    mu = (w * centred).sum() / total
    var = (w * (centred - mu) ** 2).sum() / total
    return (centred - mu) / (var.sqrt() + eps)


def informative_groups(rewards: torch.Tensor, group_ids: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """Dynamic sampling: True for trajectories whose group's rewards are not all equal.

    A group in which every sample got the same reward has zero advantage everywhere under
    any group baseline, so it only dilutes the batch.
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    g = int(inverse.max()) + 1 if inverse.numel() else 0
    big = torch.finfo(torch.float64).max
    r = rewards.to(torch.float64)
    lo = torch.full((g,), big, dtype=torch.float64).scatter_reduce(0, inverse, r, reduce="amin")
    hi = torch.full((g,), -big, dtype=torch.float64).scatter_reduce(0, inverse, r, reduce="amax")
    return (hi - lo > tol)[inverse]


# ---------------------------------------------------------------------------------------------
# Progressive interaction budget


@dataclass(frozen=True)
class Stage:
    """From `start_step` on (until the next stage), these limits apply."""

    start_step: int
    tool_budget: int
    max_response_tokens: int


class Schedule:
    """Stages of (tool budget, response length) by training step.

    The paper's progressive interaction budget: start with a small budget for stability,
    raise it later for exploration. Stages are given by their first step; the first stage
    must start at step 0.
    """

    def __init__(self, stages: list[Stage]):
        if not stages:
            raise ValueError("a schedule needs at least one stage")
        stages = sorted(stages, key=lambda s: s.start_step)
        if stages[0].start_step != 0:
            raise ValueError(f"the first stage must start at step 0, not {stages[0].start_step}")
        for a, b in zip(stages, stages[1:]):
            if a.start_step == b.start_step:
                raise ValueError(f"two stages start at step {a.start_step}")
        for s in stages:
            if s.tool_budget < 0 or s.max_response_tokens <= 0:
                raise ValueError(f"invalid stage {s}: tool_budget >= 0 and max_response_tokens > 0 required")
        self.stages = stages

    @classmethod
    def from_config(cls, items: list[dict], default_budget: int, default_tokens: int) -> "Schedule":
        """Build from config rows like ``{"step": 100, "tool_budget": 2, "max_response_tokens": 4096}``
        (missing fields carry over from the previous stage); an empty list gives one stage."""
        if not items:
            return cls([Stage(0, default_budget, default_tokens)])
        stages, budget, tokens = [], default_budget, default_tokens
        for i, row in enumerate(items):
            unknown = set(row) - {"step", "tool_budget", "max_response_tokens"}
            if unknown:
                raise ValueError(f"schedule stage {i}: unknown field(s) {sorted(unknown)}")
            budget = int(row.get("tool_budget", budget))
            tokens = int(row.get("max_response_tokens", tokens))
            stages.append(Stage(int(row.get("step", 0)), budget, tokens))
        return cls(stages)

    def at(self, step: int) -> Stage:
        current = self.stages[0]
        for s in self.stages:
            if s.start_step <= step:
                current = s
            else:
                break
        return current

    def __repr__(self) -> str:
        return "Schedule(" + ", ".join(f"{s.start_step}:budget={s.tool_budget},len={s.max_response_tokens}" for s in self.stages) + ")"
