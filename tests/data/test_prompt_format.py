import pytest

from nemo_gdro.data.prompt_format import (
    DAPO_PREFIX,
    DAPO_SUFFIX,
    PromptFormat,
    apply_instruction,
    dapo_wrap,
    is_dapo_wrapped,
    render_prompts,
    strip_dapo,
)
from nemo_gdro.data.tokenizer import CharTokenizer


def test_dapo_instruction_is_the_exact_public_text():
    wrapped = dapo_wrap("What is $2+2$?")
    assert wrapped == (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nWhat is $2+2$?\n\n"
        'Remember to put your answer on its own line after "Answer:".'
    )
    assert is_dapo_wrapped(wrapped) and strip_dapo(wrapped) == "What is $2+2$?"


def test_never_double_wrapped():
    once = dapo_wrap("x")
    assert dapo_wrap(once) == once
    assert apply_instruction(once, "dapo") == once
    assert apply_instruction("x", "none") == "x"
    assert apply_instruction(once, "none") == once  # none = as in the file
    # only the exact frame counts as wrapped
    assert not is_dapo_wrapped(DAPO_PREFIX + "x")
    assert not is_dapo_wrapped("x" + DAPO_SUFFIX)
    assert strip_dapo(DAPO_PREFIX + "x") == DAPO_PREFIX + "x"


def test_raw_rendering_and_validation():
    assert render_prompts(["a", "b"], PromptFormat()) == ["a", "b"]
    assert render_prompts(["a"], PromptFormat(instruction="dapo")) == [dapo_wrap("a")]
    assert render_prompts([dapo_wrap("a")], PromptFormat(instruction="dapo"), instruct=False) == [dapo_wrap("a")]
    with pytest.raises(ValueError, match="data.prompt_format must be one of"):
        PromptFormat(style="chat")
    with pytest.raises(ValueError, match="data.instruction must be one of"):
        PromptFormat(instruction="boxed")
    with pytest.raises(ValueError, match="enable_thinking is only used with data.prompt_format=chat_template"):
        PromptFormat(enable_thinking=True)
    with pytest.raises(ValueError, match="enable_thinking must be true, false or null"):
        PromptFormat(style="chat_template", enable_thinking="yes")


def test_chat_template_needs_a_templating_tokenizer():
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template.*CharTokenizer"):
        render_prompts(["a"], PromptFormat(style="chat_template"), CharTokenizer())
