"""The engine interface: what the rollout loop needs from a text generator.

An engine takes token ids and returns token ids (token-in, token-out): the rollout loop never
hands it text, and nothing it returns is ever re-tokenized. Requests are independent and
asynchronous, so one trajectory waiting on the sandbox never holds up the others; an engine
batches whatever requests are in flight at each decoding step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence, runtime_checkable

import torch

# A text stop condition: called with the decoded text of the completion so far (after each
# new token); the completion ends at the first token for which it returns True. The token that
# completes the condition is kept. Used for "the closing fence of a python block", which a
# plain stop string cannot express (the opening fence contains the same backticks).
StopPredicate = Callable[[str], bool]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k truncation
    seed: int | None = None  # per-request generator seed; None: the engine's own stream
    stop_token_ids: tuple[int, ...] = ()  # e.g. EOS; the stop token is kept in the output
    stop_strings: tuple[str, ...] = ()  # stop once the completion's text contains one of these
    stop_when: StopPredicate | None = field(default=None, compare=False)


@dataclass
class Completion:
    token_ids: list[int]
    # Log-probability of each sampled token under softmax(logits / temperature) over the full
    # vocabulary (before top-p/top-k truncation): the quantity the trainer recomputes.
    logprobs: list[float]
    finish_reason: str  # "stop_token" | "stop_string" | "stop_when" | "length"
    stop_token_id: int | None = None
    stop_string: str | None = None


@runtime_checkable
class Engine(Protocol):
    """What every generation engine provides (transformers+torch, vLLM, ...)."""

    @property
    def tokenizer(self): ...

    # Optional: `max_model_len` (int), the most tokens prompt + completion may hold. The
    # rollout loop then keeps every trajectory within it.

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        """Continue `prompt_ids`; returns only the new tokens."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take new policy weights (HF parameter names) before the next rollout."""
        ...

    def close(self) -> None: ...
