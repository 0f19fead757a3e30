"""Prompt identity: normalised text, the stable 63-bit uid, the CJK test.

Normalisation (what two rows must share to be the same prompt):

1. the DAPO instruction is removed when the text carries it exactly
   (``prompt_format.strip_dapo``), so a wrapped and a bare copy of a problem are one prompt;
2. Unicode NFC (composed and decomposed accents are one text);
3. every run of whitespace (spaces, tabs, newlines, NBSP...) -> one space, ends stripped.

Nothing else, on purpose: case is content in mathematics (points ``A``/``a``,
variables, units), and NFKC would turn ``x²`` into ``x2``; folding either could
merge two different problems, and two merged problems with different answers
are a load error. LaTeX spacing (``$x$`` vs ``$ x $``) stays distinct too.
The uid is the first 8 bytes of BLAKE2b over the UTF-8 normalised text with
the top bit cleared, so it fits an int64 tensor and is the same on every
machine and Python version (unlike ``hash``).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from nemo_gdro.data.prompt_format import strip_dapo

_WS = re.compile(r"\s+")
# Han (incl. extensions A-F and compatibility ideographs), kana, Hangul,
# CJK punctuation / symbols and full-width forms (the ``，`` of Chinese text).
_CJK = re.compile(
    "[\u3000-\u303f\u3040-\u30ff\u3100-\u312f\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\U00020000-\U0002ebef]"
)
UID_BITS = 63


def normalize_prompt(text: str) -> str:
    """The dedup key of a prompt (see the module docstring)."""
    text = unicodedata.normalize("NFC", strip_dapo(text))
    return _WS.sub(" ", text).strip()


def prompt_uid(normalized: str) -> int:
    """Stable uid in ``[0, 2**63)`` of an already normalised text."""
    digest = hashlib.blake2b(normalized.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - UID_BITS)


def has_cjk(text: str) -> bool:
    """True when ``text`` holds a Chinese / Japanese / Korean character (the English filter)."""
    return _CJK.search(text) is not None
