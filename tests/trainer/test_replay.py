"""R²VPO replay buffer: whole groups, staleness, safe checkpoint format, resharding over DP sizes."""

from __future__ import annotations

import io

import pytest
import torch

from nemo_gdro.rollout.batch import RolloutBatch
from nemo_gdro.trainer.replay import GroupReplay, ReplayBuffer, batch_from_state, batch_to_state


def _batch(step: int, num_prompts: int, first_id: int, seed: int) -> RolloutBatch:
    """A real rollout batch of ``num_prompts`` prompts with 2-3 rows each and every field replay needs."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses, group_index = [], [], []
    for p in range(num_prompts):
        for _ in range(2 + p % 2):
            prompts.append(torch.randint(3, 20, (3,), generator=g).tolist())
            responses.append(torch.randint(3, 20, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist())
            group_index.append(p)
    ids = list(range(first_id, first_id + num_prompts))
    batch = RolloutBatch.build(prompts, responses, group_index, ids, [str(i) for i in group_index],
                               [f"r{i}" for i in range(len(prompts))], policy_version=step)
    batch.rewards = torch.rand(batch.num_rows, generator=g)
    batch.advantages = torch.randn(batch.num_rows, generator=g)
    batch.behaviour_logp = -torch.rand(batch.num_rows, batch.seq_len - 1, generator=g)
    return batch


def _run(dp_size: int, steps: int = 3, prompts: int = 6) -> list[GroupReplay]:
    """Each DP rank's buffer after ``steps`` steps (rank r holds step positions r, r + dp, ...)."""
    ranks = [GroupReplay(ReplayBuffer(staleness=5, seed=0), 1.0, r, dp_size) for r in range(dp_size)]
    for step in range(steps):
        full = _batch(step, prompts, 100 * step, seed=step)
        for r, replay in enumerate(ranks):
            mine = torch.nonzero(full.group_index % dp_size == r).flatten()
            local = full.select(mine)
            replay.mix(local, local.advantages, step)
    return ranks


def _keys(replay: GroupReplay) -> list[tuple[int, int]]:
    return [(g.version, g.position) for g in replay.buffer.groups]


def _safe_round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_is_tensors_and_plain_data_and_round_trips_exactly():
    (replay,) = _run(1)
    state = _safe_round_trip(replay.state_dict())  # weights_only: no RolloutBatch object is pickled
    other = GroupReplay(ReplayBuffer(staleness=5, seed=0), 1.0, 0, 1)
    other.load_state_dict(state)
    assert _keys(other) == _keys(replay)
    for a, b in zip(replay.buffer.groups, other.buffer.groups):
        assert torch.equal(a.rows.tokens, b.rows.tokens) and torch.equal(a.rows.behaviour_logp, b.rows.behaviour_logp)
        assert a.rows.answers == b.rows.answers and a.rows.responses == b.rows.responses
    batch = replay.buffer.groups[0].rows
    assert batch_from_state(_safe_round_trip(batch_to_state(batch))).prompt_ids.tolist() == batch.prompt_ids.tolist()


def test_reshard_dp2_to_dp1_keeps_every_group_in_run_order():
    dp2 = _run(2)
    single = GroupReplay(ReplayBuffer(staleness=5, seed=0), 1.0, 0, 1)
    single.load_resharded([_safe_round_trip(r.state_dict()) for r in dp2])
    assert _keys(single) == _keys(_run(1)[0])  # the buffer an uninterrupted DP=1 run holds
    assert len(single.buffer) == sum(len(r.buffer) for r in dp2)


@pytest.mark.parametrize("old, new", [(2, 2), (1, 3), (3, 2)])
def test_reshard_gives_each_rank_its_own_positions(old, new):
    states = [r.state_dict() for r in _run(old)]
    target = _run(new)
    for rank in range(new):
        replay = GroupReplay(ReplayBuffer(staleness=5, seed=0), 1.0, rank, new)
        replay.load_resharded(states)
        assert _keys(replay) == _keys(target[rank])
        replay.check_ownership()


def test_a_buffer_of_another_rank_is_caught():
    dp2 = _run(2)
    rank1 = GroupReplay(ReplayBuffer(staleness=5, seed=0), 1.0, 1, 2)
    rank1.buffer.groups = list(dp2[0].buffer.groups)  # what the old loader did: rank 0's groups on rank 1
    with pytest.raises(RuntimeError, match=r"DP rank 1/2 holds .* other ranks' prompt positions"):
        rank1.replicated_state()
    with pytest.raises(ValueError, match="twice"):
        rank1.load_resharded([dp2[0].state_dict(), dp2[0].state_dict()])
