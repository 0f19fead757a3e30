import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nemo_gdro.rollout.batch import RolloutBatch, response_mask_from_lengths


def make_batch(sizes, seed=0, step_ids=None, with_optional=True) -> RolloutBatch:
    """A batch whose every per-row field encodes its row, so misalignment is visible."""
    g = torch.Generator().manual_seed(seed)
    P = len(sizes)
    step_ids = step_ids if step_ids is not None else (torch.randperm(100, generator=g)[:P] + 1000).tolist()
    group_index = torch.repeat_interleave(torch.arange(P), torch.tensor(sizes))
    prompts, responses, answers, texts = [], [], [], []
    for r, gi in enumerate(group_index.tolist()):
        pl = int(torch.randint(1, 6, (1,), generator=g))
        rl = int(torch.randint(0, 5, (1,), generator=g))
        prompts.append([10 + gi] * pl)  # prompt tokens identify the prompt
        responses.append([200 + r] * rl)  # response tokens identify the row
        answers.append(f"ans{step_ids[gi]}")
        texts.append(f"resp{r}")
    b = RolloutBatch.build(prompts, responses, group_index, step_ids, answers, texts, policy_version=3)
    if with_optional:
        R = b.num_rows
        b.rewards = torch.arange(R, dtype=torch.float32)
        b.advantages = -torch.arange(R, dtype=torch.float32)
        b.behaviour_logp = torch.arange(R, dtype=torch.float32).unsqueeze(1) * b.response_mask
        b.engine_logp = -torch.arange(R, dtype=torch.float32).unsqueeze(1) * b.response_mask
        b.truncated = torch.arange(R) % 2 == 0
    return b.validate()


def row_signature(b: RolloutBatch, r: int):
    return (
        b.tokens[r].tolist(),
        int(b.prompt_lengths[r]),
        int(b.response_lengths[r]),
        b.response_mask[r].tolist(),
        int(b.step_prompt_ids[b.group_index[r]]),
        int(b.prompt_ids[r]),
        b.answers[r],
        b.responses[r],
        float(b.rewards[r]),
        float(b.advantages[r]),
        b.behaviour_logp[r].tolist(),
        b.engine_logp[r].tolist(),
        bool(b.truncated[r]),
    )


def test_layout_and_mask_semantics():
    b = RolloutBatch.build([[1, 5, 6], [1, 7]], [[8, 9, 2], [3]], [0, 1], [42, 7], ["a", "b"], ["x", "y"], 0)
    assert b.tokens.tolist() == [[1, 5, 6, 8, 9, 2], [1, 7, 3, 0, 0, 0]]
    # position t predicts token t+1: row 0 predicts 8, 9, 2 from t = 2, 3, 4
    assert b.response_mask.tolist() == [[False, False, True, True, True], [False, True, False, False, False]]
    assert b.tokens[:, 1:][b.response_mask].tolist() == [8, 9, 2, 3]
    assert b.num_rows == 2 and b.num_prompts == 2 and b.num_response_tokens == 4
    assert b.prompt_ids.tolist() == [42, 7]
    assert b.attention_mask().sum(1).tolist() == [6, 3]


@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=6), seed=st.integers(0, 10_000))
def test_masks_select_exactly_the_response_tokens(sizes, seed):
    b = make_batch(sizes, seed)
    for r in range(b.num_rows):
        predicted = b.tokens[r, 1:][b.response_mask[r]].tolist()
        assert predicted == [200 + r] * int(b.response_lengths[r])
    assert int(b.response_mask.sum()) == b.num_response_tokens


@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_permute_keeps_every_field_aligned(sizes, seed, data):
    b = make_batch(sizes, seed)
    perm = data.draw(st.permutations(list(range(b.num_rows))))
    p = b.permute(perm).validate()
    assert torch.equal(p.step_prompt_ids, b.step_prompt_ids)
    for k, r in enumerate(perm):
        assert row_signature(p, k) == row_signature(b, r)
        # the row's own prompt tokens still sit next to its own group
        assert p.tokens[k, 0] == 10 + int(p.group_index[k])
        assert p.answers[k] == f"ans{int(p.prompt_ids[k])}"
    back = p.permute(torch.argsort(torch.tensor(perm)))
    assert all(row_signature(back, r) == row_signature(b, r) for r in range(b.num_rows))


def test_permute_rejects_non_permutations():
    b = make_batch([2, 1])
    with pytest.raises(ValueError, match="permutation"):
        b.permute([0, 0, 1])
    with pytest.raises(ValueError, match="permutation"):
        b.permute([0, 1])


def test_select_compacts_prompts():
    b = make_batch([2, 3, 1], step_ids=[50, 60, 70])
    s = b.select([4, 0, 5]).validate()  # rows of prompts 1, 0, 2 -> prompt 1 keeps only one row
    assert s.step_prompt_ids.tolist() == [50, 60, 70]
    assert s.prompt_ids.tolist() == [60, 50, 70]
    s2 = b.select(torch.tensor([False, False, True, True, True, False])).validate()  # only prompt 1
    assert s2.step_prompt_ids.tolist() == [60]
    assert s2.group_index.tolist() == [0, 0, 0]
    assert [row_signature(s2, k)[:8] for k in range(3)] == [row_signature(b, r)[:8] for r in (2, 3, 4)]
    with pytest.raises(IndexError):
        b.select([6])


def test_concat_reindexes_groups_and_pads():
    a = make_batch([1, 2], seed=1, step_ids=[5, 6])
    c = make_batch([3], seed=2, step_ids=[5])  # the same prompt may appear in two sub-batches
    cat = RolloutBatch.concat([a, c]).validate()
    assert cat.num_rows == 6 and cat.num_prompts == 3
    assert cat.group_index.tolist() == a.group_index.tolist() + [2, 2, 2]
    assert cat.step_prompt_ids.tolist() == [5, 6, 5]
    assert cat.answers == a.answers + c.answers
    S = cat.seq_len
    for r in range(a.num_rows):
        assert cat.tokens[r, : a.seq_len].tolist() == a.tokens[r].tolist()
        assert (cat.tokens[r, a.seq_len :] == 0).all() and S >= a.seq_len
    assert cat.behaviour_logp.shape == (6, S - 1)
    assert cat.engine_logp.shape == (6, S - 1)
    assert torch.equal(cat.engine_logp[3:, : c.seq_len - 1], c.engine_logp)
    assert (cat.engine_logp[3:, c.seq_len - 1 :] == 0).all()
    assert cat.policy_version == 3 and cat.row_versions().tolist() == [3] * 6
    # mixing versions (fresh batch + replayed groups) keeps each row's own version
    c.policy_version = 1
    mixed = RolloutBatch.concat([a, c]).validate()
    assert mixed.policy_version == 3 and mixed.row_policy_version.tolist() == [3, 3, 3, 1, 1, 1]
    again = RolloutBatch.concat([mixed.select([3, 0]), a]).validate()
    assert again.row_policy_version.tolist() == [1, 3, 3, 3, 3]
    a.rewards = None
    with pytest.raises(ValueError, match="rewards"):
        RolloutBatch.concat([a, c])
    c.engine_logp = None
    with pytest.raises(ValueError, match="engine_logp"):
        RolloutBatch.concat([make_batch([1], seed=3), c])


def test_validate_catches_inconsistencies():
    b = make_batch([2, 2], step_ids=[8, 9])
    bad = b.permute(list(range(4)))
    bad.prompt_ids = torch.tensor([8, 9, 9, 9])  # row 1 claims prompt 9 but sits in group 0
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] = 9"):
        bad.validate()
    bad = b.permute(list(range(4)))
    bad.group_index = torch.tensor([0, 0, 0, 0])
    bad.prompt_ids = torch.tensor([8, 8, 8, 8])
    with pytest.raises(ValueError, match=r"does not cover prompt positions \[1\]"):
        bad.validate()
    bad = b.permute(list(range(4)))
    bad.response_lengths = bad.response_lengths + 1
    with pytest.raises(ValueError, match="response_mask does not match|longer than S"):
        bad.validate()
    bad = b.permute(list(range(4)))
    bad.answers = bad.answers[:3]
    with pytest.raises(ValueError, match="answers has 3 entries"):
        bad.validate()
    short = RolloutBatch.build([[1, 5], [1]], [[2], [3]], [0, 0], [4], ["a", "a"], ["", ""], 0)
    short.tokens[1, 2] = 9  # a token after row 1's end
    with pytest.raises(ValueError, match=r"rows \[1\] have non-pad tokens"):
        short.validate()
    bad = b.permute(list(range(4)))
    bad.engine_logp = bad.engine_logp[:, :-1]
    with pytest.raises(ValueError, match="engine_logp must have shape"):
        bad.validate()


def test_response_mask_helper_shapes():
    m = response_mask_from_lengths(torch.tensor([1, 3]), torch.tensor([2, 0]), 4)
    assert m.tolist() == [[True, True, False], [False, False, False]]
    assert make_batch([1, 3, 2]).group_sizes().tolist() == [1, 3, 2]
