"""The engine interface: what the rollout loop needs from a text generator.

An engine takes token ids and returns token ids (token-in, token-out): the rollout loop never
hands it text, and nothing it returns is ever re-tokenized. Requests are independent and
asynchronous, so one trajectory waiting on the sandbox never holds up the others; an engine
batches whatever requests are in flight at each decoding step.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

# A text stop condition: called with the decoded text of the completion so far (after each
# new token); the completion ends at the first token for which it returns True. The token that
# completes the condition is kept. Used for "the closing fence of a python block", which a
# plain stop string cannot express (the opening fence contains the same backticks).
StopPredicate = Callable[[str], bool]

# Stop rules by name, so a request names its rule as plain data that can cross a process
# boundary; the engine resolves the name where it runs. Values are the predicate itself or
# "module:attribute", imported on first use. The rollout registers its rule (a python block's
# closing fence) when it is imported: engines know no rule of their own.
_STOP_RULES: dict[str, StopPredicate | str] = {}

# Stop strings that stand in for a stop rule at an engine that cannot run the rule's predicate
# after every token (vLLM). Each rule's strings must be such that the token on which the rule
# turns true completes one of them; they may also fire earlier (a false stop, e.g. on the
# opening fence), so the caller checks the rule on what came back and continues if it does not
# hold yet (see `cir.rollout.loop`).
_STOP_RULE_STRINGS: dict[str, tuple[str, ...]] = {}


def register_stop_rule(
    name: str, predicate: StopPredicate | str, *, stand_in: Sequence[str] = (), overwrite: bool = False
) -> None:
    """Make `predicate` (or "module:attribute") available to engines as `SamplingParams.stop_rule`.

    `stand_in`: stop strings an engine that cannot run the predicate after every token sends
    instead (see `stop_rule_strings`)."""
    if name in _STOP_RULES and not overwrite:
        raise ValueError(f"stop rule {name!r} is already registered (pass overwrite=True)")
    _STOP_RULES[name] = predicate
    if stand_in:
        _STOP_RULE_STRINGS[name] = tuple(stand_in)
    else:
        _STOP_RULE_STRINGS.pop(name, None)


def stop_rule(name: str) -> StopPredicate:
    """The predicate registered as `name`."""
    if name not in _STOP_RULES:
        raise KeyError(f"unknown stop rule {name!r}; registered: {', '.join(sorted(_STOP_RULES))}")
    rule = _STOP_RULES[name]
    if isinstance(rule, str):
        module, attribute = rule.split(":")
        rule = _STOP_RULES[name] = getattr(importlib.import_module(module), attribute)
    return rule


def stop_rule_strings(name: str) -> tuple[str, ...]:
    """The stop strings that stand in for the stop rule `name` (see `evaluates_stop_rule`)."""
    if name not in _STOP_RULE_STRINGS:
        raise KeyError(
            f"stop rule {name!r} has no stand-in stop strings; known: {', '.join(sorted(_STOP_RULE_STRINGS))}"
        )
    return _STOP_RULE_STRINGS[name]


def evaluates_stop_rule(engine, name: str) -> bool:
    """Whether `engine` stops exactly on the token where the stop rule `name` turns true.

    An engine lists the rules it evaluates in an attribute `stop_rules` (a collection of names);
    one without that attribute evaluates every registered rule (HFEngine does). For a rule it does
    not evaluate, a caller sends `stop_rule_strings(name)` instead and checks the rule itself.
    """
    rules = getattr(engine, "stop_rules", None)
    return rules is None or name in rules


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k truncation
    seed: int | None = None  # per-request generator seed; None: the engine's own stream
    stop_token_ids: tuple[int, ...] = ()  # e.g. EOS; the stop token is kept in the output
    stop_strings: tuple[str, ...] = ()  # stop once the completion's text contains one of these
    stop_rule: str | None = None  # a registered StopPredicate's name (`register_stop_rule`)


# `Completion.finish_reason` of a request that `Engine.pause` cut short.
ABORTED = "aborted"


@dataclass
class Completion:
    token_ids: list[int]
    # Log-probability of each sampled token under softmax(logits / temperature) over the full
    # vocabulary (before top-p/top-k truncation): the quantity the trainer recomputes.
    logprobs: list[float]
    # "stop_token" | "stop_string" | "stop_rule" | "length", or "aborted" (ABORTED): the engine
    # was paused while the request was queued or running; token_ids and logprobs are exactly
    # what it had sampled by then (possibly nothing), and no stop condition has fired.
    finish_reason: str
    stop_token_id: int | None = None
    stop_string: str | None = None


@dataclass(frozen=True)
class EngineActivity:
    """An engine's cumulative time accounting since it started (`Engine.activity()`). Subtract
    an earlier snapshot from a later one for an interval's figures, e.g. the engine's idle
    share during a training step."""

    wall_s: float  # since the engine started
    busy_s: float  # running forward passes (admissions and decoding steps)
    paused_s: float  # from each pause() call to its resume() (a step in progress may overlap it)
    held_s: float  # paused while requests submitted meanwhile waited for resume()
    steps: int  # engine steps run (one forward pass each over the running batch)
    aborted: int  # requests resolved with a partial completion (finish_reason "aborted")
    pauses: int

    @property
    def idle_s(self) -> float:
        """Seconds without a forward pass running (waiting for requests, paused, or between steps)."""
        return self.wall_s - self.busy_s

    @property
    def idle_share(self) -> float:
        return self.idle_s / self.wall_s if self.wall_s > 0 else 0.0

    def __sub__(self, earlier: EngineActivity) -> EngineActivity:
        return EngineActivity(
            wall_s=self.wall_s - earlier.wall_s,
            busy_s=self.busy_s - earlier.busy_s,
            paused_s=self.paused_s - earlier.paused_s,
            held_s=self.held_s - earlier.held_s,
            steps=self.steps - earlier.steps,
            aborted=self.aborted - earlier.aborted,
            pauses=self.pauses - earlier.pauses,
        )


def checked_request(prompt_ids: Sequence[int], params: SamplingParams, vocab_size: int) -> list[int]:
    """The prompt as a list of ints, after the checks every engine makes on a request (an empty
    prompt, ids outside the vocabulary, sampling settings out of range): ValueError naming them."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("generate: empty prompt (at least one token is needed)")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"generate: prompt token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")
    if params.max_new_tokens < 1:
        raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if params.temperature < 0:
        raise ValueError(f"SamplingParams.temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"SamplingParams.top_k must be >= 0, got {params.top_k}")
    return prompt


@runtime_checkable
class Engine(Protocol):
    """What every generation engine provides (transformers+torch, vLLM, ...).

    Optional: an attribute `stop_rules`, the names of the stop rules the engine evaluates
    exactly (see `evaluates_stop_rule`); without it, every registered rule.

    Pausing in-flight requests (what an asynchronous collector builds on):

    - `pause()`, from any thread: every request in flight, queued or running, resolves at once
      with a partial `Completion`: the tokens it sampled so far and their sampler log-probs,
      `finish_reason="aborted"`. No token is lost or duplicated: they are exactly the tokens the
      request produced. Requests submitted while paused wait (they are not refused). When
      `pause()` returns, the engine runs no forward pass until `resume()`, so `load_weights`,
      `sleep`, `wake` and the trainer's update run with the engine idle.
    - `resume()`: the waiting requests start.
    - The caller continues a paused trajectory with a new request: prompt + the partial tokens
      (re-prefilled, under whatever weights the engine holds by then), `max_new_tokens` reduced
      by what was sampled. Stop strings and stop rules see only the new request's own
      completion, so a caller whose stop condition spans the cut (a code block opened before it)
      checks the condition over the whole segment itself, as the rollout does after a false stop.
    - Seeds: the continuation is a new request. The rollout gives each generate call its own
      seed (`cir.rollout.loop.derive_seed(seed, turn)`), so a continued trajectory is still a
      pure function of its seed and of where the pause cut it, but it samples differently from
      the same trajectory unpaused (the continuation draws from another stream). Greedy
      continuations are token-identical to the unpaused completion (tested on both engines).
    - `activity()`: cumulative seconds busy (forward passes), paused, and paused with requests
      waiting (`EngineActivity`), from which a collector reports the engine's idle share.
    - Every wait inside the engine (pause, close, weight loads) has a timeout: a stuck step ends
      in a TimeoutError, never a hang.
    """

    @property
    def tokenizer(self): ...

    @property
    def max_model_len(self) -> int | None:
        """The most tokens prompt + completion may hold (None: no limit known). The rollout
        keeps every trajectory within it."""
        ...

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        """Continue `prompt_ids`; returns only the new tokens."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take new policy weights (full tensors under Hugging Face names; one bucket of them
        per call) before the next rollout. Copies: the engine keeps no reference to them."""
        ...

    def sleep(self) -> None:
        """Free what generation holds (e.g. the KV cache on a GPU) while the trainer updates."""
        ...

    def wake(self) -> None:
        """Take back what `sleep` freed, before the next rollout."""
        ...

    def pause(self) -> None:
        """Resolve every request in flight with its partial completion ("aborted"); run no forward
        pass until `resume()`. Requests submitted meanwhile wait."""
        ...

    def resume(self) -> None:
        """Start the requests that waited while paused."""
        ...

    def activity(self) -> EngineActivity:
        """Cumulative time accounting since the engine started."""
        ...

    def close(self) -> None: ...
