"""RePO's replay selection (`repo_replay`) and split normalisation, against references written here from the
authors' code (SihengLi99/RePO src/replay_grpo_trainer.py `_replay_step` and the `adv_norm_mode == "split"`
branch): python deques, `sorted`, `itertools.combinations` with torch.var, not the registry entry's tensors."""

from __future__ import annotations

import itertools
import random
import statistics
from collections import deque

import pytest
import torch

from postrain.rl.registry import ADVANTAGES, SAMPLERS

NAN = float("nan")


def reference_records(buf: deque, strategy: str, k_max: int, min_cache: int, draws=None) -> list[int]:
    """Positions (in buffer order) of the records `_replay_step` picks for one prompt's deque of rewards."""
    if len(buf) < min_cache:
        return []
    k = len(buf) if strategy == "all" else min(len(buf), k_max)
    positions = list(range(len(buf)))
    if strategy == "all":
        return positions
    if strategy == "highest_k":  # sorted(buf, key=reward, reverse=True)[:k]: Python's sort is stable
        return sorted(sorted(positions, key=lambda j: buf[j], reverse=True)[:k])
    if strategy == "recent_k":
        return positions[-k:]
    if strategy == "random_k":  # a uniform k-subset: here, the positions of the k smallest draws
        return sorted(sorted(positions, key=lambda j: draws[j])[:k])
    best_var, best_sum, best = -float("inf"), -float("inf"), None  # max_variance_k, as the authors loop
    for subset in itertools.combinations(positions, k):
        scores = torch.tensor([buf[j] for j in subset])
        var, total = torch.var(scores, unbiased=False).item(), scores.sum().item()
        if var > best_var or (var == best_var and total > best_sum):
            best_var, best_sum, best = var, total, subset
    return list(best)


def as_padded(buffers: list[deque], width: int) -> torch.Tensor:
    return torch.tensor([list(b) + [NAN] * (width - len(b)) for b in buffers])


BUFFERS = [deque([1.0, 0.0, 1.0, 0.5, 0.0, 1.0]),   # ties among the highest: the older ones first
           deque([0.0, 0.0, 0.0, 1.0]),              # fewer than min_cache=5 below: no replay
           deque([0.2, 0.9, 0.9, 0.1, 0.4, 0.7, 0.3, 0.8]),  # full
           deque([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0])]


@pytest.mark.parametrize("strategy", ["all", "highest_k", "recent_k", "random_k", "max_variance_k"])
@pytest.mark.parametrize("k, min_cache", [(3, 5), (4, 1), (8, 4)])
def test_selection_matches_the_authors_replay_step(strategy, k, min_cache):
    width = 8
    gen = torch.Generator().manual_seed(3)
    draws = torch.rand(len(BUFFERS), width, generator=gen)
    chosen = SAMPLERS.call("repo_replay", {"buffer_rewards": as_padded(BUFFERS, width), "draws": draws},
                           {"strategy": strategy, "num_replays": k, "min_buffer_size": min_cache})
    assert chosen.shape == (len(BUFFERS), width) and chosen.dtype == torch.bool
    for p, buf in enumerate(BUFFERS):
        expected = reference_records(buf, strategy, k, min_cache, draws[p].tolist())
        assert torch.nonzero(chosen[p]).flatten().tolist() == expected, (p, strategy)
    if strategy != "all" and min_cache == 5:
        assert chosen.sum(-1).tolist() == [3, 0, 3, 3]


def test_max_variance_ties_go_to_the_larger_sum_then_the_first_subset():
    buf = deque([0.0, 1.0, 0.0, 1.0, 2.0, 2.0])  # {0, 2} and {0, 2} and ... : var 1 for many pairs
    chosen = SAMPLERS.call("repo_replay", {"buffer_rewards": as_padded([buf], 6)},
                           {"strategy": "max_variance_k", "num_replays": 2, "min_buffer_size": 1})
    assert torch.nonzero(chosen[0]).flatten().tolist() == reference_records(buf, "max_variance_k", 2, 1) == [0, 4]


def test_random_k_is_a_uniform_subset_of_the_filled_slots():
    buf = deque([0.0, 1.0, 2.0, 3.0])
    counts = torch.zeros(6)
    gen = torch.Generator().manual_seed(0)
    for _ in range(600):
        chosen = SAMPLERS.call("repo_replay", {"buffer_rewards": as_padded([buf], 6),
                                              "draws": torch.rand(1, 6, generator=gen)},
                               {"strategy": "random_k", "num_replays": 2, "min_buffer_size": 4})
        counts += chosen[0].float()
    assert counts[4:].sum() == 0  # never an empty slot
    assert counts[:4].tolist() == pytest.approx([300.0] * 4, rel=0.15)  # each slot in half the draws


@pytest.mark.parametrize("bad, match", [
    ({"strategy": "highest"}, "unknown strategy 'highest'"),
    ({"strategy": "random_k"}, "needs `draws`"),
])
def test_bad_calls_say_what_is_wrong(bad, match):
    with pytest.raises(ValueError, match=match):
        SAMPLERS.call("repo_replay", {"buffer_rewards": as_padded([deque([1.0])], 2)}, bad)


def test_a_gap_in_the_buffer_is_refused():
    with pytest.raises(ValueError, match="fill its first slots"):
        SAMPLERS.call("repo_replay", {"buffer_rewards": torch.tensor([[1.0, NAN, 0.0]])}, {"min_buffer_size": 1})


def test_split_normalisation_is_the_grpo_entry_over_the_replayed_rewards():
    """The authors' split branch for the off-policy rows: per prompt over its R replayed rewards,
    (r - mean) / (std + 1e-4) with torch's unbiased std (scale_rewards=true), the on-policy rows apart."""
    random.seed(1)
    replayed = [[random.choice([0.0, 1.0, 0.5]) for _ in range(8)] for _ in range(3)] + [[1.0] * 8]
    got = ADVANTAGES.call("grpo", {"rewards": torch.tensor(sum(replayed, [])), "group_size": 8}, {})
    expected = []
    for r in replayed:
        mean, std = statistics.fmean(r), statistics.stdev(r)
        expected += [(x - mean) / (std + 1e-4) for x in r]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert got[-8:].abs().max() == 0  # an all-equal replay group: no signal
