"""Reward-shaping entries vs independent references written from the papers' formulas (per-row Python loops)."""

import math
import statistics

import pytest
import torch

from postrain.rl.registry import SHAPING

G = 4


def _fn(name):
    return SHAPING.get(name).fn


def _mask_from_lengths(lengths, T):
    return torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])


# ---------------------------------------------------------------- DAPO soft overlong punishment (Eq. 13)

def _dapo_ref(length, l_max, l_cache):
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return ((l_max - l_cache) - length) / l_cache
    return -1.0


def test_dapo_overlong_matches_paper_and_trl():
    from trl.rewards import get_soft_overlong_punishment

    l_max, l_cache, T = 20, 8, 24
    lengths = [0, 5, 12, 13, 16, 20, 21, 24]
    rewards = torch.tensor([1.0, 0.0, 1.0, -1.0, 0.5, 1.0, 0.0, 1.0])
    out = _fn("dapo_overlong")(rewards, G, _mask_from_lengths(lengths, T), max_completion_length=l_max,
                               overlong_buffer_len=l_cache)
    ref = torch.tensor([r + _dapo_ref(n, l_max, l_cache) for r, n in zip(rewards.tolist(), lengths)])
    torch.testing.assert_close(out, ref)
    trl_penalty = get_soft_overlong_punishment(l_max, l_cache)([[7] * n for n in lengths])
    torch.testing.assert_close(out - rewards, torch.tensor(trl_penalty))


def test_dapo_overlong_defaults_and_factor():
    assert SHAPING.get("dapo_overlong").params == {"max_completion_length": 20480, "overlong_buffer_len": 4096,
                                                   "penalty_factor": 1.0}
    mask = _mask_from_lengths([18, 18, 18, 18], 20)
    out = _fn("dapo_overlong")(torch.zeros(4), G, mask, max_completion_length=20, overlong_buffer_len=8,
                               penalty_factor=0.5)
    torch.testing.assert_close(out, torch.full((4,), 0.5 * (12 - 18) / 8))


# ---------------------------------------------------------------- GRPO-LEAD length reward

def _lead_ref(rewards, lengths, group_size, alpha):
    out = []
    for g in range(0, len(rewards), group_size):
        r, L = rewards[g:g + group_size], lengths[g:g + group_size]
        correct_lengths = [n for x, n in zip(r, L) if x > 0]
        mu = sum(correct_lengths) / len(correct_lengths) if correct_lengths else 0.0
        sd = statistics.stdev(correct_lengths) if len(correct_lengths) > 1 else 1.0
        for x, n in zip(r, L):
            out.append(x * math.exp(-alpha * (n - mu) / (sd + 1e-6)) if x > 0 else x)
    return out


@pytest.mark.parametrize("alpha", [0.05, 0.3])
def test_grpo_lead_length_matches_reference(alpha):
    rewards = [1.0, 1.0, -1.0, 1.0,   -1.0, -1.0, 0.0, -1.0,   1.0, -1.0, 0.0, -1.0,   1.0, 1.0, 1.0, 1.0]
    lengths = [10, 30, 5, 17,          3, 9, 4, 12,              7, 8, 9, 10,              20, 20, 6, 40]
    out = _fn("grpo_lead_length")(torch.tensor(rewards), G, _mask_from_lengths(lengths, 40), alpha=alpha)
    torch.testing.assert_close(out, torch.tensor(_lead_ref(rewards, lengths, G, alpha)))


def test_grpo_lead_length_behaviour():
    out = _fn("grpo_lead_length")(torch.ones(4), G, _mask_from_lengths([10, 20, 30, 40], 40))
    assert out[0] > out[1] > 1.0 > out[2] > out[3]  # shorter correct answers earn more
    lone = _fn("grpo_lead_length")(torch.tensor([1.0, -1.0, -1.0, -1.0]), G, _mask_from_lengths([40, 1, 2, 3], 40))
    torch.testing.assert_close(lone, torch.tensor([1.0, -1.0, -1.0, -1.0]))  # a single correct answer: z = 0
    one = _fn("grpo_lead_length")(torch.tensor([1.0, 0.0]), 1, _mask_from_lengths([0, 3], 4))
    torch.testing.assert_close(one, torch.tensor([1.0, 0.0]))


# ---------------------------------------------------------------- Unlikeliness reward

def _unlikely_ref(rewards, logps, mask, group_size, beta_rank):
    means = []
    for row, m in zip(logps.tolist(), mask.tolist()):
        vals = [x for x, keep in zip(row, m) if keep]
        means.append(sum(vals) / len(vals) if vals else 0.0)
    out = []
    for g in range(0, len(rewards), group_size):
        idx = list(range(g, g + group_size))
        ascending = sorted(idx, key=lambda i: (means[i], i))
        for i in idx:
            out.append(rewards[i] * (1 - beta_rank * ascending.index(i) / group_size))
    return out


def test_unlikeliness_matches_reference_with_garbage_padding():
    torch.manual_seed(0)
    N, T = 12, 9
    lengths = [9, 3, 5, 0, 7, 7, 2, 9, 1, 4, 6, 8]
    mask = _mask_from_lengths(lengths, T)
    logps = torch.empty(N, T).uniform_(-6.0, -0.05)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 1.0])
    ref = _unlikely_ref(rewards.tolist(), logps, mask, G, 0.25)
    garbage = torch.where(mask.bool(), logps, torch.tensor(float("nan")))
    out = _fn("unlikeliness")(rewards, G, garbage, mask)
    torch.testing.assert_close(out, torch.tensor(ref))
    big = torch.where(mask.bool(), logps, torch.tensor(1e4))
    torch.testing.assert_close(_fn("unlikeliness")(rewards, G, big, mask), out)


def test_unlikeliness_behaviour():
    logps = torch.tensor([[-1.0], [-3.0], [-2.0], [-0.5]])
    out = _fn("unlikeliness")(torch.ones(4), G, logps, torch.ones(4, 1), beta_rank=0.25)
    torch.testing.assert_close(out, torch.tensor([1 - 0.25 * 2 / 4, 1.0, 1 - 0.25 / 4, 1 - 0.25 * 3 / 4]))
    single = _fn("unlikeliness")(torch.tensor([1.0, 0.0]), 1, torch.randn(2, 3), torch.ones(2, 3))
    torch.testing.assert_close(single, torch.tensor([1.0, 0.0]))  # group of one: rank 0, unchanged


# ---------------------------------------------------------------- DRA-GRPO diversity adjustment

def _dra_ref(rewards, emb, group_size):
    unit = [[x / math.sqrt(sum(y * y for y in e)) for x in e] for e in emb]
    out = []
    for i in range(len(rewards)):
        g = i // group_size * group_size
        total = sum(sum(a * b for a, b in zip(unit[i], unit[j])) for j in range(g, g + group_size))
        out.append(rewards[i] / (total + 1e-6))
    return out


def test_dra_diversity_matches_reference():
    torch.manual_seed(1)
    emb = torch.randn(8, 5).abs() + 0.1  # positive entries: similarity sums stay away from zero
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 0.0, 0.2])
    out = _fn("dra_diversity")(rewards, G, emb)
    torch.testing.assert_close(out, torch.tensor(_dra_ref(rewards.tolist(), emb.tolist(), G)))
    out_bf16 = _fn("dra_diversity")(rewards, G, emb.bfloat16())
    assert out_bf16.dtype == torch.float32
    torch.testing.assert_close(out_bf16, out, atol=2e-2, rtol=2e-2)


def test_dra_diversity_behaviour():
    emb = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])  # two duplicate pairs
    out = _fn("dra_diversity")(torch.ones(4), G, emb)
    torch.testing.assert_close(out, torch.full((4,), 0.5), atol=1e-5, rtol=1e-5)
    emb = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = _fn("dra_diversity")(torch.ones(4), G, emb)
    assert out[2] > out[0] and out[3] > out[1]  # the distinct answers keep more reward
    torch.testing.assert_close(_fn("dra_diversity")(torch.tensor([0.7]), 1, torch.randn(1, 3)),
                               torch.tensor([0.7]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- ReDit

def test_redit():
    torch.manual_seed(2)
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0])
    noise = torch.randn(4)
    out = _fn("redit")(rewards, G, noise, sigma=0.05)
    torch.testing.assert_close(out, torch.tensor([r + 0.05 * n for r, n in zip(rewards.tolist(), noise.tolist())]))
    torch.testing.assert_close(_fn("redit")(rewards, G, torch.zeros(4), sigma=0.3), rewards)
    # zero-mean dithering: unbiased on average, and it separates an all-equal group
    many = _fn("redit")(torch.ones(200_000), 4, torch.randn(200_000), sigma=0.1)
    assert abs(many.mean().item() - 1.0) < 2e-3
    assert many.reshape(-1, 4).std(-1).min() > 0
    assert SHAPING.get("redit").params == {"sigma": None}


# ---------------------------------------------------------------- win rate (SPO minimaximalist)

def test_win_rate_matches_reference():
    torch.manual_seed(3)
    prefs = torch.rand(8, G)
    for i in range(8):
        prefs[i, i % G] = float("nan")  # self-comparison: garbage, must be ignored
    out = _fn("win_rate")(torch.zeros(8), G, prefs)
    ref = [sum(prefs[i, j].item() for j in range(G) if j != i % G) / (G - 1) for i in range(8)]
    torch.testing.assert_close(out, torch.tensor(ref))


def test_win_rate_behaviour():
    # completion 0 beats all, 3 loses to all: win rates 1, 2/3, 1/3, 0
    beats = torch.tensor([[0.5, 1, 1, 1], [0, 0.5, 1, 1], [0, 0, 0.5, 1], [0, 0, 0, 0.5]], dtype=torch.float)
    torch.testing.assert_close(_fn("win_rate")(torch.zeros(4), G, beats), torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(_fn("win_rate")(torch.zeros(4), G, torch.full((4, 4), 0.5)), torch.full((4,), 0.5))
    torch.testing.assert_close(_fn("win_rate")(torch.zeros(2), 1, torch.tensor([[0.9], [0.1]])),
                               torch.tensor([0.5, 0.5]))


# ---------------------------------------------------------------- reward-model ensembles (WCO / UWO)

def test_rm_ensembles_match_reference():
    torch.manual_seed(4)
    scores = torch.randn(8, 5) * 2
    wco = _fn("rm_ensemble_worst_case")(torch.zeros(8), G, scores)
    torch.testing.assert_close(wco, torch.tensor([min(row) for row in scores.tolist()]))
    for lam in (0.1, 0.5):
        uwo = _fn("rm_ensemble_uncertainty")(torch.zeros(8), G, scores, lam=lam)
        ref = [statistics.fmean(row) - lam * statistics.pvariance(row) for row in scores.tolist()]
        torch.testing.assert_close(uwo, torch.tensor(ref, dtype=torch.float32))


def test_rm_ensembles_behaviour():
    agree = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.2, 2.6]])
    uwo = _fn("rm_ensemble_uncertainty")(torch.zeros(2), 1, agree, lam=0.5)
    torch.testing.assert_close(uwo[0], torch.tensor(1.0))  # agreeing members: no penalty
    torch.testing.assert_close(uwo[1], torch.tensor(1.6 - 0.5 * ((0.36 + 0.16 + 1.0) / 3)))
    torch.testing.assert_close(_fn("rm_ensemble_uncertainty")(torch.zeros(2), 1, agree, lam=0.0), agree.mean(-1))
    torch.testing.assert_close(_fn("rm_ensemble_worst_case")(torch.zeros(2), 1, agree), torch.tensor([1.0, 1.0]))


# ---------------------------------------------------------------- registry plumbing

def test_registry_call_reads_only_its_data():
    data = {"rewards": torch.ones(4), "group_size": 4, "mask": _mask_from_lengths([1, 2, 3, 4], 4),
            "old_logps": torch.zeros(4, 4), "embeddings": torch.eye(4)}
    out = SHAPING.call("dapo_overlong", data, {"max_completion_length": 3, "overlong_buffer_len": 2})
    torch.testing.assert_close(out, torch.tensor([1.0, 0.5, 0.0, 0.0]))
    with pytest.raises(ValueError):
        _fn("grpo_lead_length")(torch.ones(5), 4, torch.ones(5, 2))
