"""One code-integrated trajectory, token-exact.

`response_ids` holds the model's tokens exactly as the engine sampled them and the
interpreter-feedback tokens exactly as the rollout appended them, in order. `loss_mask` is
built while appending (1 on sampled tokens, 0 on feedback), never recovered afterwards from
decoded text. Decoding is for display only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Status of a ToolCall that was not executed because the tool budget was spent (the model
# was shown a short notice instead of output; see RolloutConfig.on_budget_exhausted).
BUDGET_EXHAUSTED = "budget_exhausted"
# Status of a ToolCall whose snippet the sandbox could not bring to a verdict (the machine's
# fault, not the model's: retried, then given up). The trajectory ends there and is left out
# of training and of evaluation's scores; it is counted as a fault instead.
SANDBOX_FAULT = "sandbox_fault"


@dataclass
class ToolCall:
    code: str  # the code block as the model wrote it (decoded, for execution and display)
    status: str  # ExecResult status ("ok", "error", "timeout", ...), "budget_exhausted" or "sandbox_fault"
    output: str  # the text shown to the model inside the output block (after truncation)
    code_span: tuple[int, int]  # [start, end) in response_ids of the sampled segment holding the block
    feedback_span: tuple[int, int]  # [start, end) in response_ids of the appended feedback
    wall_ms: float = 0.0
    truncated: bool = False  # the output was cut to fit max_feedback_tokens (marker appended)

    @property
    def executed(self) -> bool:
        """True when the block actually ran in the sandbox (not a budget notice)."""
        return self.status != BUDGET_EXHAUSTED


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)  # same length as response_ids
    sampler_logprobs: list[float] = field(default_factory=list)  # 0.0 on feedback tokens
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = ""  # "eos" | "length" | "budget" (stopped at a fence once the budget was spent)
    # Set when the rollout creates the trajectory, never changed afterwards: which problem it
    # answers, and the group of samples (of one prompt) whose rewards form its baseline.
    problem_id: str = ""
    group: int = -1

    def append(self, token_ids: list[int], logprobs: list[float] | None, trainable: bool) -> tuple[int, int]:
        """Append tokens; returns their [start, end) span in response_ids."""
        if logprobs is None:
            logprobs = [0.0] * len(token_ids)
        if len(logprobs) != len(token_ids):
            raise ValueError(f"{len(logprobs)} logprobs for {len(token_ids)} tokens")
        start = len(self.response_ids)
        self.response_ids.extend(token_ids)
        self.loss_mask.extend([1 if trainable else 0] * len(token_ids))
        self.sampler_logprobs.extend(logprobs)
        return start, len(self.response_ids)

    @property
    def num_model_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def num_feedback_tokens(self) -> int:
        return len(self.loss_mask) - sum(self.loss_mask)

    @property
    def num_tool_calls(self) -> int:
        """Blocks executed in the sandbox (budget notices are not counted)."""
        return sum(1 for call in self.tool_calls if call.executed)

    @property
    def num_exec_errors(self) -> int:
        """Executions that did not end "ok" by the model's doing (errors, timeouts, memory or
        output limits, ...). A sandbox fault is the machine's, not the model's error: it is
        counted apart (`num_sandbox_faults`)."""
        return sum(1 for call in self.tool_calls if call.executed and call.status not in ("ok", SANDBOX_FAULT))

    @property
    def num_sandbox_faults(self) -> int:
        """Tool calls the sandbox could not bring to a verdict (at most one: the trajectory ends there)."""
        return sum(1 for call in self.tool_calls if call.status == SANDBOX_FAULT)

    @property
    def sandbox_fault(self) -> bool:
        """True when a tool call ended in a sandbox fault (the machine's, not the model's)."""
        return any(call.status == SANDBOX_FAULT for call in self.tool_calls)

    @property
    def num_timeouts(self) -> int:
        return sum(1 for call in self.tool_calls if call.status == "timeout")

    def stats(self) -> dict[str, Any]:
        """Per-trajectory numbers for metrics (plain values, JSON-serialisable)."""
        return {
            "tool_calls": self.num_tool_calls,
            "budget_notices": len(self.tool_calls) - self.num_tool_calls,
            "exec_errors": self.num_exec_errors,
            "sandbox_faults": self.num_sandbox_faults,
            "timeouts": self.num_timeouts,
            "model_tokens": self.num_model_tokens,
            "feedback_tokens": self.num_feedback_tokens,
            "response_tokens": len(self.response_ids),
            "finish_reason": self.finish_reason,
        }

    def check(self) -> None:
        """Raise ValueError if the token-level invariants do not hold.

        Lengths of ids, mask and log-probs agree; every feedback span is masked 0 and lies
        inside the response; every code span is masked 1 (sampled tokens).
        """
        n = len(self.response_ids)
        if len(self.loss_mask) != n or len(self.sampler_logprobs) != n:
            raise ValueError(
                f"trajectory lengths disagree: response_ids {n}, loss_mask {len(self.loss_mask)}, "
                f"sampler_logprobs {len(self.sampler_logprobs)}"
            )
        for i, call in enumerate(self.tool_calls):
            for name, (start, end), want in (
                ("code_span", call.code_span, 1),
                ("feedback_span", call.feedback_span, 0),
            ):
                if not 0 <= start <= end <= n:
                    raise ValueError(f"tool call {i}: {name} {start, end} outside response of {n} tokens")
                if any(m != want for m in self.loss_mask[start:end]):
                    raise ValueError(f"tool call {i}: loss_mask is not {want} over {name} {start, end}")

    def text(self, tokenizer) -> str:
        """The response as text, for display and logging only."""
        return tokenizer.decode(self.response_ids)
