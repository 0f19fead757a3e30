import pytest

from nemo_gdro.data.prompt_format import DAPO_PREFIX, DAPO_SUFFIX
from nemo_gdro.data.text import has_cjk, normalize_prompt, prompt_uid


def test_normalisation_folds_whitespace_nfc_and_the_dapo_instruction():
    base = normalize_prompt("What is $1+1$? Caf\u00e9.")
    assert base == "What is $1+1$? Caf\u00e9."
    assert normalize_prompt("  What\tis \n$1+1$?\u00a0 Cafe\u0301.  ") == base  # NBSP, decomposed accent (NFC)
    assert normalize_prompt(DAPO_PREFIX + "What is $1+1$? Caf\u00e9." + DAPO_SUFFIX) == base
    # content, not normalisation: case, LaTeX spacing, superscripts, full-width digits
    for other in ("WHAT IS $1+1$? Caf\u00e9.", "What is $1 + 1$? Caf\u00e9.", "What is $1+1$? Caf\u00e9\u00b2.",
                  "What is $\uff11+1$? Caf\u00e9."):
        assert normalize_prompt(other) != base
    assert normalize_prompt("Point $A$ and point $a$.") != normalize_prompt("Point $a$ and point $A$.")


def test_uid_is_pinned_and_63_bit():
    # Pinned: a change here re-keys every stored per-prompt statistic of existing runs.
    assert prompt_uid("what is $1+1$?") == 2073429642347470573
    for k in range(200):
        u = prompt_uid(f"problem {k}")
        assert 0 <= u < 2**63


@pytest.mark.parametrize(
    "text,cjk",
    [
        ("Find $x$ such that $x^2 = 4$.", False),
        ("Résumé: naïve café, Ω ≥ π/2, “quotes” — dash", False),
        ("计算 $1+1$。", True),
        ("ひらがな", True),
        ("한국어", True),
        ("comma，full-width", True),
    ],
)
def test_cjk_detection(text, cjk):
    assert has_cjk(text) is cjk
