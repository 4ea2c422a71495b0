"""One code-integrated trajectory, token-exact.

`response_ids` holds the model's tokens exactly as the engine sampled them and the
interpreter-feedback tokens exactly as the rollout appended them, in order. `loss_mask` is
built while appending (1 on sampled tokens, 0 on feedback), never recovered afterwards from
decoded text. Decoding is for display only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    code: str  # the code block as the model wrote it (decoded, for execution and display)
    status: str  # ExecResult status ("ok", "error", "timeout", ...) or "budget_exhausted"
    output: str  # the text shown to the model inside the output block (after truncation)
    code_span: tuple[int, int]  # [start, end) in response_ids of the sampled segment holding the block
    feedback_span: tuple[int, int]  # [start, end) in response_ids of the appended feedback
    wall_ms: float = 0.0


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)  # same length as response_ids
    sampler_logprobs: list[float] = field(default_factory=list)  # 0.0 on feedback tokens
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = ""  # "eos" | "length" | "budget" | "no_code" ...
    # Filled in later stages of a step.
    problem: dict[str, Any] = field(default_factory=dict)  # the dataset row (answer, id, ...)
    group: int = -1  # index of the prompt this trajectory samples (for group baselines)
    reward: float = 0.0
    reward_info: dict[str, Any] = field(default_factory=dict)

    def append(self, token_ids: list[int], logprobs: list[float] | None, trainable: bool) -> tuple[int, int]:
        """Append tokens; returns their [start, end) span in response_ids."""
        start = len(self.response_ids)
        self.response_ids.extend(token_ids)
        self.loss_mask.extend([1 if trainable else 0] * len(token_ids))
        if logprobs is None:
            logprobs = [0.0] * len(token_ids)
        if len(logprobs) != len(token_ids):
            raise ValueError(f"{len(logprobs)} logprobs for {len(token_ids)} tokens")
        self.sampler_logprobs.extend(logprobs)
        return start, len(self.response_ids)

    @property
    def num_model_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def num_feedback_tokens(self) -> int:
        return len(self.loss_mask) - sum(self.loss_mask)

    def text(self, tokenizer) -> str:
        """The response as text, for display and logging only."""
        return tokenizer.decode(self.response_ids)
