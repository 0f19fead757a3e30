import math

import pytest
import torch

from nemo_gdro.rollout.sampling import SamplingConfig, filter_logits, sample_rows

LOGITS = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))


def kept(x: torch.Tensor) -> list[int]:
    return torch.isfinite(x[0]).nonzero().flatten().tolist()


def test_top_k_and_top_p_keep_the_hand_computed_sets():
    assert kept(filter_logits(LOGITS, SamplingConfig(top_k=2))) == [0, 1]
    # mass before each token: 0, .5, .7, .85, .95 -> top_p 0.7 keeps tokens whose preceding mass < 0.7
    assert kept(filter_logits(LOGITS, SamplingConfig(top_p=0.7))) == [0, 1]
    assert kept(filter_logits(LOGITS, SamplingConfig(top_p=0.71))) == [0, 1, 2]
    assert kept(filter_logits(LOGITS, SamplingConfig(top_p=0.1))) == [0]  # the top token always stays
    assert kept(filter_logits(LOGITS, SamplingConfig(top_k=3, top_p=0.9))) == [0, 1, 2]
    t = filter_logits(LOGITS, SamplingConfig(temperature=0.5))
    assert torch.allclose(t, LOGITS / 0.5)


def test_sample_rows_draws_from_the_filtered_distribution_per_row_generator():
    s = SamplingConfig(top_k=3, temperature=0.8)
    logits = LOGITS.expand(4000, -1)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    tok, logp = sample_rows(logits, s, gens)
    assert set(tok.tolist()) == {0, 1, 2}
    p = torch.softmax(filter_logits(LOGITS, s), -1)[0]
    freq = torch.bincount(tok, minlength=5).double() / 4000
    assert torch.allclose(freq, p.double(), atol=0.03)
    assert torch.allclose(logp, p.log()[tok], atol=1e-6)
    # each row's draw depends only on its own generator
    again, _ = sample_rows(logits[:3], s, [torch.Generator().manual_seed(i) for i in (2, 0, 1)])
    assert again.tolist() == [int(tok[2]), int(tok[0]), int(tok[1])]


def test_greedy_takes_the_lowest_id_on_ties_and_raw_logp():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    tok, logp = sample_rows(logits, SamplingConfig(temperature=0.3), None)
    assert tok.tolist() == [1]
    assert logp.item() == pytest.approx(3.0 - math.log(math.exp(1) + 2 * math.exp(3) + 1), abs=1e-6)
    with pytest.raises(ValueError, match="2 generators for 1 rows"):
        sample_rows(logits, SamplingConfig(), [torch.Generator(), torch.Generator()])
