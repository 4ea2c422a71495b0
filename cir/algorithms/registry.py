"""Advantage estimators and policy losses by name: what `algo.advantage` and `algo.policy_loss`
choose from.

This module imports no torch, so a config names and checks them as it is loaded, in
milliseconds. The built-ins are entered as "module:attribute" and imported on first use (as
engine stop rules are): the estimators of `cir.algorithms.estimators` and the clipped
surrogate of `cir.kernels`. Your own register with the same functions, as callables.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

AdvantageFn = Callable  # (rewards [n], group_ids [n], *, num_tokens, eps, dist) -> advantages [n]

_ADVANTAGES: dict[str, AdvantageFn | str] = {
    "grpo": "cir.algorithms.estimators:grpo",
    "grpo_no_std": "cir.algorithms.estimators:grpo_no_std",
    "dr_grpo": "cir.algorithms.estimators:dr_grpo",
    "rloo": "cir.algorithms.estimators:rloo",
    "reinforce_pp_baseline": "cir.algorithms.estimators:reinforce_pp_baseline",
}


def _resolve(target: Callable | str) -> Callable:
    if isinstance(target, str):
        module, attribute = target.split(":")
        return getattr(importlib.import_module(module), attribute)
    return target


def _without_dist(fn: AdvantageFn, *args, dist=None, **kwargs):
    return fn(*args, **kwargs)


def _takes_dist(fn: AdvantageFn) -> AdvantageFn:
    """`fn` as called with `dist`: an estimator written without it (group statistics only) is
    called without it."""
    params = inspect.signature(fn).parameters
    takes_dist = "dist" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return fn if takes_dist else functools.partial(_without_dist, fn)


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register an advantage estimator under `name` (a decorator).

    The function takes ``(rewards [n] float, group_ids [n] long, *, num_tokens [n] | None,
    eps: float, dist: DistributedContext)`` and returns advantages ``[n]`` (float32). Estimators
    that use statistics of the whole batch must reduce them through `dist`.
    """

    def wrap(fn: AdvantageFn) -> AdvantageFn:
        if name in _ADVANTAGES:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        _ADVANTAGES[name] = _takes_dist(fn)
        return fn

    return wrap


def advantage_names() -> list[str]:
    return sorted(_ADVANTAGES)


def get_advantage(name: str) -> AdvantageFn:
    """The estimator registered as `name`, called with `dist` (see `register_advantage`)."""
    if name not in _ADVANTAGES:
        raise KeyError(f"unknown advantage estimator {name!r}; known: {', '.join(advantage_names())}")
    entry = _ADVANTAGES[name]
    if isinstance(entry, str):
        entry = _ADVANTAGES[name] = _takes_dist(_resolve(entry))
    return entry


@dataclass(frozen=True)
class PolicyLoss:
    """One loss, two implementations with the same signature (see `cir.kernels.policy_loss`):
    the plain torch `reference` and the `fused` one; and optionally its `per_token` term (the
    loss of each token from that token's values alone, before the mask and the aggregation:
    `cir.kernels.policy_loss_ref.ppo_clip_token_loss`'s signature), with which the LM head and
    the loss run in one pass (`cir.algorithms.losses.token_loss`, `cir.kernels.linear_loss`)."""

    name: str
    reference: Callable
    fused: Callable
    per_token: Callable | None = None


# name -> the loss, or (reference, fused, per_token) as "module:attribute" until first used.
_POLICY_LOSSES: dict[str, PolicyLoss | tuple[str, str, str]] = {
    # The clipped surrogate of PPO / GRPO / REINFORCE++ with asymmetric clip ("clip-higher"),
    # optional dual clip, KL to a reference (capped per token) and an entropy bonus.
    "ppo_clip": (
        "cir.kernels.policy_loss_ref:policy_loss_reference",
        "cir.kernels:policy_loss",
        "cir.kernels.policy_loss_ref:ppo_clip_token_loss",
    ),
}


def register_policy_loss(
    name: str, *, reference: Callable, fused: Callable | None = None, per_token: Callable | None = None
) -> PolicyLoss:
    """Register a policy loss; without a fused implementation the reference serves both. With
    `per_token` (each token's loss alone, which the reference aggregates with the mask and
    `algo.aggregation`) the LM head and the loss can run in one pass."""
    if name in _POLICY_LOSSES:
        raise ValueError(f"policy loss {name!r} is already registered")
    entry = PolicyLoss(name, reference, fused or reference, per_token)
    _POLICY_LOSSES[name] = entry
    return entry


def policy_loss_names() -> list[str]:
    return sorted(_POLICY_LOSSES)


def get_policy_loss(name: str) -> PolicyLoss:
    if name not in _POLICY_LOSSES:
        raise KeyError(f"unknown policy loss {name!r}; known: {', '.join(policy_loss_names())}")
    entry = _POLICY_LOSSES[name]
    if isinstance(entry, tuple):
        reference, fused, per_token = entry
        entry = _POLICY_LOSSES[name] = PolicyLoss(name, _resolve(reference), _resolve(fused), _resolve(per_token))
    return entry
