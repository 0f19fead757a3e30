import pytest

from nemo_gdro.data.tokenizer import CharTokenizer
from nemo_gdro.rollout.tokenizer import engine_tokenizer


def test_char_tokenizer_adapter():
    t = engine_tokenizer(CharTokenizer())
    assert t.encode_prompt("Q:1+2=A:") == CharTokenizer().encode("Q:1+2=A:", add_bos=True)
    assert t.stop_ids == frozenset({2}) and t.pad_id == 0 and t.vocab_size == CharTokenizer().vocab_size
    # specials literal (a verifier scores them as wrong), ids of padded embedding rows as U+FFFD
    assert t.decode([CharTokenizer().encode("7")[0], 0, 2, 79]) == "7<pad><eos>\ufffd"
    assert engine_tokenizer(t) is t


class ContractTokenizer:
    pad_id = 5
    stop_ids = frozenset({6, 7})
    vocab_size = 10

    def encode_prompt(self, text):
        return [1] * len(text)

    def decode(self, ids):
        return "x" * len(list(ids))


def test_contract_tokenizers_pass_through_and_others_are_rejected():
    tok = ContractTokenizer()
    assert engine_tokenizer(tok) is tok
    tok.stop_ids = frozenset()
    with pytest.raises(ValueError, match="no stop_ids"):
        engine_tokenizer(tok)
    with pytest.raises(TypeError, match="not a rollout tokenizer"):
        engine_tokenizer(object())
