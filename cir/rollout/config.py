"""`rollout.*`: how one trajectory is generated (length, tool budget, feedback, sampling)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cir.config_loader import ConfigError

OUTPUT_PLACEHOLDER = "{output}"


@dataclass
class RolloutConfig:
    """How one trajectory is generated.

    max_response_tokens: total tokens appended after the prompt (model tokens and feedback).
    tool_budget: at most this many executions per trajectory.
    on_budget_exhausted: what happens when the model closes a python block after the budget
        is spent: "stop" ends the trajectory at the fence (finish_reason "budget"); "notice"
        appends `budget_notice` in an output block (no execution) and keeps generating.
    budget_notice: the text shown in place of output under "notice".
    feedback_template: the text appended after an executed block; `{output}` is replaced
        by the output shown: `ExecResult.feedback()` (stdout, or the error's last line, or a
        timeout notice) without trailing newlines (plain substitution, other braces are kept
        literally). A "\n" is put before it when the response does not end with a newline.
    max_feedback_tokens: the feedback (leading newline, template and output) is cut to at
        most this many tokens by keeping the head of the output and ending it with
        `truncation_marker`. None: no limit. Either way the feedback is also cut to leave
        room for one more model token within max_response_tokens; a block closed with no
        room even for the template and marker is not run (finish_reason "length").
    temperature, top_p, top_k: sampling (temperature 0 is greedy; top_k 0 is off).
    session_mode: run the blocks of one trajectory in one sandbox session, so later blocks
        see the definitions of earlier successful ones. Off: each block runs alone.
    exec_timeout_s: wall-clock limit per block (None: the sandbox's own timeout_s).
    stop_on_eos: stop a trajectory at the tokenizer's EOS token (kept, loss_mask 1).
    stop_token_ids: further token ids that end a trajectory like EOS (e.g. a chat end token).
    """

    max_response_tokens: int = 1024
    tool_budget: int = 2
    on_budget_exhausted: Literal["stop", "notice"] = "stop"
    budget_notice: str = "Tool budget exhausted; continue without code."
    feedback_template: str = "```output\n{output}\n```\n"
    max_feedback_tokens: int | None = 256
    truncation_marker: str = "...[truncated]"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    session_mode: bool = False
    exec_timeout_s: float | None = None
    stop_on_eos: bool = True
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_response_tokens < 1:
            raise ConfigError(f"max_response_tokens must be >= 1, got {self.max_response_tokens}")
        if self.tool_budget < 0:
            raise ConfigError(f"tool_budget must be >= 0, got {self.tool_budget}")
        if self.on_budget_exhausted not in ("stop", "notice"):
            raise ConfigError(f"on_budget_exhausted must be 'stop' or 'notice', got {self.on_budget_exhausted!r}")
        if OUTPUT_PLACEHOLDER not in self.feedback_template:
            raise ConfigError(f"feedback_template must contain {OUTPUT_PLACEHOLDER!r}")
        if self.max_feedback_tokens is not None and self.max_feedback_tokens < 1:
            raise ConfigError(f"max_feedback_tokens must be >= 1 or None, got {self.max_feedback_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if self.exec_timeout_s is not None and not self.exec_timeout_s > 0:
            raise ConfigError(f"exec_timeout_s must be > 0 or None, got {self.exec_timeout_s}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
