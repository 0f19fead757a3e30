import time

import pytest

from nemo_gdro.rewards.extract import (
    MAX_BOXED_CHARS,
    boxed_answer,
    choice_answer,
    closing_brace,
    dapo_answer,
    last_boxed,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Answer: 12", "12"),
        ("work...\nAnswer: 12\n", "12"),
        ("answer : 7", "7"),  # case-insensitive, spaces around the colon
        ("Answer:\n\\boxed{17}", "\\boxed{17}"),  # \s* after the colon crosses the newline
        ("Answer: 3\nthen more.\nAnswer: 4", "4"),  # the last match wins
        ("**Final Answer:** $\\frac{1}{2}$", "** $\\frac{1}{2}$"),  # raw line; normalisation strips decorations
        ("so \\boxed{5}.", "5"),  # fallback
        ("Answer: $$\nso \\boxed{6}", "6"),  # an empty Answer line falls back to \boxed
        ("\\boxed{3} then Answer: 8", "8"),  # Answer line before \boxed
        ("no final answer here", None),
        ("", None),
    ],
)
def test_dapo_answer_rules(text, expected):
    assert dapo_answer(text) == expected


def test_dapo_answer_reads_only_the_tail():
    head = "Answer: 1\n" + "reasoning " * 100
    assert dapo_answer(head, tail_chars=300) is None  # "Answer: 1" is outside the last 300 characters
    assert dapo_answer(head, tail_chars=5000) == "1"
    assert dapo_answer("\\boxed{9}" + "x" * 400, tail_chars=300) is None  # the box starts outside the tail
    with pytest.raises(ValueError, match="tail_chars"):
        dapo_answer("x", tail_chars=0)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("\\boxed{5}", "5"),
        ("first \\boxed{3}, finally \\boxed{5}", "5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are not grouping
        ("\\boxed {7}", "7"),
        ("\\fbox{8}", "8"),
        ("we use \\boxed here: \\boxed{9} and mention \\boxed", "9"),  # unbraced mentions skipped
        ("\\boxed{4} and then \\boxed{\\frac{1}{", None),  # the last box never closes (truncated)
        ("nothing", None),
    ],
)
def test_boxed_answer(text, expected):
    assert boxed_answer(text) == expected


def test_last_boxed_start_and_cap():
    assert last_boxed("\\boxed{1} xx \\boxed{2}", start=5) == "2"
    assert last_boxed("\\boxed{1} xx", start=5) is None
    huge = "\\boxed{" + "1" * (MAX_BOXED_CHARS + 10) + "}"
    assert boxed_answer(huge) is None
    assert closing_brace("{a{b}c}", 0) == 6 and closing_brace("{a", 0) == -1


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Answer: C", "C"),
        ("Answer: **D**", "D"),
        ("Answer: $\\boxed{B}$", "B"),
        ("Answer: (A) 4.2 eV", "A"),
        ("**Final Answer:** (A)", "A"),
        ("Answer: b", "B"),  # a lone letter of either case
        ("Answer: A and B", "A"),  # the leading letter
        ("so the pick is \\boxed{C}.", "C"),
        ("The answer is (B).", "B"),
        ("The correct answer is option C.", "C"),
        ("Reasoning...\n(C)", "C"),
        ("Reasoning...\n**B.**", "B"),
        ("Answer: E", None),  # not a choice
        ("the answer is a bit unclear", None),  # lower-case article, not a choice
        ("Answer: Because of X, it's D", None),
        ("Answer: B\nAnswer: D", "D"),  # last Answer line
        ("no idea", None),
        ("", None),
    ],
)
def test_choice_answer(text, expected):
    assert choice_answer(text) == expected


def test_choice_letters_configurable():
    assert choice_answer("Answer: E", letters="ABCDE") == "E"


@pytest.mark.parametrize(
    "text",
    [
        "x" * 200_000 + "\\boxed{" * 10_000,
        "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",
        "answer is" + " " * 5000 + "x",
        ("Answer: " + " " * 300) * 500,
        "\\" * 200_000,
    ],
)
def test_extraction_is_fast_on_adversarial_text(text):
    t0 = time.perf_counter()
    dapo_answer(text)
    boxed_answer(text)
    choice_answer(text)
    assert time.perf_counter() - t0 < 0.5  # linear-time; microseconds to milliseconds in practice
