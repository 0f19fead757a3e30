import json

import pytest

from nemo_gdro.data.arithmetic import make_problems
from nemo_gdro.data.tokenizer import DEFAULT_CHARS, CharTokenizer


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer()


def test_special_ids_and_sizes(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 3 + len(DEFAULT_CHARS)
    assert tok.padded_vocab_size() % 8 == 0 and tok.vocab_size <= tok.padded_vocab_size() < tok.vocab_size + 8
    assert tok.padded_vocab_size(1) == tok.vocab_size
    assert tok.padded_vocab_size(64) == 128
    with pytest.raises(ValueError, match="multiple"):
        tok.padded_vocab_size(0)


def test_vocabulary_is_deterministic():
    a, b = CharTokenizer(), CharTokenizer()
    assert a == b
    assert a.encode("Q:12+3=A:") == b.encode("Q:12+3=A:")
    # ids are positional: digits come right after the specials
    assert a.encode("0123456789") == list(range(3, 13))


def test_roundtrip_every_character(tok):
    text = DEFAULT_CHARS
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == len(text) + 2
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=False) == "<bos>" + text + "<eos>"


def test_every_arithmetic_prompt_and_answer_encodes(tok):
    for p in make_problems(300, seed=1):
        assert tok.decode(tok.encode(p.text)) == p.text
        assert tok.decode(tok.encode(p.answer)) == p.answer


@pytest.mark.parametrize("text,bad", [("Q:1+2=A:é", "é"), ("x^2", "^"), ("tab\there", "\t")])
def test_unknown_character_raises_naming_it(tok, text, bad):
    with pytest.raises(ValueError, match="cannot encode character") as e:
        tok.encode(text)
    assert repr(bad) in str(e.value)


def test_decode_unknown_ids(tok):
    outside = tok.vocab_size + 1  # e.g. sampled from a padded embedding row
    with pytest.raises(ValueError, match="cannot decode id"):
        tok.decode([5, outside])
    assert tok.decode([5, outside], on_unknown="replace") == "2\ufffd"
    assert tok.decode([tok.pad_id, 5, tok.eos_id]) == "2"


def test_save_load_roundtrip(tmp_path, tok):
    path = tmp_path / "tok.json"
    tok.save(path)
    again = CharTokenizer.load(path)
    assert again == tok and again.vocab_size == tok.vocab_size
    custom = CharTokenizer("0123+=")
    custom.save(path)
    assert CharTokenizer.load(path) == custom != tok


def test_load_rejects_foreign_file(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"format": "something-else", "chars": "abc"}))
    with pytest.raises(ValueError, match="not a CharTokenizer file"):
        CharTokenizer.load(path)


def test_repeated_chars_rejected():
    with pytest.raises(ValueError, match="unique"):
        CharTokenizer("0120")
