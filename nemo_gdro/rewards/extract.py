r"""Final-answer extraction from model responses (pure string functions).

Every function here is linear in the length of its input (no regex with
nested quantifiers, brace matching by one scan), so it is safe to run in the
trainer process on any response, including a 200 kB one.

Rules
-----
``dapo_answer(text, tail_chars=300)`` -- what DAPO's reward does, plus the
``\boxed{}`` fallback newer verl versions added:

1. Only the last ``tail_chars`` characters of the response are searched
   (DAPO uses 300).
2. "Answer" line: the last match in the tail of ``answer\s*:\s*(.+)``
   (case-insensitive, the capture runs to the end of its line; the ``\s*``
   after the colon may cross a newline, so ``Answer:\n42`` gives ``42``).
   Its content, stripped, is the answer unless it is empty after removing
   ``$``, ``*`` and spaces (then step 3 applies).
3. Fallback: the content of the last ``\boxed{...}`` (or ``\fbox{...}``)
   whose macro starts inside the tail (``last_boxed``).
4. Otherwise no answer (``None``).

``boxed_answer(text)``: the content of the last ``\boxed{...}`` /
``\fbox{...}`` anywhere in the response (``None`` if there is none or the
last one never closes, e.g. a truncated response, or holds more than
``MAX_BOXED_CHARS`` = 10,000 characters).

``choice_answer(text, letters="ABCD", tail_chars=300)``: a multiple-choice
letter, first rule that matches wins, each taking its last match in the tail:
(1) an "Answer:" line whose content, after ``$ * ( ) [ ] { }``, ``\boxed``,
``\text``, ``\textbf``, ``\mathrm`` and spaces are dropped, starts with an
upper-case choice letter not followed by another letter (or is exactly one
letter of either case); (2) a ``\boxed{}`` holding only a letter (same
decorations allowed); (3) "answer is [option|choice] X" with an upper-case X
standing alone; (4) the last non-empty line is only a letter, e.g. ``(B)``,
``**B**``, ``B.``. Returns the upper-case letter or ``None``.
"""

from __future__ import annotations

import re
from functools import lru_cache

_ANSWER_LINE = re.compile(r"answer\s*:\s*([^\n]+)", re.IGNORECASE)
_BOX_MACROS = ("\\boxed", "\\fbox")


_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)


# A "final answer" longer than this is not one; the cap bounds the brace scan on adversarial input.
MAX_BOXED_CHARS = 10_000


def closing_brace(text: str, open_pos: int, limit: int = MAX_BOXED_CHARS) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_pos`` (escaped ``\\{ \\}`` ignored), or -1.

    Only the ``limit`` characters after ``open_pos`` are scanned (-1 if it closes later).
    """
    depth = 0
    for m in _BRACE_TOKENS.finditer(text, open_pos, open_pos + limit + 2):
        c = m.group()
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return -1


def last_boxed(text: str, start: int = 0) -> str | None:
    r"""Content of the last ``\boxed{...}`` / ``\fbox{...}`` whose macro begins at index >= ``start``.

    Occurrences of the macro name not followed by ``{`` (prose mentioning
    ``\boxed``) are skipped; the last braced one decides: its content, or
    ``None`` when it never closes.
    """
    end = len(text)
    while True:
        pos, macro = max((text.rfind(m, start, end), m) for m in _BOX_MACROS)
        if pos < 0:
            return None
        j = pos + len(macro)
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            close = closing_brace(text, j)
            return None if close < 0 else text[j + 1 : close]
        end = pos  # not a braced box: look further left


def _last_answer_line(text: str, tail_chars: int) -> tuple[int, re.Match[str] | None]:
    """(start of the searched tail, the last "Answer:" line in it or ``None``)."""
    if tail_chars < 1:
        raise ValueError(f"tail_chars must be >= 1, got {tail_chars}")
    start = max(len(text) - tail_chars, 0)
    last = None
    for m in _ANSWER_LINE.finditer(text, start):
        last = m
    return start, last


def dapo_answer(text: str, tail_chars: int = 300) -> str | None:
    """DAPO-style final answer of ``text`` (see the module docstring), or ``None``."""
    start, last = _last_answer_line(text, tail_chars)
    if last is not None:
        content = last.group(1).strip()
        if content.replace("$", "").replace("*", "").strip():
            return content
    return last_boxed(text, start)


def boxed_answer(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` anywhere in ``text``, or ``None``."""
    return last_boxed(text, 0)


# ---------------------------------------------------------------- choices
_CHOICE_DECOR = re.compile(r"\\(?:boxed|text|textbf|mathrm|mathbf|fbox)|[\s$*()\[\]{}]")


# Decorations before a leading letter; one class per position keeps matching linear-time.
_LEADING_LETTER = re.compile(r"[\s$*(\[{]*(?:\\(?:boxed|text|textbf|mathrm|mathbf)\{)?[\s(]*([A-Z])(?![A-Za-z])")


@lru_cache(maxsize=8)
def _answer_is_pattern(letters: str) -> re.Pattern[str]:
    cls = re.escape(letters)
    return re.compile(
        rf"answer\s+is[\s:$*(\[{{]*(?:(?:option|choice)\s+)?(?:\\(?:boxed|text|textbf)\{{)?[\s(]*([{cls}])(?![A-Za-z])",
        re.IGNORECASE,
    )


def _strip_decor(s: str) -> str:
    return _CHOICE_DECOR.sub("", s)


def _single_letter(s: str, letters: str) -> str | None:
    core = _strip_decor(s).rstrip(".:")
    return core.upper() if len(core) == 1 and core.upper() in letters else None


def choice_answer(text: str, letters: str = "ABCD", tail_chars: int = 300) -> str | None:
    """The chosen letter of a multiple-choice response (see the module docstring), or ``None``."""
    start, last = _last_answer_line(text, tail_chars)
    tail = text[start:]
    # (1) "Answer:" line
    if last is not None:
        content = last.group(1)
        one = _single_letter(content, letters)
        if one is not None:
            return one
        lead = _LEADING_LETTER.match(content)
        if lead is not None and lead.group(1) in letters:
            return lead.group(1)
    # (2) a boxed letter
    boxed = last_boxed(text, start)
    if boxed is not None:
        one = _single_letter(boxed, letters)
        if one is not None:
            return one
    # (3) "the answer is (B)"
    phrase = _answer_is_pattern(letters)
    found = None
    for m in phrase.finditer(tail):
        if m.group(1) in letters:  # the letter itself must be upper case
            found = m.group(1)
    if found is not None:
        return found
    # (4) the last non-empty line is only a letter
    for line in reversed(tail.splitlines()):
        if line.strip():
            return _single_letter(line, letters)
    return None
