r"""Cheap answer normalisation: the string pre-check before math-verify.

``normalize_answer`` only removes notation that never changes a value, so two
answers with equal normal forms are equal; unequal normal forms prove nothing
(``0.5`` vs ``\frac{1}{2}``) and go to math-verify -- except when both are
plain integers, which compare exactly here (``canonical_integer``). All
functions are linear-time and never call sympy.

``normalize_answer`` steps, in order: drop ``$`` and ``\$``; strip surrounding spaces,
markdown ``*`` and trailing ``.``; unwrap a whole-string
``\boxed{}`` / ``\fbox{}``; unwrap brace-free ``\text{}``, ``\textbf{}``,
``\mathrm{}``, ``\mbox{}``; ``\dfrac``/``\tfrac`` -> ``\frac``; drop
``\left``, ``\right``, the spacing macros ``\! \, \; \: \ `` and ``~``, degree
marks (``^\circ``, ``^{\circ}``, ``°``); ``{,}`` -> ``,``; remove all
whitespace; drop a trailing ``.``; drop a
leading ``+``; remove thousands separators from an integer grouped by threes
(``1,234,567``).
"""

from __future__ import annotations

import re

from nemo_gdro.rewards.extract import closing_brace

_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_SPACING = re.compile(r"\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|\\[!,;: ]|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_THOUSANDS = re.compile(r"[-+]?[0-9]{1,3}(?:,[0-9]{3})+")
_INTEGER = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)")
_SIMPLE_LHS = re.compile(r"\s*[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?\s*=(?!=)")


def _unwrap_box(s: str) -> str:
    """``\\boxed{X}`` -> ``X`` when the box spans the whole string."""
    for macro in ("\\boxed", "\\fbox"):
        if s.startswith(macro):
            j = len(macro)
            while j < len(s) and s[j] == " ":
                j += 1
            if j < len(s) and s[j] == "{" and closing_brace(s, j, len(s)) == len(s) - 1:
                return s[j + 1 : -1]
    return s


def normalize_answer(s: str) -> str:
    """Normal form of an answer string for the equality pre-check (module docstring)."""
    s = s.replace("\\$", "").replace("$", "")
    s = s.strip().strip("*").strip().rstrip(".").rstrip()
    s = _unwrap_box(s).strip()
    s = _TEXT_WRAPPERS.sub(r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SPACING.sub("", s)
    s = _DEGREES.sub("", s)
    s = s.replace("{,}", ",")
    s = "".join(s.split())
    if s.endswith("."):
        s = s[:-1]
    if s.startswith("+"):
        s = s[1:]
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def canonical_integer(s: str) -> str | None:
    """``s`` as a canonical integer literal (no leading zeros, no ``-0``) if it is one, else ``None``.

    Pure string work, so a 5000-digit literal costs microseconds (no ``int()``
    and its digit limit).
    """
    if not _INTEGER.fullmatch(s):
        return None
    neg = s.startswith("-")
    digits = s.lstrip("-").lstrip("0") or "0"
    return "-" + digits if neg and digits != "0" else digits


def is_decimal_literal(s: str) -> bool:
    """``12``, ``-0.5``, ``3.``, ``.25`` (no exponent, no separators)."""
    return bool(_DECIMAL.fullmatch(s)) and any(c.isdigit() for c in s)


def strip_variable_lhs(s: str) -> str:
    """``x = 5`` -> ``5`` (one simple left-hand side: a letter, optionally subscripted); else ``s``."""
    m = _SIMPLE_LHS.match(s)
    if m is None or "=" in s[m.end() :]:
        return s
    return s[m.end() :].strip()
