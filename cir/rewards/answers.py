"""Final answers in model text: the boxed answer, and a light normal form for comparing answers.

Pure string work (no grader, no torch), so data loading can read a reference out of a worked
solution without starting anything. `extract_boxed` / `extract_all_boxed` take the content of
``\\boxed{...}`` / ``\\fbox{...}`` (nested braces handled, escaped braces ``\\{ \\}`` ignored,
white space or line breaks allowed before the brace) or of ``\\boxed 5`` (a single token after
a space on the same line). `without_code_blocks` drops fenced blocks (a box written in code is
not an answer); `grading_form` and `plain_number` prepare an answer for the grader.
"""

from __future__ import annotations

import re
from decimal import Decimal

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
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _matching_brace(text, i)
            if end is None:
                found.append(None)
                pos = m.end()
                continue
            found.append(_unwrap_box(text[i + 1 : end].strip()))
            pos = end + 1
        elif i > m.end() and i < len(text) and "\n" not in text[m.end() : i]:
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


# A fenced block the model wrote: three backticks, an info string (``python``, ``python3``,
# ``output``, or none) and a line break, up to the closing fence (a line starting with ``` indented
# by at most three spaces, the rollout's rule) or to the end of a response cut off inside it.
_FENCED_BLOCK = re.compile(r"```(?P<info>[^\n`]*)\n.*?(?:^[ ]{0,3}```|\Z)", re.DOTALL | re.MULTILINE)
# The info string of the interpreter's output blocks (`RolloutConfig.feedback_template`).
OUTPUT_BLOCK_INFO = "output"


def without_code_blocks(text: str, *, keep_output: bool = False) -> str:
    """`text` without its fenced blocks: a box inside one (``print("\\boxed{7}")`` in a python
    block, a box in a ```` ```python3 ```` or ```` ```latex ```` block) is something the model put in
    code, not an answer it states.

    keep_output: keep the ```` ```output ```` blocks (the interpreter's output, when grading
    reads it too: `RewardConfig.grade_tool_output`)."""

    def drop(block: re.Match) -> str:
        if keep_output and block["info"].strip() == OUTPUT_BLOCK_INFO:
            return block[0]
        return "\n"

    return _FENCED_BLOCK.sub(drop, text)


def answer_only_in_tool_output(model_text: str, full_text: str) -> bool:
    """True when the response's only boxed answer is one the interpreter printed: the model's
    own text (`model_text`, the response without its output blocks) has no box outside its
    code, and the whole response (`full_text`) has one outside its code."""
    return (
        extract_boxed(without_code_blocks(model_text)) is None
        and extract_boxed(without_code_blocks(full_text, keep_output=True)) is not None
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


# ---------------------------------------------------------------------------------------------
# The form math-verify reads (`grading_form`) and plain numbers compared exactly (`plain_number`)

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
# The degree sign (30°) as LaTeX; a temperature scale after a degree (°C, ^\circ\text{F}) is dropped.
_DEGREE = re.compile(r"\s*°")
_DEGREE_SCALE = re.compile(r"(\^\s*\{?\s*\\circ\s*\}?)\s*(?:\\text\s*\{\s*[CFK]\s*\}|[CFK](?![A-Za-z]))")
# LaTeX spacing commands; never the second backslash of a row break ("\\ " or "\\,").
_SPACING_COMMAND = re.compile(r"(?<!\\)(?:\\[,;:! ]|\\q?quad(?![A-Za-z]))|~")
# Digits grouped by thousands with a spacing command (1\,000\,000): one number.
_GROUP_SEPARATOR = r"(?:(?<!\\)\\[,;: ]|~)"
_GROUPED_DIGITS = re.compile(rf"(?<![\d.])\d{{1,3}}(?:{_GROUP_SEPARATOR}\d{{3}})+(?![\d])")
# A whole answer in a program's scientific notation (6.72e-05, 1E+20).
_SCIENTIFIC = re.compile(rf"({_NUMBER})[eE]([+-]?\d+)")
# A plain number: decimal, scientific notation, or a mantissa times a power of ten.
_PLAIN_NUMBER = re.compile(
    rf"({_NUMBER})(?:[eE]([+-]?\d+)|\s*\\(?:times|cdot)\s*10\s*\^\s*(?:\{{\s*([+-]?\d+)\s*\}}|(\d)))?"
)
# Units: words in a text command (\text{ cm}, \mbox{ inches}^2) after an answer, a whole answer
# that is a number and its unit in text (\text{204 minutes}), or known unit words after a bare
# number (2000 calories, 15 cm^2); the unit's power optional.
_TEXT_COMMAND = r"\\(?:text|textrm|textnormal|textup|textit|textbf|mbox|mathrm)"
_WORDS = r"[A-Za-z]+\.?(?:(?:\s+|\s*/\s*)[A-Za-z]+\.?)*"
_UNIT_POWER = r"(?:\^\s*\{?\s*[23]\s*\}?)?"
_TRAILING_TEXT = re.compile(rf"(.*?\S)\s*{_TEXT_COMMAND}\s*\{{\s*({_WORDS})\s*\}}\s*{_UNIT_POWER}", re.DOTALL)
_NUMBER_IN_TEXT = re.compile(rf"{_TEXT_COMMAND}\s*\{{\s*({_NUMBER})\s*({_WORDS})\s*\}}\s*{_UNIT_POWER}")
_NUMBER_AND_WORDS = re.compile(rf"({_NUMBER})\s*({_WORDS})\s*{_UNIT_POWER}")

# Words that change what is said ("5 or more", "2 million", "3 squared", "2 pi"): text holding
# one of them is not a unit.
_NOT_UNIT_WORDS = frozenset(
    """and or to than more less fewer least most plus minus times over under not no about approximately approx
    nearly almost around roughly above below between at greater smaller larger bigger half halves third thirds
    quarter quarters hundred hundreds thousand thousands million millions billion billions trillion dozen dozens
    squared cubed factorial root roots pi i e if when where for all only none each every""".split()
)
# One-letter words that are units in text (5 m, 3 s, 2 g, 4 h, 1 l); other letters are variables.
_ONE_LETTER_UNITS = frozenset("m s g h l L".split())
# Units a bare number may end in (lower case, singular; plurals by a trailing s / es). Bare words
# may be variables ("2 ab" is 2ab), so only these count, and only words of two letters or more.
_UNIT_WORDS = frozenset(
    """mm cm dm km in inch ft foot feet yd yard mi mile meter metre millimeter millimetre centimeter centimetre
    kilometer kilometre sq square cu cubic unit sec second min minute hr hour day week month year yr mg gram kg
    kilogram lb pound oz ounce ton tonne ml milliliter millilitre liter litre gallon gal quart pint cup dollar
    cent euro rupee cal calorie kcal joule mph kph kmh degree deg radian rad people person student way apple
    orange cookie marble book page box ball coin ticket egg car card candy candies child children""".split()
)


def _words(words: str) -> list[str]:
    return [w.rstrip(".") for w in re.split(r"[\s/]+", words) if w]


def _text_is_unit(words: str) -> bool:
    """`words` written in text after a number or expression read as its unit (see `_NOT_UNIT_WORDS`)."""
    return all(w.lower() not in _NOT_UNIT_WORDS and (len(w) > 1 or w in _ONE_LETTER_UNITS) for w in _words(words))


def _bare_is_unit(words: str) -> bool:
    """`words` written after a bare number are all known units (see `_UNIT_WORDS`)."""
    for word in (w.lower() for w in _words(words)):
        if len(word) < 2 or not (
            word in _UNIT_WORDS
            or (word.endswith("s") and word[:-1] in _UNIT_WORDS)
            or (word.endswith("es") and word[:-2] in _UNIT_WORDS)
        ):
            return False
    return True


def _without_unit(s: str) -> str:
    """`s` without the unit it ends in (see `grading_form`), else `s` itself."""
    if (m := _NUMBER_IN_TEXT.fullmatch(s)) and _text_is_unit(m[2]):
        return m[1]
    if (m := _TRAILING_TEXT.fullmatch(s)) and _text_is_unit(m[2]):
        return m[1]
    if (m := _NUMBER_AND_WORDS.fullmatch(s)) and _bare_is_unit(m[2]):
        return m[1]
    return s


def grading_form(answer: str) -> str:
    """`answer` in the form math-verify reads as the value it states (the grader runs math-verify
    with its own unit list off: it drops a trailing letter as a unit, so ``x+2c`` would equal
    ``x+2``). The exact-match path and the several-boxes count use `normalize_answer` instead.

    - the degree sign: ``30°`` -> ``30^{\\circ}``, a scale after it dropped (``100°C``);
    - LaTeX spacing: ``1\\,000\\,000`` -> ``1000000``, ``10\\,\\%`` -> ``10 \\%`` (other spacing
      commands become a space);
    - a whole answer in scientific notation: ``6.72e-05`` -> ``6.72\\times10^{-05}`` (math-verify
      would read the ``e`` as Euler's number);
    - units dropped: text after an answer (``5\\text{ cm}``, ``864 \\mbox{ inches}^2``), a whole
      answer that is a number and its unit in text (``\\text{204 minutes}``), known unit words
      after a bare number (``2000 calories``, ``15 cm^2``). Text with words that change the value
      (``\\text{5 or more}``, ``\\text{2 million}``) or a lone letter other than m, s, g, h, l
      (``2\\text{ x}``) stays; after a bare number only known units count (``2 ab`` is a product).
    """
    s = answer.strip()
    s = _DEGREE.sub(r"^{\\circ}", s)
    s = _DEGREE_SCALE.sub(r"\1", s)
    s = s.replace("\u2212", "-")  # the Unicode minus sign
    s = _GROUPED_DIGITS.sub(lambda m: re.sub(_GROUP_SEPARATOR, "", m[0]), s)
    s = _SPACING_COMMAND.sub(" ", s).strip()
    if m := _SCIENTIFIC.fullmatch(s):
        return f"{m[1]}\\times10^{{{m[2]}}}"
    return _without_unit(s)


def plain_number(answer: str) -> Decimal | None:
    """The exact value of an answer that is one plain number (``0.0000672``, ``6.72e-05``,
    ``6.72\\times10^{-5}``, ``-3``), else None. Two plain numbers are compared exactly: math-verify
    rounds floats to 6 decimal places, so it would take ``0.0000672`` for ``0.0000673``."""
    m = _PLAIN_NUMBER.fullmatch(grading_form(answer))
    if m is None:
        return None
    exponent = m[2] or m[3] or m[4] or "0"
    if abs(int(exponent)) > 10_000:  # beyond any answer; math-verify decides
        return None
    return Decimal(f"{m[1]}E{exponent}")  # built from the digits: exact, no rounding
