import pytest
import torch

from fastdense.buffer import NoEligibleGroups, ReplayBuffer, spread_selection
from fastdense.errors import FastdenseError

T, SHAPE = 4, (2, 3, 3)


def _rollouts(r, seed):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(r, T + 1, *SHAPE, generator=g)
    rewards = torch.rand(r, generator=g)
    old_sq = torch.rand(r, T, generator=g)
    return latents, rewards, old_sq


def test_spread_selection_keeps_extremes_and_spreads():
    rewards = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.0, 1.0, 0.4, 0.6, 0.65])
    keep = spread_selection(rewards, 5)
    kept = sorted(rewards[keep].tolist())
    assert kept[0] == 0.0 and kept[-1] == 1.0 and len(set(keep.tolist())) == 5
    with pytest.raises(FastdenseError, match="collect at least"):
        spread_selection(rewards[:3], 5)


def test_reward_gap_filter_draws_only_groups_with_a_preference():
    buf = ReplayBuffer(4, 2)
    latents, _, old_sq = _rollouts(2, 0)
    for prompt, rewards in [("tie", [1.0, 1.0]), ("near", [0.98, 1.0]), ("clear", [0.0, 1.0]),
                            ("nan", [float("nan"), 1.0])]:
        buf.add(prompt, torch.ones(5, 8), latents, torch.tensor(rewards), old_sq)
    assert buf.eligible_slots(0.0).tolist() == [0, 1, 2, 3]  # 0: every group, ties included
    assert buf.eligible_slots(0.01).tolist() == [1, 2]
    assert buf.eligible_slots(0.5).tolist() == [2]
    # gap 0 draws exactly what the unfiltered sampler drew before (same generator use)
    a = buf.sample_slots(64, torch.Generator().manual_seed(3))
    b = buf.filled_slots()[torch.randint(4, (64,), generator=torch.Generator().manual_seed(3))]
    assert torch.equal(a, b)
    picked = buf.sample_slots(64, torch.Generator().manual_seed(3), min_reward_gap=0.5)
    assert set(picked.tolist()) == {2}
    with pytest.raises(NoEligibleGroups, match=r"reward range >= 1.5 \(objective.min_reward_gap\)"):
        buf.sample_slots(1, min_reward_gap=1.5)


def test_transitions_are_adjacent_slots_of_one_tensor():
    buf = ReplayBuffer(3, 2)
    latents, rewards, old_sq = _rollouts(2, 0)
    slot = buf.add("a red circle", torch.ones(5, 8), latents, rewards, old_sq)
    order = spread_selection(rewards, 2)
    items = buf.gather(torch.tensor([slot, slot]), torch.tensor([0, 1]), torch.tensor([1, 3]))
    torch.testing.assert_close(items.x[0], latents[order[0], 1])
    torch.testing.assert_close(items.x_next[0], latents[order[0], 2])
    torch.testing.assert_close(items.x_next[1], latents[order[1], 4])
    torch.testing.assert_close(items.old_sq, torch.stack([old_sq[order[0], 1], old_sq[order[1], 3]]))
    assert not items.ref_valid.any() and torch.isnan(items.ref_sq).all()
    # no copy of states: the only latent storage is [P, G, T+1, ...]
    assert buf.latents.shape == (3, 2, T + 1, *SHAPE)


def test_fifo_capacity_and_embedding_refcount():
    buf = ReplayBuffer(2, 2)
    for i, prompt in enumerate(["p0", "p1", "p0", "p2"]):
        buf.add(prompt, torch.full((5, 8), float(i)), *_rollouts(3, i))
    assert buf.size == 2 and buf.total_added == 4
    assert sorted(p for p in buf.slot_prompt) == ["p0", "p2"]
    assert sorted(buf.embeds) == ["p0", "p2"]  # p1's embedding left with its last slot
    # the embedding is stored once per unique prompt, whatever the number of slots using it
    buf2 = ReplayBuffer(4, 2)
    for i in range(3):
        buf2.add("same", torch.ones(5, 8), *_rollouts(2, i))
    assert len(buf2.embeds) == 1


def test_ref_cache_write_back_and_nbytes():
    buf = ReplayBuffer(2, 2)
    buf.add("p", torch.ones(5, 8), *_rollouts(2, 0))
    slot, member, step = torch.tensor([0]), torch.tensor([1]), torch.tensor([2])
    buf.write_ref(slot, member, step, torch.tensor([3.5]))
    items = buf.gather(slot, member, step)
    assert items.ref_valid.item() and items.ref_sq.item() == 3.5
    latents = 2 * 2 * (T + 1) * 18 * 4
    rewards, residuals, valid, embed = 2 * 2 * 4, 2 * (2 * 2 * T * 4), 2 * 2 * T, 5 * 8 * 4
    assert buf.nbytes == latents + rewards + residuals + valid + embed


def test_save_load_round_trip(tmp_path):
    buf = ReplayBuffer(3, 2)
    for i, prompt in enumerate(["a", "b"]):
        buf.add(prompt, torch.randn(5, 8), *_rollouts(3, i), uncond_embed=torch.zeros(5, 8))
    buf.write_ref(torch.tensor([1]), torch.tensor([0]), torch.tensor([0]), torch.tensor([2.0]))
    buf.save(tmp_path / "buf")
    assert not list((tmp_path / "buf").glob("*.pt")) and not list((tmp_path / "buf").glob("*.pkl"))
    back = ReplayBuffer.load(tmp_path / "buf")
    for name in ("latents", "rewards", "old_sq", "ref_valid"):
        assert torch.equal(getattr(back, name), getattr(buf, name))
    assert torch.equal(back.ref_sq.nan_to_num(-1), buf.ref_sq.nan_to_num(-1))
    assert back.slot_prompt == buf.slot_prompt and back.next_slot == buf.next_slot
    assert all(torch.equal(back.embeds[p], buf.embeds[p]) for p in buf.embeds)
    assert back.nbytes == buf.nbytes


def test_corrupt_buffer_is_a_clear_error(tmp_path):
    (tmp_path / "buf").mkdir()
    (tmp_path / "buf" / "buffer.json").write_text("{not json")
    with pytest.raises(FastdenseError, match="cannot read the replay buffer"):
        ReplayBuffer.load(tmp_path / "buf")


def test_bad_shapes_are_refused():
    buf = ReplayBuffer(2, 2)
    latents, rewards, old_sq = _rollouts(3, 0)
    with pytest.raises(FastdenseError, match="old_sq"):
        buf.add("p", torch.ones(5, 8), latents, rewards, old_sq[:, :-1])
    with pytest.raises(FastdenseError, match="rewards"):
        buf.add("p", torch.ones(5, 8), latents, rewards[:2], old_sq)
    with pytest.raises(FastdenseError, match="capacity"):
        ReplayBuffer(0, 2)
