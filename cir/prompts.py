"""Prompt templates by name, rendered to text once per problem.

The rollout tokenizes the rendered prompt once (`prompt_token_ids`); the response is never
re-tokenized. A template is either plain text (base models) or a conversation passed through
the tokenizer's chat template (instruction-tuned models).

Built-ins:

* ``"cir"`` (default, base models): plain text. Asks for step-by-step reasoning, explains that
  code in a ```` ```python ```` block is executed and its output shown in a ```` ```output ````
  block, and asks for the final answer in ``\\boxed{}``.
* ``"cir-chat"``: the same instruction as a system turn, the problem as the user turn, through
  the tokenizer's chat template with the assistant turn opened.
* ``"plain"``: the problem and the boxed-answer instruction, no tools.

Register your own::

    from cir.prompts import PromptTemplate, register_prompt
    register_prompt(PromptTemplate("short", system="", user_format="Q: {problem}\\nA:", use_chat_template=False))
"""

from __future__ import annotations

from dataclasses import dataclass

PROBLEM_PLACEHOLDER = "{problem}"

TOOL_INSTRUCTION = (
    "Solve the following math problem step by step. "
    "You may write Python code in a block that starts with ```python and ends with ```; "
    "the code will be executed and its output will appear right after it in a block that "
    "starts with ```output. Use the output to continue your reasoning. "
    "Put your final answer within \\boxed{}."
)
PLAIN_INSTRUCTION = "Solve the following math problem step by step. Put your final answer within \\boxed{}."


@dataclass(frozen=True)
class PromptTemplate:
    """How a problem becomes a prompt.

    system: instruction text; for plain-text templates it comes first, followed by a blank line
        (empty: nothing); for chat templates it is the system turn.
    user_format: the problem's text with ``{problem}`` standing for the problem statement
        (plain substitution: other braces, as in ``\\boxed{}``, are kept literally).
    use_chat_template: render through ``tokenizer.apply_chat_template`` (with the assistant
        turn opened) when the tokenizer has a chat template; plain text otherwise.
    """

    name: str
    system: str
    user_format: str
    use_chat_template: bool = False

    def __post_init__(self) -> None:
        count = self.user_format.count(PROBLEM_PLACEHOLDER)
        if count != 1:
            raise ValueError(
                f"prompt template {self.name!r}: user_format must contain {PROBLEM_PLACEHOLDER} exactly once, found {count}"
            )


_PROMPTS: dict[str, PromptTemplate] = {}


def register_prompt(template: PromptTemplate, *, overwrite: bool = False) -> PromptTemplate:
    """Make `template` available by its name."""
    if template.name in _PROMPTS and not overwrite:
        raise ValueError(f"a prompt template named {template.name!r} is already registered (pass overwrite=True)")
    _PROMPTS[template.name] = template
    return template


def get_prompt(name: str) -> PromptTemplate:
    """The template registered as `name` (the built-ins below, a task's, or your own)."""
    if name not in _PROMPTS:
        raise KeyError(f"unknown prompt template {name!r}; registered: {available_prompts()}")
    return _PROMPTS[name]


def available_prompts() -> list[str]:
    return sorted(_PROMPTS)


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(template: PromptTemplate | str, problem_text: str, tokenizer=None) -> str:
    """The prompt text for one problem.

    template: a `PromptTemplate` or a registered name. tokenizer: needed by chat templates;
    a tokenizer without a chat template gets the plain-text rendering.
    """
    if isinstance(template, str):
        template = get_prompt(template)
    user = template.user_format.replace(PROBLEM_PLACEHOLDER, problem_text)
    if template.use_chat_template:
        if tokenizer is None:
            raise ValueError(f"prompt template {template.name!r} uses the chat template: pass the tokenizer")
        if _has_chat_template(tokenizer):
            return _render_chat(template, user, tokenizer)
    if template.system:
        return template.system + "\n\n" + user
    return user


def _render_chat(template: PromptTemplate, user: str, tokenizer) -> str:
    messages = [{"role": "user", "content": user}]
    if template.system:
        messages.insert(0, {"role": "system", "content": template.system})
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:
        # Some chat templates reject a system turn; give them the instruction in the user turn.
        if not template.system or "system" not in str(exc).lower():
            raise
        merged = [{"role": "user", "content": template.system + "\n\n" + user}]
        text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected text")
    return text


def prompt_token_ids(template: PromptTemplate | str, problem_text: str, tokenizer) -> list[int]:
    """The prompt's token ids, tokenized once.

    Chat renderings already hold their special tokens as text, so they are encoded without
    adding more; plain text gets the tokenizer's usual special tokens (e.g. a BOS).
    """
    if isinstance(template, str):
        template = get_prompt(template)
    text = render(template, problem_text, tokenizer)
    chat = template.use_chat_template and _has_chat_template(tokenizer)
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


register_prompt(PromptTemplate("cir", system=TOOL_INSTRUCTION, user_format="Problem: {problem}\n\nSolution:\n"))
register_prompt(PromptTemplate("cir-chat", system=TOOL_INSTRUCTION, user_format="{problem}", use_chat_template=True))
register_prompt(PromptTemplate("plain", system=PLAIN_INSTRUCTION, user_format="Problem: {problem}\n\nSolution:\n"))
