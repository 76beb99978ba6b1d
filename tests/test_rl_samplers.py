"""Samplers / filters vs independent references written from the papers' rules (per-group Python loops)."""

import math

import pytest
import torch

from postrain.rl.registry import SAMPLERS
from postrain.rl.samplers import greso_streaks

G = 4


def _fn(name):
    return SAMPLERS.get(name).fn


def _groups(values, group_size):
    return [values[g:g + group_size] for g in range(0, len(values), group_size)]


def _mask_from_lengths(lengths, T):
    return torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])


REWARDS = [1.0, 1.0, 1.0, 1.0,   0.0, 0.0, 0.0, 0.0,   1.0, 0.0, 0.0, 0.0,   0.0, 1.0, 1.0, 0.0,   0.5, 0.5, 0.5, 0.2]


# ---------------------------------------------------------------- group filters

def test_dynamic_sampling_matches_reference():
    out = _fn("dynamic_sampling")(torch.tensor(REWARDS), G)
    ref = [len(set(g)) > 1 for g in _groups(REWARDS, G)]
    assert out.tolist() == ref == [False, False, True, True, True]


def test_dynamic_sampling_degenerate():
    assert not _fn("dynamic_sampling")(torch.ones(8), G).any()  # every group filtered
    assert _fn("dynamic_sampling")(torch.tensor([0.0, 1.0, 1.0]), 1).all()  # a group of one is kept


def test_reinforce_rej_drops_all_correct_and_all_wrong():
    pm = [1.0, 1.0, 1.0, 1.0,   -1.0, -1.0, -1.0, -1.0,   1.0, -1.0, -1.0, -1.0,   -1.0, 1.0, 1.0, 1.0]
    ref = [not (all(x > 0 for x in g) or all(x <= 0 for x in g)) for g in _groups(pm, G)]
    assert _fn("reinforce_rej")(torch.tensor(pm), G).tolist() == ref == [False, False, True, True]
    assert _fn("reinforce_rej")(torch.tensor([1.0, -1.0]), 1).all()


def test_raft_pp_keeps_positive_rows():
    pm = torch.tensor([1.0, -1.0, 0.0, 0.3, -0.2, 1.0, 1.0, -1.0])
    assert _fn("raft_pp")(pm, G).tolist() == [x > 0 for x in pm.tolist()]
    assert not _fn("raft_pp")(-torch.ones(4), G).any()


@pytest.mark.parametrize("low,high", [(0.25, 0.75), (0.0, 1.0), (0.5, 0.5), (0.3, 0.6)])
def test_online_difficulty_matches_reference(low, high):
    out = _fn("online_difficulty")(torch.tensor(REWARDS), G, low=low, high=high)
    ref = [low <= sum(x > 0 for x in g) / len(g) <= high for g in _groups(REWARDS, G)]
    assert out.tolist() == ref


def test_online_difficulty_behaviour():
    keep = _fn("online_difficulty")(torch.tensor(REWARDS), G, low=0.01, high=0.99)
    assert keep.tolist() == [False, False, True, True, False]  # 0 < p < 1 (last group: all r > 0)
    assert _fn("online_difficulty")(torch.tensor([1.0, 0.0]), 1, low=0.0, high=1.0).all()
    assert not _fn("online_difficulty")(torch.tensor([1.0, 0.0]), 1, low=0.2, high=0.8).any()


# ---------------------------------------------------------------- GRESO

def _greso_keep_ref(easy_k, hard_k, u, p_easy, p_hard):
    # presampling_selector.py: easy check first, then hard, each skips if rand < 1 - max(p**k, 0.01)
    if easy_k > 0 and u < 1 - max(p_easy ** easy_k, 0.01):
        return False
    if hard_k > 0 and u < 1 - max(p_hard ** hard_k, 0.01):
        return False
    return True


@pytest.mark.parametrize("p_easy,p_hard", [(0.5, 0.5), (0.75, 0.3)])
def test_greso_matches_reference(p_easy, p_hard):
    torch.manual_seed(0)
    easy = torch.tensor([0, 1, 2, 0, 0, 7, 0, 3, 0, 12])
    hard = torch.tensor([0, 0, 0, 1, 4, 0, 9, 0, 0, 0])
    u = torch.rand(10)
    out = _fn("greso")(easy, hard, u, p_easy=p_easy, p_hard=p_hard)
    ref = [_greso_keep_ref(e, h, x, p_easy, p_hard) for e, h, x in zip(easy.tolist(), hard.tolist(), u.tolist())]
    assert out.tolist() == ref


def test_greso_behaviour():
    u = torch.tensor([0.0, 0.5, 0.98, 0.995])
    assert _fn("greso")(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), u).all()  # no history
    long_easy = _fn("greso")(torch.full((4,), 50), torch.zeros(4, dtype=torch.long), u)
    assert long_easy.tolist() == [False, False, False, True]  # keep probability floors at 0.01
    frac = _fn("greso")(torch.full((100_000,), 2), torch.zeros(100_000, dtype=torch.long), torch.rand(100_000))
    assert abs(frac.float().mean().item() - 0.25) < 0.01  # p_easy^2


def _trailing_runs(trace, easy_t=0.98, hard_t=0.11):
    easy = hard = 0
    for x in reversed(trace):
        if x < easy_t:
            break
        easy += 1
    for x in reversed(trace):
        if x > hard_t:
            break
        hard += 1
    return easy, hard


def test_greso_streaks_match_trace_counting():
    epochs = [[1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0],
              [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1],
              [1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0],
              [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]]
    easy = torch.zeros(3, dtype=torch.long)
    hard = torch.zeros(3, dtype=torch.long)
    traces = [[], [], []]
    for rewards in epochs:
        easy, hard = greso_streaks(torch.tensor(rewards, dtype=torch.float), G, easy, hard)
        for q, g in enumerate(_groups(rewards, G)):
            traces[q].append(sum(g) / G)
        assert [(e, h) for e, h in zip(easy.tolist(), hard.tolist())] == [_trailing_runs(t) for t in traces]


# ---------------------------------------------------------------- GFPO

def _top_k_ref(scores, group_size, k):
    keep = []
    for g in range(0, len(scores), group_size):
        idx = sorted(range(g, g + group_size), key=lambda i: (-scores[i], i))[:k]
        keep += [i in idx for i in range(g, g + group_size)]
    return keep


@pytest.mark.parametrize("k", [1, 2, 4])
def test_gfpo_length_matches_reference(k):
    lengths = [12, 3, 7, 7,   0, 9, 2, 5]
    out = _fn("gfpo_length")(torch.zeros(8), G, _mask_from_lengths(lengths, 12), k=k)
    assert out.tolist() == _top_k_ref([-n for n in lengths], G, k)
    assert out.reshape(-1, G).sum(-1).tolist() == [k, k]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gfpo_reward_per_token_matches_reference(k):
    lengths = [12, 3, 7, 6,   0, 9, 2, 5]
    rewards = [1.0, 0.0, 1.0, 1.0,   0.0, 1.0, -1.0, 1.0]
    out = _fn("gfpo_reward_per_token")(torch.tensor(rewards), G, _mask_from_lengths(lengths, 12), k=k)
    assert out.tolist() == _top_k_ref([r / max(n, 1) for r, n in zip(rewards, lengths)], G, k)


def test_gfpo_degenerate():
    assert _fn("gfpo_length")(torch.zeros(3), 1, torch.ones(3, 2), k=1).all()
    ties = _fn("gfpo_length")(torch.zeros(4), G, torch.ones(4, 3), k=2)
    assert ties.tolist() == [True, True, False, False]
    with pytest.raises(ValueError):
        _fn("gfpo_length")(torch.zeros(4), G, torch.ones(4, 3), k=5)


# ---------------------------------------------------------------- CPPO

@pytest.mark.parametrize("rate", [0.5, 0.75, 0.875, 0.0])
def test_cppo_prune_matches_reference(rate):
    torch.manual_seed(5)
    adv = torch.randn(16)
    adv[3] = adv[9] = 0.0
    out = _fn("cppo_prune")(torch.zeros(16), G, adv, pruning_rate=rate)
    k = int(16 * (1 - rate))
    kept = sorted(range(16), key=lambda i: (-abs(adv[i].item()), i))[:k]
    assert out.tolist() == [i in kept for i in range(16)]
    if 0 < k < 16:
        assert adv[out].abs().min() >= adv[~out].abs().max()


def test_cppo_prune_keeps_all_when_rate_zero_and_handles_ties():
    assert _fn("cppo_prune")(torch.zeros(4), G, torch.zeros(4), pruning_rate=0.0).all()
    out = _fn("cppo_prune")(torch.zeros(4), G, torch.tensor([1.0, -1.0, 1.0, -1.0]), pruning_rate=0.5)
    assert out.tolist() == [True, True, False, False]


# ---------------------------------------------------------------- PF-PPO

def test_pf_ppo_weights_match_reference():
    r = [0.9, -0.3, 0.1, 0.9, -0.8, 0.0, 0.2, -0.8]
    pow_w = _fn("pf_ppo")(torch.tensor(r), G)
    torch.testing.assert_close(pow_w, torch.tensor([max(abs(x) ** 2 + 1e-8, 1e-8) for x in r]))
    mm = _fn("pf_ppo")(torch.tensor(r), G, reweight_method="max_min")
    torch.testing.assert_close(mm, torch.tensor([(1.0 if x in (max(r), min(r)) else 0.0) + 1e-8 for x in r]))
    mr = _fn("pf_ppo")(torch.tensor(r), G, reweight_method="max_random")
    torch.testing.assert_close(mr, torch.tensor([(0.4 if x == max(r) else 0.1) + 1e-8 for x in r]))
    with pytest.raises(ValueError):
        _fn("pf_ppo")(torch.tensor(r), G, reweight_method="best")


def test_pf_ppo_zero_rewards_still_sampleable():
    w = _fn("pf_ppo")(torch.zeros(4), G)
    assert (w > 0).all()
    torch.multinomial(w, 4, replacement=True)


# ---------------------------------------------------------------- SPO prioritized sampling

def test_spo_prioritized_matches_reference():
    p = [0.0, 0.5, 1.0, 0.1, 0.9, 0.3]
    out = _fn("spo_prioritized")(torch.tensor(p))
    w = [math.sqrt(x * (1 - x)) + 0.05 for x in p]
    torch.testing.assert_close(out, torch.tensor([x / sum(w) for x in w]))
    assert out.argmax().item() == 1 and out[0] == out[2] > 0  # uncertain prompts first; solved ones keep epsilon
    torch.testing.assert_close(_fn("spo_prioritized")(torch.ones(3), exploration_epsilon=0.0), torch.full((3,), 1 / 3))


# ---------------------------------------------------------------- Recent Sample Recovery

def _rsr_ref(buffer_groups, new_groups, batch_groups):
    valid = [i for i, g in enumerate(buffer_groups + new_groups) if len(set(g)) > 1 or len(g) == 1]
    return valid[:batch_groups], valid[batch_groups:]


def test_recent_sample_recovery_two_steps():
    step1 = [[1, 0], [1, 1], [0, 1], [0, 0], [1, 0], [0, 1]]
    out = _fn("recent_sample_recovery")(torch.tensor(sum(step1, []), dtype=torch.float), 2, batch_groups=3)
    batch, buffer = _rsr_ref([], step1, 3)
    assert out["batch"].tolist() == batch == [0, 2, 4] and out["buffer"].tolist() == buffer == [5]
    carried = [step1[i] for i in out["buffer"].tolist()]
    step2 = [[0, 0], [1, 0], [1, 1], [0, 1], [1, 0]]
    out2 = _fn("recent_sample_recovery")(torch.tensor(sum(step2, []), dtype=torch.float), 2,
                                        torch.tensor(sum(carried, []), dtype=torch.float), batch_groups=3)
    batch2, buffer2 = _rsr_ref(carried, step2, 3)
    assert out2["batch"].tolist() == batch2 == [0, 2, 4] and out2["buffer"].tolist() == buffer2 == [5]
    assert out2["batch"][0].item() == 0  # the recovered group comes first


def test_recent_sample_recovery_degenerate():
    out = _fn("recent_sample_recovery")(torch.ones(6), 2, batch_groups=2)
    assert out["batch"].numel() == 0 and out["buffer"].numel() == 0  # all groups filtered: refill needed
    out = _fn("recent_sample_recovery")(torch.tensor([1.0, 1.0, 0.0]), 1, batch_groups=2)
    assert out["batch"].tolist() == [0, 1] and out["buffer"].tolist() == [2]
