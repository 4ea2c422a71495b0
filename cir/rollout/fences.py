"""Where a python block opens and closes in generated text.

Generation stops on the first token after which the segment's text holds an opening
```` ```python ```` (or ```` ```py ````) line followed by a line that starts with ```` ``` ````
(indented by at most three spaces). `fence_closed` is that rule as a predicate; this module
registers it with the engines under the name `PYTHON_BLOCK_CLOSED` (a stop condition as data, see
`cir.engines.base`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cir.engines.base import register_stop_rule

# The name under which engines find `fence_closed` (cir.engines.base.stop_rule).
PYTHON_BLOCK_CLOSED = "python_block_closed"


# An opening fence: ```python or ```py, optional trailing blanks, end of line. It need not
# start a line (models sometimes open a block right after prose).
_OPEN_FENCE = re.compile(r"```(?:python|py)[ \t]*\r?\n")
# A closing fence: a line that starts with three backticks, indented by at most three spaces
# as in CommonMark (byte-level BPE vocabularies have tokens such as " ```\n").
_CLOSE_FENCE = re.compile(r"^ {0,3}```", re.MULTILINE)


@dataclass(frozen=True)
class CodeBlock:
    code: str  # text between the opening fence line and the closing fence line (no final newline)
    start: int  # character offset of the opening fence in the searched text
    end: int  # character offset just past the closing fence's three backticks


def find_code_block(text: str) -> CodeBlock | None:
    """The first python block of `text` whose closing fence has been written, else None.

    The closing fence is the first line after the opening fence line that starts with
    three backticks (after at most three spaces); whatever follows them on that line is not
    part of the block.
    """
    opening = _OPEN_FENCE.search(text)
    if opening is None:
        return None
    closing = _CLOSE_FENCE.search(text, opening.end())
    if closing is None:
        return None
    code = text[opening.end() : closing.start()]
    if code.endswith("\n"):
        code = code[:-2] if code.endswith("\r\n") else code[:-1]
    return CodeBlock(code=code, start=opening.start(), end=closing.end())


def fence_closed(text: str) -> bool:
    """Stop predicate for the engine: true once a python block's closing fence is written."""
    if text.count("```") < 2:  # cheap reject: called after every sampled token
        return False
    return find_code_block(text) is not None


# An engine that cannot run the predicate after every token (vLLM) stops on "```" instead: the
# token that closes the block completes one; the opening fence may stop it early too, and the
# rollout then checks the rule itself and continues.
register_stop_rule(PYTHON_BLOCK_CLOSED, fence_closed, stand_in=("```",))
