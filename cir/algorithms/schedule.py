"""The progressive interaction budget: the tool-call budget and response length by step.

The paper raises the budget in stages during training instead of fixing it: a small budget
first for stability, a larger one later for exploration. `Schedule.at(step)` is a pure lookup,
so a resumed run sees the stage the uninterrupted one saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cir.config_loader import ConfigError


@dataclass
class StageConfig:
    """One stage of the `schedule` config list, e.g. ``{step: 100, tool_budget: 2}``.

    Fields left out (None) keep the previous stage's value (the first stage's default:
    `rollout.tool_budget` and `rollout.max_response_tokens`).
    """

    step: int = 0
    tool_budget: int | None = None
    max_response_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.step < 0:
            raise ConfigError(f"step must be >= 0, got {self.step}")
        if self.tool_budget is not None and self.tool_budget < 0:
            raise ConfigError(f"tool_budget must be >= 0, got {self.tool_budget}")
        if self.max_response_tokens is not None and self.max_response_tokens < 1:
            raise ConfigError(f"max_response_tokens must be >= 1, got {self.max_response_tokens}")


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
    def from_config(cls, items: Sequence[StageConfig], default_budget: int, default_tokens: int) -> Schedule:
        """Build from config stages like ``{step: 100, tool_budget: 2, max_response_tokens: 4096}``
        (fields left out carry over from the previous stage); an empty list gives one stage."""
        if not items:
            return cls([Stage(0, default_budget, default_tokens)])
        stages, budget, tokens = [], default_budget, default_tokens
        for item in items:
            budget = budget if item.tool_budget is None else item.tool_budget
            tokens = tokens if item.max_response_tokens is None else item.max_response_tokens
            stages.append(Stage(item.step, budget, tokens))
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
        return (
            "Schedule("
            + ", ".join(f"{s.start_step}:budget={s.tool_budget},len={s.max_response_tokens}" for s in self.stages)
            + ")"
        )
