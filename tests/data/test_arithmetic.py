import pytest

from nemo_gdro.data.arithmetic import (
    ArithmeticConfig,
    difficulty_histogram,
    make_problems,
    split,
)
from nemo_gdro.data.dataset import arithmetic_dataset
from nemo_gdro.data.tokenizer import CharTokenizer


def _value(p):
    return {"+": p.a + p.b, "-": p.a - p.b, "*": p.a * p.b}[p.op]


def test_deterministic_given_seed():
    assert make_problems(200, seed=5) == make_problems(200, seed=5)
    assert make_problems(200, seed=5) != make_problems(200, seed=6)
    assert make_problems(200, seed=5, stream=1) != make_problems(200, seed=5)


def test_problems_are_correct_and_formatted():
    for p in make_problems(500, seed=0):
        assert p.text == f"Q:{p.a}{p.op}{p.b}=A:"
        assert p.answer == str(_value(p))
        assert p.sft_target == p.answer
        assert p.difficulty >= 1


def test_heavy_tailed_difficulty_mix():
    probs = make_problems(4000, seed=0)
    hist = difficulty_histogram(probs)
    assert set(hist) == {1, 2, 3, 4}
    # 4-digit add/sub (the "not learnable yet" tail) is ~15% of problems
    assert 0.12 < hist[4] / len(probs) < 0.18
    # the hardest level is the rarest
    assert hist[4] == min(hist.values())
    ops = {p.op for p in probs}
    assert ops == {"+", "-", "*"}
    for p in probs:
        if p.op == "*":
            # multiplication only for small operands: <= 2 digits times one digit
            assert min(p.a, p.b) < 10 and max(p.a, p.b) < 100
            assert p.difficulty == len(str(max(p.a, p.b))) + 1
        else:
            assert p.difficulty == len(str(max(p.a, p.b)))


def test_sequences_are_short():
    tok = CharTokenizer()
    for p in make_problems(2000, seed=3):
        ids, n_prompt = p.sft_ids(tok)
        assert len(ids) < 48
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids[:n_prompt]) == p.text
        assert tok.decode(ids[n_prompt:]) == p.answer


def test_no_negative_option():
    cfg = ArithmeticConfig(allow_negative=False)
    assert all(not p.answer.startswith("-") for p in make_problems(500, seed=0, config=cfg))


def test_split_holds_out_eval():
    train = make_problems(800, seed=1)
    held = make_problems(300, seed=2)
    tr, ev = split(train, held)
    texts = {p.text for p in ev}
    assert len(texts) == len(ev)  # unique
    assert not texts & {p.text for p in tr}
    # only the overlapping problems were dropped
    assert len(tr) == sum(p.text not in texts for p in train)


def test_arithmetic_dataset_eval_disjoint_from_train():
    train, ev = arithmetic_dataset(num_train=2000, num_eval=300, seed=0)
    assert len(train) == 2000 and len(ev) == 300
    train_texts = {r.prompt for r in train}
    eval_texts = [r.prompt for r in ev]
    assert len(set(eval_texts)) == len(eval_texts)
    assert not train_texts & set(eval_texts)
    assert {r.meta["split"] for r in train} == {"train"} and {r.meta["split"] for r in ev} == {"eval"}
    assert all(isinstance(r.meta["difficulty"], int) for r in ev)
    again_train, again_eval = arithmetic_dataset(num_train=2000, num_eval=300, seed=0)
    assert again_train.prompts == train.prompts and again_eval.answers == ev.answers


def test_exhausted_space_raises():
    cfg = ArithmeticConfig(digit_probs=(1.0,), op_probs=(1.0, 0.0, 0.0))  # 100 distinct problems
    assert len(make_problems(100, seed=0, config=cfg, unique=True)) == 100
    with pytest.raises(ValueError, match="could not draw"):
        make_problems(101, seed=0, config=cfg, unique=True)


@pytest.mark.parametrize(
    "kwargs,key",
    [({"digit_probs": ()}, "digit_probs"), ({"op_probs": (0.0, 0.0, 1.0)}, "op_probs"), ({"max_mul_digits": -1}, "max_mul_digits")],
)
def test_config_validation(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ArithmeticConfig(**kwargs)
