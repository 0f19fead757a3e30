import pytest
import torch

from nemo_gdro.data.tokenizer import CharTokenizer
from nemo_gdro.data.tokenizer_base import Tokenizer, check_model_vocab


def test_char_tokenizer_satisfies_the_contract():
    tok = CharTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.stop_ids == frozenset({tok.eos_id})
    # the contract methods are exactly what the HF engine and SFT already do
    assert tok.encode_prompt("Q:1+2=A:") == tok.encode("Q:1+2=A:", add_bos=True)
    assert tok.encode_target("3") == tok.encode("3", add_eos=True)
    assert tok.encode_target("3")[-1] == tok.eos_id


def test_char_decode_response_renders_specials_and_unknown_ids():
    tok = CharTokenizer()
    ids = tok.encode("12") + [tok.pad_id, tok.vocab_size + 3]
    assert tok.decode_response(ids) == "12<pad>\ufffd"
    assert tok.decode_response(torch.tensor(tok.encode("7"))) == "7"
    # the old decode keeps its behaviour
    assert tok.decode(tok.encode("12") + [tok.pad_id]) == "12"
    with pytest.raises(ValueError, match="cannot decode id"):
        tok.decode([tok.vocab_size + 3])


def test_check_model_vocab_names_both_numbers():
    tok = CharTokenizer()
    check_model_vocab(tok, tok.vocab_size)
    check_model_vocab(tok, tok.padded_vocab_size(64))
    with pytest.raises(ValueError, match=rf"vocabulary of {tok.vocab_size - 1} ids .* produces {tok.vocab_size}"):
        check_model_vocab(tok, tok.vocab_size - 1)


def test_char_contract_is_what_the_rollout_adapter_does():
    from nemo_gdro.rollout.tokenizer import engine_tokenizer

    tok = CharTokenizer()
    adapted = engine_tokenizer(tok)
    ids = [*tok.encode("Q:1+2=A:3"), tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size, tok.padded_vocab_size(64) - 1]
    assert adapted.decode(ids) == tok.decode_response(ids) == "Q:1+2=A:3<pad><bos><eos>\ufffd\ufffd"
    assert adapted.encode_prompt("Q:7=A:") == tok.encode_prompt("Q:7=A:")
    assert adapted.stop_ids == tok.stop_ids and adapted.pad_id == tok.pad_id and adapted.vocab_size == tok.vocab_size
