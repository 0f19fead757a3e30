"""Turning a problem into the final prompt text (``data.prompt_format``, ``data.instruction``).

Two independent steps:

1. the instruction template (``data.instruction``):
   * ``none``: the text as it is in the file;
   * ``dapo``: the DAPO-Math instruction around the bare problem
     (``DAPO_PREFIX + problem + DAPO_SUFFIX``, the exact text of
     BytedTsinghua-SIA/DAPO-Math-17k). Text that already carries it (every
     DAPO-Math-17k row does) is never wrapped twice.
2. the prompt format (``data.prompt_format``):
   * ``raw``: the text is the prompt;
   * ``chat_template``: the tokenizer's chat template applied to one user turn
     with that text, no system turn, with the generation prompt
     (``data.enable_thinking`` passed through when set).

``strip_dapo`` is the inverse of step 1 for ``dapo``; the dataset loaders use it
so that a problem has the same identity (uid) whether a file stores it bare
(open-r1 processed layout) or wrapped (DAPO-Math-17k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'

PROMPT_FORMATS = ("raw", "chat_template")
INSTRUCTIONS = ("none", "dapo")


class ChatTemplater(Protocol):
    """What ``chat_template`` formatting needs from a tokenizer (``HFTokenizer`` has it)."""

    def apply_chat_template(self, user_text: str, *, enable_thinking: bool | None = None) -> str: ...


@dataclass(frozen=True)
class PromptFormat:
    """``style``: ``data.prompt_format``; ``instruction``: ``data.instruction``;
    ``enable_thinking``: ``data.enable_thinking`` (``None`` = the template's default)."""

    style: str = "raw"
    instruction: str = "none"
    enable_thinking: bool | None = None

    def __post_init__(self) -> None:
        if self.style not in PROMPT_FORMATS:
            raise ValueError(f"data.prompt_format must be one of {list(PROMPT_FORMATS)}, got {self.style!r}")
        if self.instruction not in INSTRUCTIONS:
            raise ValueError(f"data.instruction must be one of {list(INSTRUCTIONS)}, got {self.instruction!r}")
        if self.enable_thinking is not None and not isinstance(self.enable_thinking, bool):
            raise ValueError(f"data.enable_thinking must be true, false or null, got {self.enable_thinking!r}")
        if self.enable_thinking is not None and self.style != "chat_template":
            raise ValueError("data.enable_thinking is only used with data.prompt_format=chat_template")


def is_dapo_wrapped(text: str) -> bool:
    """True when ``text`` is exactly ``DAPO_PREFIX + problem + DAPO_SUFFIX``."""
    return text.startswith(DAPO_PREFIX) and text.endswith(DAPO_SUFFIX) and len(text) >= len(DAPO_PREFIX + DAPO_SUFFIX)


def strip_dapo(text: str) -> str:
    """The bare problem of a DAPO-wrapped text; any other text unchanged."""
    if is_dapo_wrapped(text):
        return text[len(DAPO_PREFIX) : len(text) - len(DAPO_SUFFIX)]
    return text


def dapo_wrap(problem: str) -> str:
    """``DAPO_PREFIX + problem + DAPO_SUFFIX``; an already wrapped text is returned as is."""
    return problem if is_dapo_wrapped(problem) else DAPO_PREFIX + problem + DAPO_SUFFIX


def apply_instruction(text: str, instruction: str) -> str:
    """Step 1 (see the module docstring)."""
    if instruction == "none":
        return text
    if instruction == "dapo":
        return dapo_wrap(text)
    raise ValueError(f"data.instruction must be one of {list(INSTRUCTIONS)}, got {instruction!r}")


def render_prompts(
    texts: Sequence[str], fmt: PromptFormat, tokenizer: object | None = None, *, instruct: bool = True
) -> list[str]:
    """Final prompt texts: the instruction (unless ``instruct=False``, for text that
    already has its own, such as a multiple-choice prompt), then the prompt format.

    ``chat_template`` needs a tokenizer with ``apply_chat_template`` (``HFTokenizer``).
    """
    out = [apply_instruction(t, fmt.instruction) for t in texts] if instruct else list(texts)
    if fmt.style == "raw":
        return out
    apply = getattr(tokenizer, "apply_chat_template", None)
    if apply is None:
        raise ValueError(
            "data.prompt_format=chat_template needs a tokenizer with a chat template (tokenizer.name=hf); "
            f"got {type(tokenizer).__name__}"
        )
    return [apply(t, enable_thinking=fmt.enable_thinking) for t in out]
