"""The interpreter's output as tokens: tokenized alone, appended with loss_mask 0.

Nothing is ever decoded and re-tokenized: the feedback text is rendered from the template and
encoded by itself, and its token ids are appended to the trajectory exactly as encoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cir.rollout.config import OUTPUT_PLACEHOLDER


@dataclass(frozen=True)
class Feedback:
    text: str  # exactly what decode(ids) gives back
    ids: list[int]
    output: str  # the output as shown inside the block (after truncation)
    truncated: bool


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _decode(tokenizer, ids: Sequence[int]) -> str:
    # Verbatim text (no clean-up of spaces), so fence detection sees what the engine's stop
    # predicate saw.
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def build_feedback(
    tokenizer,
    output: str,
    *,
    template: str,
    prefix: str = "",
    max_tokens: int | None = None,
    marker: str = "...[truncated]",
) -> Feedback:
    """Tokenize `prefix + template` with `output` substituted, alone.

    If that is longer than `max_tokens`, the output is cut to a head that fits together with
    `marker`, found by bisection on the character count. Every candidate is tokenized, so the
    result always fits; since token counts of heads are only nearly monotone in their length,
    the head found may be a few characters short of the longest possible. Raises ValueError
    if even an empty output with the marker does not fit.
    """

    def render(shown: str) -> tuple[str, list[int]]:
        text = prefix + template.replace(OUTPUT_PLACEHOLDER, shown)
        return text, _encode(tokenizer, text)

    text, ids = render(output)
    if max_tokens is None or len(ids) <= max_tokens:
        return Feedback(text=text, ids=ids, output=output, truncated=False)
    text, ids = render(marker)
    if len(ids) > max_tokens:
        raise ValueError(
            f"feedback template with an empty output and the truncation marker takes {len(ids)} tokens, "
            f"more than max_feedback_tokens={max_tokens}"
        )
    # Invariant: a head of `lo` characters (plus the marker) fits.
    lo, hi = 0, min(len(output), 64 * max_tokens)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(render(output[:mid] + marker)[1]) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    shown = output[:lo] + marker
    text, ids = render(shown)
    return Feedback(text=text, ids=ids, output=shown, truncated=True)
