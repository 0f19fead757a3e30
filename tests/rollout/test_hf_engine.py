"""The CPU rollout engine on a real tiny random Qwen3 model (no mocks)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nemo_gdro.data.dataset import PromptDataset, PromptRecord, arithmetic_dataset  # noqa: E402
from nemo_gdro.data.tokenizer import CharTokenizer  # noqa: E402
from nemo_gdro.rewards.arithmetic import ArithmeticVerifier  # noqa: E402
from nemo_gdro.rollout.batch import RolloutBatch  # noqa: E402
from nemo_gdro.rollout.hf_engine import HFRolloutEngine, SamplingConfig  # noqa: E402
from nemo_gdro.rollout.seeds import prompt_seeds  # noqa: E402

TOK = CharTokenizer()


def seeds_for(records, step=0, base=11):
    return prompt_seeds(base, step, [r.prompt_id for r in records])


def tiny_config(tie: bool = True) -> "transformers.Qwen3Config":
    return transformers.Qwen3Config(
        vocab_size=TOK.padded_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=TOK.pad_id,
        bos_token_id=TOK.bos_id,
        eos_token_id=TOK.eos_id,
    )


@pytest.fixture(scope="module")
def data() -> PromptDataset:
    train, _ = arithmetic_dataset(num_train=50, num_eval=5, seed=0)
    return train


@pytest.fixture(scope="module")
def engine() -> HFRolloutEngine:
    return HFRolloutEngine(tiny_config(), TOK, SamplingConfig(max_new_tokens=6), seed=11)


def test_variable_n_in_one_call_is_aligned(engine, data):
    ids = [17, 3, 42, 8]
    n = torch.tensor([3, 1, 5, 2])
    records = data.get_many(ids)
    b = engine.generate(records, n, seeds_for(records))
    assert b.num_rows == 11 and b.num_prompts == 4
    assert b.group_index.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 3]
    assert b.step_prompt_ids.tolist() == ids
    assert torch.equal(b.group_sizes(), n)
    for r in range(b.num_rows):
        rec = data[int(b.prompt_ids[r])]
        assert rec.prompt_id == ids[int(b.group_index[r])]
        assert b.answers[r] == rec.answer  # scored against its own prompt's ground truth
        pl = int(b.prompt_lengths[r])
        assert b.tokens[r, :pl].tolist() == TOK.encode(rec.prompt, add_bos=True)
    # ... and that survives a reordering
    perm = torch.randperm(b.num_rows, generator=torch.Generator().manual_seed(0))
    p = b.permute(perm)
    assert [data[int(i)].answer for i in p.prompt_ids] == p.answers
    rewards = ArithmeticVerifier().score_batch(b.responses, b.answers)
    assert rewards.shape == (11,)


def test_masks_consistent_with_lengths(engine, data):
    recs = data.get_many([0, 1, 2])
    b = engine.generate(recs, [4, 4, 4], seeds_for(recs, step=1))
    b.validate()
    assert (b.response_lengths >= 1).all() and (b.response_lengths <= 6).all()
    assert int(b.response_mask.sum()) == b.num_response_tokens
    for r in range(b.num_rows):
        pl, rl = int(b.prompt_lengths[r]), int(b.response_lengths[r])
        assert b.response_mask[r].nonzero().flatten().tolist() == list(range(pl - 1, pl + rl - 1))
        assert (b.tokens[r, pl + rl :] == TOK.pad_id).all()
        resp = b.tokens[r, pl : pl + rl].tolist()
        # eos appears only as the final response token, exactly when not truncated
        assert (TOK.eos_id in resp) == (not bool(b.truncated[r]))
        assert TOK.eos_id not in resp[:-1]
        if b.truncated[r]:
            assert rl == 6
        expected = resp[:-1] if resp[-1] == TOK.eos_id else resp
        assert b.responses[r] == TOK.decode(expected, skip_special=False, on_unknown="replace")
    assert b.policy_version == -1
    # the engine's log-probs of the sampled tokens sit exactly on the response mask
    assert b.engine_logp.shape == b.response_mask.shape
    assert (b.engine_logp[~b.response_mask] == 0).all()
    assert (b.engine_logp[b.response_mask] < 0).all()


def test_deterministic_per_seed_and_rng_untouched(engine, data):
    records = data.get_many([5, 6])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = engine.generate(records, [3, 3], seeds_for(records, step=7))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is not consumed
    b = engine.generate(records, [3, 3], seeds_for(records, step=7))
    c = engine.generate(records, [3, 3], seeds_for(records, step=8))
    assert torch.equal(a.tokens, b.tokens) and a.responses == b.responses
    assert not torch.equal(a.tokens, c.tokens)
    # Samples depend on (prompt, n, seed, weights) only: another engine instance
    # (other init seed) with the same weights and seeds samples the same rows.
    other = HFRolloutEngine(tiny_config(), TOK, SamplingConfig(max_new_tokens=6), seed=12)
    other.load_weights(engine.model.state_dict(), version=0)
    assert torch.equal(other.generate(records, [3, 3], seeds_for(records, step=7)).tokens, a.tokens)


def hand_set_eos_engine(max_new_tokens: int) -> HFRolloutEngine:
    """A model whose next token depends only on the current token: after ':' or '7' it
    emits '7' or <eos> with equal probability (attention and MLP outputs zeroed, so the
    residual stream is the current token's embedding)."""
    eng = HFRolloutEngine(tiny_config(tie=False), TOK, SamplingConfig(max_new_tokens=max_new_tokens), seed=0)
    sd = {k: torch.zeros_like(v) if k.endswith(("o_proj.weight", "down_proj.weight")) else v.clone()
          for k, v in eng.model.state_dict().items()}
    e0 = torch.zeros(32)
    e0[0] = 1.0
    emb = torch.zeros_like(sd["model.embed_tokens.weight"])
    emb[:, 1] = 1.0
    seven, colon = TOK.encode("7")[0], TOK.encode(":")[0]
    emb[seven], emb[colon] = e0, e0
    head = torch.zeros_like(sd["lm_head.weight"])
    head[seven], head[TOK.eos_id] = 3.0 * e0, 3.0 * e0
    sd["model.embed_tokens.weight"], sd["lm_head.weight"] = emb, head
    sd["model.norm.weight"] = torch.ones_like(sd["model.norm.weight"])
    eng.load_weights(sd, version=5)
    return eng


def test_eos_stops_a_sequence():
    eng = hand_set_eos_engine(max_new_tokens=5)
    recs = [PromptRecord(0, "Q:3+4=A:", "7"), PromptRecord(1, "Q:70+7=A:", "77")]
    b = eng.generate(recs, [16, 16], [0, 1])
    assert b.policy_version == 5
    lengths = set(b.response_lengths.tolist())
    assert len(lengths) >= 3  # rows stop at different points in one batch
    for r in range(b.num_rows):
        pl, rl = int(b.prompt_lengths[r]), int(b.response_lengths[r])
        resp = b.tokens[r, pl : pl + rl].tolist()
        if b.truncated[r]:
            assert rl == 5 and resp == [TOK.encode("7")[0]] * 5
        else:
            # everything before the first eos is '7', the sequence ends at eos, then padding
            assert resp[-1] == TOK.eos_id and b.responses[r] == "7" * (rl - 1)
        assert (b.tokens[r, pl + rl :] == TOK.pad_id).all()
    rewards = ArithmeticVerifier().score_batch(b.responses, b.answers)
    expected = [float(t == a) for t, a in zip(b.responses, b.answers)]
    assert rewards.tolist() == expected and 0 < sum(expected) < b.num_rows
    greedy = eng.generate(recs, [2, 1], [0, 1], greedy=True)
    # logits tie between '7' and eos: argmax picks the lower id, eos (2)
    assert greedy.response_lengths.tolist() == [1, 1, 1] and greedy.responses == ["", "", ""]


def test_greedy_is_seed_free_and_padding_invariant(engine, data):
    short, long = PromptRecord(0, "Q:1+2=A:", "3"), PromptRecord(1, "Q:1234-5678=A:", "-4444")
    alone = engine.generate([short], [1], [0], greedy=True)
    batched = engine.generate([long, short], [2, 2], [5, 9], greedy=True)
    assert batched.responses[2] == batched.responses[3] == alone.responses[0]
    assert batched.responses[0] == batched.responses[1]
    pl = int(alone.prompt_lengths[0])
    assert batched.tokens[2, : int(batched.sequence_lengths[2])].tolist() == alone.tokens[0, : pl + int(alone.response_lengths[0])].tolist()


def test_load_weights_is_strict_and_takes_effect(data):
    eng = HFRolloutEngine(tiny_config(), TOK, SamplingConfig(max_new_tokens=6), seed=1)
    sd = {k: v.clone() for k, v in eng.model.state_dict().items()}
    recs = data.get_many([0, 1, 2, 3])
    before = eng.generate(recs, [1, 1, 1, 1], [0, 0, 0, 0], greedy=True)

    missing = {k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\]"):
        eng.load_weights(missing, version=1)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        eng.load_weights({**sd, "extra.weight": torch.zeros(1)}, version=1)
    wrong = dict(sd)
    wrong["model.norm.weight"] = torch.ones(33)
    with pytest.raises(ValueError, match=r"model.norm.weight: expected \[32\], got \[33\]"):
        eng.load_weights(wrong, version=1)
    untied = {**sd, "lm_head.weight": sd["lm_head.weight"] + 1.0}
    with pytest.raises(ValueError, match="ties word embeddings"):
        eng.load_weights(untied, version=1)
    assert eng.policy_version == -1

    g = torch.Generator().manual_seed(5)
    new = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in sd.items() if k != "lm_head.weight"}
    eng.load_weights(new, version=1)  # tied embeddings: lm_head.weight may be omitted
    assert eng.policy_version == 1
    assert torch.equal(eng.model.lm_head.weight, new["model.embed_tokens.weight"])
    after = eng.generate(recs, [1, 1, 1, 1], [0, 0, 0, 0], greedy=True)
    assert after.policy_version == 1
    assert not torch.equal(after.tokens, before.tokens)
    # an iterable of (name, tensor) pairs works like a mapping; a repeated name is an error
    eng.load_weights(iter(sd.items()), version=2)
    assert eng.policy_version == 2
    assert torch.equal(eng.generate(recs, [1, 1, 1, 1], [0, 0, 0, 0], greedy=True).tokens, before.tokens)
    with pytest.raises(ValueError, match="'model.norm.weight' given twice"):
        eng.load_weights([*sd.items(), ("model.norm.weight", sd["model.norm.weight"])], version=3)
    assert eng.policy_version == 2


def test_argument_validation(engine, data):
    recs = data.get_many([0, 1])
    with pytest.raises(ValueError, match="2 prompts"):
        engine.generate(recs, [1], [0, 0])
    with pytest.raises(ValueError, match=">= 1"):
        engine.generate(recs, [1, 0], [0, 0])
    with pytest.raises(ValueError, match="seeds has 1 entries for 2 prompts"):
        engine.generate(recs, [1, 1], [0])
    with pytest.raises(ValueError, match="seeds must be >= 0"):
        engine.generate(recs, [1, 1], [0, -3])
    with pytest.raises(ValueError, match="generate needs seeds"):
        engine.generate(recs, [1, 1])
    with pytest.raises(ValueError, match="prompt 0: .*cannot encode"):
        engine.generate([PromptRecord(0, "what is 2^3?", "8")], [1], [0])
    small = tiny_config()
    small.vocab_size = 10
    with pytest.raises(ValueError, match="vocab_size"):
        HFRolloutEngine(small, TOK)
    with pytest.raises(ValueError, match="sampling.top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="sampling.temperature"):
        SamplingConfig(temperature=0.0)


def test_top_k_and_temperature_are_applied():
    # top_k=1 sampling is argmax: it must equal greedy decoding whatever the step.
    eng = HFRolloutEngine(tiny_config(), TOK, SamplingConfig(max_new_tokens=6, top_k=1), seed=2)
    recs = [PromptRecord(0, "Q:12+30=A:", "42")]
    sampled = eng.generate(recs, [3], [4])
    greedy = eng.generate(recs, [1], [0], greedy=True)
    assert sampled.responses == greedy.responses * 3


def rows(b: RolloutBatch) -> list[tuple]:
    """Each row's content in batch order, independent of the batch's padding width."""
    out = []
    for r in range(b.num_rows):
        L = int(b.sequence_lengths[r])
        m = b.response_mask[r]
        out.append((
            int(b.prompt_ids[r]), b.tokens[r, :L].tolist(), b.responses[r], b.answers[r],
            bool(b.truncated[r]), b.engine_logp[r][m].tolist(),
        ))
    return out


def test_rows_do_not_depend_on_the_dp_layout(engine, data):
    """The step's prompt list split over two "ranks" in different ways gives exactly the rows of one call."""
    ids = [17, 3, 42, 3, 8, 25, 17, 9]  # 3 and 17 drawn twice in the step (a resampler may)
    n = torch.tensor([3, 1, 5, 2, 4, 1, 2, 3])
    records = data.get_many(ids)
    seeds = prompt_seeds(11, 5, ids)  # over the whole step, before any split
    whole = rows(engine.generate(records, n, seeds))
    # the two copies of prompt 3 (positions 1 and 3) got different seeds, hence their own samples
    assert seeds[1] != seeds[3]

    def split(parts: list[list[int]]) -> list[tuple]:
        by_pos: dict[int, list[tuple]] = {}
        for part in parts:  # each "rank" generates only its prompt positions
            b = engine.generate([records[i] for i in part], n[part], seeds[part])
            got = rows(b)
            for k, i in enumerate(part):
                by_pos[i] = [got[r] for r in range(b.num_rows) if int(b.group_index[r]) == k]
        return [row for i in range(len(ids)) for row in by_pos[i]]

    def same(got: list[tuple]) -> bool:
        """Identical rows (tokens, responses, truncation); engine log-probs up to the float rounding of the
        other batch shape (all prompts of a call decode together, left-padded to the longest)."""
        return [r[:5] for r in got] == [r[:5] for r in whole] and all(
            torch.allclose(torch.tensor(a[5]), torch.tensor(b[5]), atol=1e-5, rtol=0) for a, b in zip(got, whole)
        )

    assert same(split([[0, 2, 4, 6], [1, 3, 5, 7]]))  # DP=2, strided (the loop's split)
    assert same(split([[0, 1, 2], [3, 4, 5, 6, 7]]))  # uneven contiguous split
    assert same(split([[7, 3, 0], [5, 1, 2, 6, 4]]))  # any order, any rank
    assert same(split([[i] for i in range(len(ids))]))  # every prompt alone


def test_more_rollouts_keep_the_first_ones(engine, data):
    rec = data.get_many([4])
    few = engine.generate(rec, [2], [1234])
    many = engine.generate(rec, [5], [1234])
    # rollout j samples with seed + j, whatever n is (log-probs agree up to the
    # float rounding of the other batch shape)
    assert [r[:5] for r in rows(many)[:2]] == [r[:5] for r in rows(few)]
    assert torch.allclose(many.engine_logp[:2, : few.seq_len - 1], few.engine_logp, atol=1e-5)
    assert len({tuple(r[1]) for r in rows(many)}) > 1


def test_engine_logp_is_the_sampling_distribution(data):
    """engine_logp equals log_softmax(logits / T) of the same model recomputed on the batch (top-k/p off)."""
    s = SamplingConfig(max_new_tokens=6, temperature=0.7)
    eng = HFRolloutEngine(tiny_config(), TOK, s, seed=3)
    recs = data.get_many([1, 2, 3])
    b = eng.generate(recs, [2, 3, 1], seeds_for(recs))
    with torch.no_grad():
        logits = eng.model(input_ids=b.tokens, attention_mask=b.attention_mask().long()).logits[:, :-1]
    ref = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, b.tokens[:, 1:, None])[..., 0]
    m = b.response_mask
    assert torch.allclose(b.engine_logp[m], ref[m], atol=1e-5, rtol=0)


def test_one_forward_per_token_for_all_prompts(data):
    """All prompts of a call decode together: the model runs once for the prefill and once per further
    token, whatever the number of prompts (one loop per prompt ran P times as many forwards)."""
    eng = HFRolloutEngine(tiny_config(), TOK, SamplingConfig(max_new_tokens=5), seed=11)
    records = data.get_many([17, 3, 42, 8, 25])  # prompts of different lengths
    calls = []
    hook = eng.model.register_forward_hook(lambda module, args, kwargs_out: calls.append(1))
    try:
        b = eng.generate(records, [3, 1, 2, 2, 4], seeds_for(records))
    finally:
        hook.remove()
    assert len({len(TOK.encode(r.prompt)) for r in records}) > 1
    assert len(calls) == int(b.response_lengths.max())  # <= max_new_tokens, not 5x that
