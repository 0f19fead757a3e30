import torch

from nemo_gdro.trainer.sampler import EpochSampler


def test_each_epoch_visits_every_prompt_once():
    s = EpochSampler(10, seed=3)
    a, new_a = s.next(6)
    b, new_b = s.next(4)
    assert not new_a and not new_b
    assert sorted(torch.cat([a, b]).tolist()) == list(range(10))
    c, new_c = s.next(3)
    assert new_c and s.epoch == 1
    assert sorted(torch.cat([c, s.next(7)[0]]).tolist()) == list(range(10))


def test_resume_draws_the_same_prompts():
    ref = EpochSampler(7, seed=1)
    draws = [ref.next(3)[0] for _ in range(5)]
    s = EpochSampler(7, seed=1)
    s.next(3), s.next(3)
    resumed = EpochSampler(7, seed=1)
    resumed.load_state_dict(s.state_dict())
    for expected in draws[2:]:
        assert torch.equal(resumed.next(3)[0], expected)
