"""Final answers in model text: the boxed answer, and a light normal form for comparing answers.

Pure string work (no grader, no torch), so data loading can read a reference out of a worked
solution without starting anything. `extract_boxed` / `extract_all_boxed` take the content of
``\\boxed{...}`` / ``\\fbox{...}`` (nested braces handled, escaped braces ``\\{ \\}`` ignored) or
of ``\\boxed 5`` (a single token after a space).
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------------------------
# Extraction

# \boxed or \fbox not followed by another letter (so \boxedfoo is not a box).
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _scan_boxes(text: str) -> list[str | None]:
    """Every box in `text`, left to right: its content, or None when its braces never close.

    A balanced box is consumed whole (a box nested inside it is part of its content); after an
    unbalanced one the scan goes on right after the command, so a later balanced box is found.
    """
    found: list[str | None] = []
    pos = 0
    while True:
        m = _BOX_COMMAND.search(text, pos)
        if m is None:
            return found
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _matching_brace(text, i)
            if end is None:
                found.append(None)
                pos = m.end()
                continue
            found.append(_unwrap_box(text[i + 1 : end].strip()))
            pos = end + 1
        elif i > m.end() and i < len(text):
            # "\boxed 5": one token, up to white space or the end of the math ($).
            j = i
            while j < len(text) and not text[j].isspace() and text[j] != "$":
                j += 1
            token = text[i:j].rstrip(".,;:")
            found.append(token or None)
            pos = j
        else:
            found.append(None)  # "\boxed" at the end of the text, or "\boxed}" and the like
            pos = m.end()


def _matching_brace(text: str, open_index: int) -> int | None:
    """Index of the brace closing the one at `open_index`; escaped braces (\\{ \\}) do not count."""
    depth = 0
    i = open_index
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # skip the escaped character (\{, \}, \\)
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _unwrap_box(content: str) -> str:
    """``\\boxed{\\boxed{3}}`` -> ``3``: a box whose whole content is another box."""
    while True:
        m = _BOX_COMMAND.match(content)
        if m is None:
            return content
        i = m.end()
        if i < len(content) and content[i] == "{":
            end = _matching_brace(content, i)
            if end == len(content) - 1:
                content = content[i + 1 : end].strip()
                continue
        return content


def extract_all_boxed(text: str) -> list[str]:
    """The contents of all balanced boxes in `text`, in order (nested boxes count once)."""
    return [c for c in _scan_boxes(text) if c is not None]


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed X`` in `text`.

    None when there is no box, or when the last box is never closed (a response cut off
    inside its final answer has no answer, even if an earlier box exists).
    """
    boxes = _scan_boxes(text)
    return boxes[-1] if boxes else None


# A python block up to its closing fence (a line starting with ``` indented by at most three
# spaces, as the rollout closes it), or to the end of a response cut off inside it.
_PYTHON_BLOCK = re.compile(r"```(?:python|py)\b.*?(?:^[ ]{0,3}```|\Z)", re.DOTALL | re.MULTILINE)


def without_code_blocks(text: str) -> str:
    """`text` with its python blocks removed: a box written in code (``print("\\boxed{7}")``)
    is something the code prints, not an answer the model states."""
    return _PYTHON_BLOCK.sub("\n", text)


def answer_only_in_tool_output(model_text: str, full_text: str) -> bool:
    """True when the response's only boxed answer is one the interpreter printed: the model's
    own text (`model_text`, the response without its output blocks) has no box outside its
    code, and the whole response (`full_text`) has one outside its code."""
    return (
        extract_boxed(without_code_blocks(model_text)) is None
        and extract_boxed(without_code_blocks(full_text)) is not None
    )


# ---------------------------------------------------------------------------------------------
# Normalisation (the fast path and multi-box counting only; math-verify does the real work)

_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_FRAC_VARIANTS = re.compile(r"\\[dt]frac(?![A-Za-z])")


def normalize_answer(answer: str) -> str:
    """A light canonical form for exact comparison: no spacing, ``$``, ``\\left``/``\\right``;
    ``\\dfrac``/``\\tfrac`` as ``\\frac``; no trailing period. Never makes two different
    answers equal except by dropping layout."""
    s = answer.strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s.strip("$")
    s = _LEFT_RIGHT.sub("", s)
    s = _FRAC_VARIANTS.sub(r"\\frac", s)
    s = _SPACING.sub("", s)
    s = "".join(s.split())
    return s.rstrip(".")


def normalize_reference(text: str) -> str:
    """The answer held by a reference: the last box of a solution that has one, else the text
    itself (a bare answer), without surrounding ``$``."""
    text = text.strip()
    if _BOX_COMMAND.search(text):
        boxed = extract_boxed(text)
        if boxed is not None:
            return boxed
    if len(text) >= 2 and text[0] == "$" and text[-1] == "$":
        text = text.strip("$").strip()
    return text
