"""Advantage estimators against independent references written from the papers' / authors' formulas.

References are per-group Python loops over floats (`math`, `statistics`), never the module under test; group std
is the unbiased one (statistics.stdev), as in TRL and the authors' torch.std.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from postrain.errors import RecipeError
from postrain.rl import ADVANTAGES, compute_advantages
from postrain.rl.advantages import spo_initial_state


def close(actual, expected, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected).double(),
                               atol=atol, rtol=rtol)


def groups_of(rewards, G):
    r = [float(x) for x in rewards]
    return [r[i:i + G] for i in range(0, len(r), G)]


def sd(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def continuous(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 2 + 0.5


def right_padded_mask(lengths, T):
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths])


# Rewards with mixed, all-correct and all-wrong groups (G=4): the common case of RLVR batches.
MIXED = torch.tensor([1., 0., 1., 0., 1., 1., 1., 1., 0., 0., 0., 0., 1., 0., 0., 0., 0., 1., 1., 1.])
PLUS_MINUS = MIXED * 2 - 1


# ----------------------------------------------------------------------------------------------- group baselines


def ref_grpo(rewards, G):
    out = []
    for grp in groups_of(rewards, G):
        mu, s = statistics.fmean(grp), sd(grp)
        out += [(r - mu) / (s + 1e-4) for r in grp]
    return out


@pytest.mark.parametrize("rewards", [MIXED, continuous(24, 0)])
def test_grpo(rewards):
    close(compute_advantages("grpo", rewards, 4), ref_grpo(rewards, 4))


@pytest.mark.parametrize("rewards", [MIXED, continuous(24, 1)])
def test_dr_grpo(rewards):
    ref = [r - statistics.fmean(grp) for grp in groups_of(rewards, 4) for r in grp]
    close(compute_advantages("dr_grpo", rewards, 4), ref)


@pytest.mark.parametrize("rewards", [MIXED, continuous(24, 2)])
def test_lite_ppo_group_mean_batch_std(rewards):
    batch_sd = statistics.stdev([float(r) for r in rewards])
    ref = [(r - statistics.fmean(grp)) / (batch_sd + 1e-4) for grp in groups_of(rewards, 4) for r in grp]
    close(compute_advantages("lite_ppo", rewards, 4), ref)


@pytest.mark.parametrize("rewards", [MIXED, continuous(24, 3)])
def test_rloo(rewards):
    ref = []
    for grp in groups_of(rewards, 4):
        for i, r in enumerate(grp):
            others = [x for j, x in enumerate(grp) if j != i]
            ref.append(r - sum(others) / len(others))
    out = compute_advantages("rloo", rewards, 4)
    close(out, ref)
    # RLOO is GRPO's mean baseline rescaled by G/(G-1).
    close(out, compute_advantages("dr_grpo", rewards, 4) * 4 / 3)


# ------------------------------------------------------------------------------------------------ REINFORCE++


def ref_whiten(per_token, lengths):
    """Global token-level whitening: token-weighted mean, biased variance clamped at 1e-8, zeros on padding."""
    values = [v for row, n in zip(per_token, lengths) for v in row[:n]]
    mean = statistics.fmean(values)
    var = max(sum((v - mean) ** 2 for v in values) / len(values), 1e-8)
    T = len(per_token[0])
    return [[(row[t] - mean) / math.sqrt(var) if t < n else 0.0 for t in range(T)]
            for row, n in zip(per_token, lengths)]


def test_reinforce_pp_returns_with_kl_and_global_whitening():
    torch.manual_seed(0)
    lengths, T, beta = [5, 2, 0, 7, 3, 7], 7, 0.05
    rewards = continuous(6, 4)
    old = -torch.rand(6, T) * 3
    ref = -torch.rand(6, T) * 3
    mask = right_padded_mask(lengths, T)
    returns = []
    for i, n in enumerate(lengths):
        kl = [float(old[i, t] - ref[i, t]) for t in range(n)]
        returns.append([float(rewards[i]) - beta * sum(kl[t:]) if t < n else 0.0 for t in range(T)])
    expected = ref_whiten(returns, lengths)
    # Garbage in padding must not leak.
    old_g = torch.where(mask > 0, old, torch.tensor(float("nan")))
    ref_g = torch.where(mask > 0, ref, torch.tensor(1e4))
    out = compute_advantages("reinforce_pp", rewards, 1, mask=mask, old_logps=old_g, ref_logps=ref_g, beta=beta)
    assert out.shape == (6, T)
    close(out, expected)
    assert torch.isfinite(out).all() and (out[mask == 0] == 0).all()


def test_reinforce_pp_behaviour():
    lengths, T = [4, 1, 6, 3], 6
    mask = right_padded_mask(lengths, T)
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0])
    out = compute_advantages("reinforce_pp", rewards, 1, mask=mask, beta=0.0)
    valid = mask > 0
    # Without KL every token of a completion carries the same advantage; tokens are whitened as a whole.
    for i, n in enumerate(lengths):
        assert torch.allclose(out[i, :n], out[i, 0].expand(n))
    close(out[valid].mean(), 0.0, atol=1e-6)
    close(out[valid].var(unbiased=False), 1.0, atol=1e-5)
    # Positive KL still to come lowers the return, so within a completion the advantage rises along t.
    old, ref = torch.zeros(4, T), torch.full((4, T), -0.5)
    out = compute_advantages("reinforce_pp", rewards, 1, mask=mask, old_logps=old, ref_logps=ref, beta=0.1)
    for i, n in enumerate(lengths):
        assert (out[i, 1:n] > out[i, : n - 1]).all()
    with pytest.raises(ValueError, match="old_logps"):
        compute_advantages("reinforce_pp", rewards, 1, mask=mask)


def test_reinforce_pp_baseline():
    lengths, T = [3, 6, 0, 2, 5, 5, 1, 4], 6
    rewards = continuous(8, 5)
    mask = right_padded_mask(lengths, T)
    centered = [r - statistics.fmean(grp) for grp in groups_of(rewards, 4) for r in grp]
    expected = ref_whiten([[c] * T for c in centered], lengths)
    close(compute_advantages("reinforce_pp_baseline", rewards, 4, mask=mask), expected)


# ------------------------------------------------------------------------------------------- other baselines


def test_opo_length_weighted_baseline():
    lengths, T = [3, 7, 1, 5, 2, 2, 0, 6], 7
    rewards = continuous(8, 6)
    mask = right_padded_mask(lengths, T)
    ref = []
    for k, grp in enumerate(groups_of(rewards, 4)):
        ls = lengths[4 * k: 4 * k + 4]
        b = sum(l * r for l, r in zip(ls, grp)) / sum(ls)
        ref += [r - b for r in grp]
    close(compute_advantages("opo", rewards, 4, mask=mask), ref)
    # Equal lengths: the optimal baseline is the plain mean (Dr. GRPO); all-empty groups fall back to it too.
    for m in (right_padded_mask([4] * 8, T), torch.zeros(8, T)):
        close(compute_advantages("opo", rewards, 4, mask=m), compute_advantages("dr_grpo", rewards, 4))


def ref_bnpo(rewards, G, r_min=0.0, r_max=1.0):
    grps = [[(r - r_min) / (r_max - r_min) for r in grp] for grp in groups_of(rewards, G)]
    ps = [statistics.fmean(grp) for grp in grps]
    if len(ps) > 1:
        m, v = statistics.fmean(ps), statistics.variance(ps)
    else:
        m, v = 0.0, 1.0
    a = max(1 + (m * (1 - m) / v - 1) * m / 3, 1.0)
    b = max(1 + (m * (1 - m) / v - 1) * (1 - m) / 3, 1.0)
    beta_fn = math.gamma(a) * math.gamma(b) / math.gamma(a + b)
    out = []
    for p, grp in zip(ps, grps):
        pdf = p ** (a - 1) * (1 - p) ** (b - 1) / beta_fn
        w = 1e6 if pdf == 0 else min(1 / pdf, 1e6)
        out += [w * (s - p) for s in grp]
    return out, (a, b)


def test_bnpo_beta_matches_authors_formula():
    rewards = torch.tensor([1., 0., 0., 0., 1., 1., 0., 1., 1., 1., 1., 1., 0., 1., 0., 0., 0., 0., 0., 0.,
                            1., 1., 1., 0.])
    expected, (a, b) = ref_bnpo(rewards, 4)
    assert a > 1 or b > 1  # the fitted Beta is not the uniform one, so the weights matter
    close(compute_advantages("bnpo_beta", rewards, 4), expected)
    # Rewards in {-1, 1} with (r_min, r_max) = (-1, 1) are the same problem.
    close(compute_advantages("bnpo_beta", rewards * 2 - 1, 4, r_min=-1.0, r_max=1.0), expected)


def test_bnpo_beta_single_prompt_and_degenerate_batches():
    # One prompt: the code's m=0, v=1 gives α=β=1, i.e. REINFORCE with the group-mean baseline.
    one = torch.tensor([1., 0., 0., 1., 1.])
    close(compute_advantages("bnpo_beta", one, 5), compute_advantages("dr_grpo", one, 5))
    # Every prompt with the same success rate (v=0): weight 1 instead of the code's nan.
    same = torch.tensor([1., 0., 1., 0., 0., 1., 0., 1.])
    close(compute_advantages("bnpo_beta", same, 4), compute_advantages("dr_grpo", same, 4))
    with pytest.raises(ValueError, match="r_min"):
        compute_advantages("bnpo_beta", torch.tensor([2., 3., 2., 3.]), 2)


def test_gpg_alpha_correction():
    rewards = MIXED  # 5 groups, 2 of them all-equal
    valid_rows = sum(4 for grp in groups_of(rewards, 4) if len(set(grp)) > 1)
    alpha = len(rewards) / valid_rows
    ref = [alpha * (r - statistics.fmean(grp)) for grp in groups_of(rewards, 4) for r in grp]
    close(compute_advantages("gpg", rewards, 4), ref)
    ref_std = [alpha * (r - statistics.fmean(grp)) / (sd(grp) + 1e-4) for grp in groups_of(rewards, 4) for r in grp]
    close(compute_advantages("gpg", rewards, 4, scale_rewards=True), ref_std)
    # Half the groups carry no signal: the surviving gradient is doubled.
    half = torch.tensor([1., 0., 0., 0., 1., 1., 1., 1.])
    close(compute_advantages("gpg", half, 4), 2 * compute_advantages("dr_grpo", half, 4))


def ref_ngrpo(rewards, G, r_max=1.0, k=1):
    out = []
    for grp in groups_of(rewards, G):
        aug = grp + [r_max] * k
        mu, s = statistics.fmean(aug), sd(aug)
        out += [(r - mu) / (s + 1e-6) for r in grp]
    return out


def test_ngrpo_virtual_max_sample():
    close(compute_advantages("ngrpo", MIXED, 4), ref_ngrpo(MIXED, 4))
    close(compute_advantages("ngrpo", MIXED, 4, num_virtual=2, max_reward=1.5), ref_ngrpo(MIXED, 4, 1.5, 2))
    out = compute_advantages("ngrpo", MIXED, 4).view(-1, 4)
    assert (out[2] < 0).all()  # all-wrong group: negative advantages (the paper's point)
    assert (out[1] == 0).all()  # all-max group: nothing to learn


def test_mapo_mixed_advantage():
    rewards = torch.tensor([1., 0., 0., 0., 1., 1., 0., 0., 1., 1., 1., 0., 1., 1., 1., 1., 0., 0., 0., 0.])
    ref = []
    for grp in groups_of(rewards, 4):
        mu, s = statistics.fmean(grp), sd(grp)
        p = sum(1 for r in grp if r == 1.0) / len(grp)
        lam = 4 * p * (1 - p)
        ref += [lam * (r - mu) / (s + 1e-6) + (1 - lam) * (r - mu) / (mu + 1e-6) for r in grp]
    out = compute_advantages("mapo", rewards, 4)
    close(out, ref)
    # p = 1/2: pure z-score.
    z = [(r - 0.5) / (sd([1., 1., 0., 0.]) + 1e-6) for r in [1., 1., 0., 0.]]
    close(out[4:8], z)


def test_aapo_advantage_momentum():
    rewards = MIXED
    ref_rewards = continuous(20, 7).clamp(-1, 2)
    expected = [r - statistics.fmean(grp) for grp in groups_of(rewards, 4) for r in grp]
    expected = [e + min(max(float(r) - float(q), -0.2), 0.28) for e, r, q in zip(expected, rewards, ref_rewards)]
    close(compute_advantages("aapo", rewards, 4, ref_rewards=ref_rewards), expected)
    z = ref_grpo(rewards, 4)
    z = [e + min(max(float(r) - float(q), -0.2), 0.28) for e, r, q in zip(z, rewards, ref_rewards)]
    close(compute_advantages("aapo", rewards, 4, ref_rewards=ref_rewards, scale_rewards=True), z)
    # All-equal group: the momentum term alone still gives signal.
    out = compute_advantages("aapo", torch.ones(4), 4, ref_rewards=torch.tensor([0., 1., 2., 0.9]))
    close(out, [0.28, 0.0, -0.2, 0.1])


def test_pshw_hardness_weighting():
    ref = []
    for grp in groups_of(PLUS_MINUS, 4):
        mu = statistics.fmean(grp)
        ref += [(r - mu) * (-0.256 * mu + 1.256) for r in grp]
    out = compute_advantages("pshw", PLUS_MINUS, 4)
    close(out, ref)
    # The correct answer of a hard prompt (1/4 solved) outweighs one of an easy prompt (3/4 solved) more than
    # the raw centred reward does: D(q) is larger for harder prompts.
    hard = compute_advantages("pshw", torch.tensor([1., -1., -1., -1.]), 4)[0]
    easy = compute_advantages("pshw", torch.tensor([1., 1., 1., -1.]), 4)[0]
    close(hard / 1.5, 1.256 + 0.256 * 0.5)
    close(easy / 0.5, 1.256 - 0.256 * 0.5)


def test_grpo_lead_difficulty_weights():
    rewards = torch.tensor([1., -1., -1., -1., 1., 1., 1., -1., 0.5, 0., 1., -1.])

    def w(x):
        return 0.4 + (1.5 - 0.4) / (1 + math.exp(10 * (x - 0.75)))

    ref = []
    for grp in groups_of(rewards, 4):
        mu, s = statistics.fmean(grp), sd(grp)
        rho = sum(1 for r in grp if r > 0) / len(grp)
        for r in grp:
            z = (r - mu) / (s + 1e-6)
            ref.append(z * (w(rho) if z > 0 else w(1 - rho)))
    out = compute_advantages("grpo_lead", rewards, 4)
    close(out, ref)
    z = torch.tensor([(r - statistics.fmean(g)) / (sd(g) + 1e-6) for g in groups_of(rewards, 4) for r in g])
    weight = out[z != 0] / z[z != 0]
    assert ((weight >= 0.4) & (weight <= 1.5)).all()
    # The correct answer of the hard prompt (1/4 solved) is amplified more than that of the easy one (3/4).
    assert weight[0] > 1.4 and out[0] / z[0] > out[4] / z[4]
    # ... and the wrong answer of the easy prompt more than those of the hard one.
    assert out[7] / z[7] > out[1] / z[1]


def test_edge_grpo_entropy_scaling_and_split():
    torch.manual_seed(1)
    lengths, T = [4, 6, 2, 5, 0, 3, 6, 1], 6
    rewards = torch.tensor([1., 0., 0., 1., 1., 1., 0., 1.])
    mask = right_padded_mask(lengths, T)
    ent = torch.rand(8, T) * 2 + 0.1
    base = ref_grpo(rewards, 4)
    p = [statistics.fmean([float(x) for x in ent[i, :n]]) if n else 0.0 for i, n in enumerate(lengths)]
    p_bar = statistics.fmean([x for x, n in zip(p, lengths) if n])
    ref = [a * p_bar / pi if pi > 0 else 0.0 for a, pi in zip(base, p)]
    garbage = torch.where(mask > 0, ent, torch.tensor(float("nan"))).requires_grad_()
    out = compute_advantages("edge_grpo", rewards, 4, mask=mask, entropies=garbage)
    close(out, ref)
    assert not out.requires_grad  # entropies enter as constants
    # Rows split across two processes agree with the whole batch when given the global mean entropy.
    halves = [compute_advantages("edge_grpo", rewards[s], 4, mask=mask[s], entropies=ent[s], mean_entropy=p_bar)
              for s in (slice(0, 4), slice(4, 8))]
    close(torch.cat(halves), ref)
    # Equal entropies: plain GRPO.
    close(compute_advantages("edge_grpo", rewards, 4, mask=torch.ones(8, T), entropies=torch.ones(8, T)), base)


# ------------------------------------------------------------------------------------------ stateful estimators


def ref_dcpo_step(grp, st):
    """One visit of one prompt, written from compute_dcpo_outcome_advantage / get_mean_std."""
    times, mu_old, sd_old = st
    mu_new, sd_new = statistics.fmean(grp), sd(grp)
    i = times + 1
    if times == 0:
        mu_c, sd_c = mu_new, sd_new
    else:
        mu_c = (mu_old * times + mu_new) / (times + 1)
        sd_c = math.sqrt((times * sd_old ** 2 + sd_new ** 2 + times / i * (mu_new - mu_old) ** 2) / i)
    out = []
    for r in grp:
        a_new = (r - mu_new) / sd_new if sd_new > 0 else 0.0
        a_old = (r - mu_c) / sd_c if sd_c > 0 else 0.0
        sa1 = a_old / i + (1 - 1 / i) * a_new
        sa2 = a_new / i + (1 - 1 / i) * a_old
        out.append(sa1 if abs(sa1) < abs(sa2) else sa2)
    return out, (i, mu_c, sd_c)


def test_dcpo_smooth_over_several_visits():
    steps = [torch.tensor([1., 0., 0., 0., 0., 0., 0., 0.]),
             torch.tensor([1., 1., 0., 1., 0., 0., 0., 0.]),
             torch.tensor([0., 0., 0., 0., 1., 1., 0., 1.]),
             continuous(8, 8)]
    ref_state = {0: (0, 0.0, 0.0), 1: (0, 0.0, 0.0)}
    state = None
    for rewards in steps:
        expected = []
        for k, grp in enumerate(groups_of(rewards, 4)):
            out_k, ref_state[k] = ref_dcpo_step(grp, ref_state[k])
            expected += out_k
        adv, state = compute_advantages("dcpo_smooth", rewards, 4, state=state)
        close(adv, expected)
        close(state, [list(ref_state[k]) for k in (0, 0, 0, 0, 1, 1, 1, 1)])
    # First visit: the plain z-score without epsilon.
    adv, _ = compute_advantages("dcpo_smooth", MIXED, 4)
    z = [(r - statistics.fmean(g)) / sd(g) if sd(g) > 0 else 0.0 for g in groups_of(MIXED, 4) for r in g]
    close(adv, z)
    # An all-wrong group still learns from a history with a higher mean: its advantages are negative.
    hist = torch.tensor([[3.0, 0.5, 0.5]] * 4)
    adv, new = compute_advantages("dcpo_smooth", torch.zeros(4), 4, state=hist)
    # i = 4: μ_c = 1.5/4, σ_c² = (3·0.25 + 0 + (3/4)·0.25)/4, A_new = 0, so Â = A_old/4 (the smaller mix).
    close(adv, [-0.375 / math.sqrt(0.9375 / 4) / 4] * 4)
    assert (adv < 0).all() and (new[:, 0] == 4).all()


def test_spo_tracker_advantage_and_update():
    rewards = torch.tensor([1., 0., 1., 1., 0., 0.])
    state = torch.tensor([[0.5, 0.5], [3.0, 1.0], [1.0, 4.0], [7.0, 1.0], [0.5, 2.5], [2.0, 2.0]])
    div = torch.tensor([0.0, 0.01, 0.06, 0.2, 0.03, 0.5])
    a = [float(r) - al / (al + be) for r, (al, be) in zip(rewards, state.tolist())]
    mu, s = statistics.fmean(a), statistics.stdev(a)
    expected = [(x - mu) / (s + 1e-8) for x in a]
    rho = [min(max(2 ** (-d / 0.06), 0.875), 0.96) for d in div.tolist()]
    new = [[p * al + float(r), p * be + 1 - float(r)] for p, r, (al, be) in zip(rho, rewards, state.tolist())]
    adv, new_state = compute_advantages("spo_tracker", rewards, 1, state=state, divergence=div)
    close(adv, expected)
    close(new_state, new)
    # Without a divergence: the constant ρ = rho_min; without a state: α = β = ½.
    _, st = compute_advantages("spo_tracker", rewards, 1)
    close(st, [[0.875 * 0.5 + float(r), 0.875 * 0.5 + 1 - float(r)] for r in rewards])
    with pytest.raises(ValueError, match="group_size must be 1"):
        compute_advantages("spo_tracker", rewards, 2)


def test_spo_initial_state():
    n_init = 1 / (1 - 0.875)
    close(spo_initial_state(torch.tensor([0., 3., 8.]), 8),
          [[n_init * (s + 0.5) / 9, n_init * (8 - s + 0.5) / 9] for s in (0., 3., 8.)])
    close(spo_initial_state(torch.tensor([0.]), 0), [[0.5, 0.5]])


# ----------------------------------------------------------------------------------------- rejection family


def test_reinforce_rej_and_raft_pp():
    ref = [r if len(set(grp)) > 1 else 0.0 for grp in groups_of(PLUS_MINUS, 4) for r in grp]
    close(compute_advantages("reinforce_rej", PLUS_MINUS, 4), ref)
    close(compute_advantages("raft_pp", PLUS_MINUS, 4), [max(float(r), 0.0) for r in PLUS_MINUS])


# ---------------------------------------------------------------------------------- degenerate cases, all entries


def call(name, rewards, G, T=5, **extra):
    """Call any estimator with every data input a trainer might hand it (each entry reads its own)."""
    N = rewards.numel()
    data = dict(mask=torch.ones(N, T), entropies=torch.full((N, T), 0.7), ref_rewards=torch.zeros(N),
                old_logps=torch.full((N, T), -1.0), ref_logps=torch.full((N, T), -1.2))
    data.update(extra)
    if name == "spo_tracker":
        G = 1
    out = compute_advantages(name, rewards, G, **data)
    return out[0] if isinstance(out, tuple) else out


ALL = sorted(v.name for v in ADVANTAGES)
# Entries whose paper gives no signal to a group of equal rewards (NGRPO only for the all-max group; AAPO adds
# its reference-model momentum; SPO has no groups; RAFT++ keeps positives; REINFORCE++ whitens over the batch).
ZERO_ON_EQUAL = [n for n in ALL if n not in {"aapo", "spo_tracker", "raft_pp", "reinforce_pp"}]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("value", [0.0, 1.0])
def test_all_equal_rewards_give_no_nan(name, value):
    rewards = torch.full((8,), value)
    out = call(name, rewards, 4)
    assert torch.isfinite(out).all()
    if name in ZERO_ON_EQUAL and not (name == "ngrpo" and value == 0.0):
        assert (out == 0).all(), out


@pytest.mark.parametrize("name", ALL)
def test_group_of_one(name):
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25])
    out = call(name, rewards, 1)
    assert torch.isfinite(out).all()
    # A single completion has no group to compare with.
    if name in {"grpo", "dr_grpo", "lite_ppo", "rloo", "opo", "bnpo_beta", "gpg", "mapo", "pshw", "grpo_lead",
                "edge_grpo", "reinforce_rej", "reinforce_pp_baseline", "dcpo_smooth"}:
        assert (out == 0).all(), out


@pytest.mark.parametrize("name", ALL)
def test_empty_completions_and_garbage_padding(name):
    torch.manual_seed(2)
    T = 6
    rewards = MIXED[:8]
    mask = right_padded_mask([3, 0, 6, 2, 0, 4, 5, 1], T)
    clean = dict(mask=mask, entropies=torch.where(mask > 0, torch.rand(8, T) + 0.2, 0.0),
                 old_logps=torch.where(mask > 0, -torch.rand(8, T) * 5, 0.0),
                 ref_logps=torch.where(mask > 0, -torch.rand(8, T) * 5, 0.0))
    dirty = {k: (v if k == "mask" else torch.where(mask > 0, v, torch.tensor(float("nan") if i % 2 else 1e4)))
             for i, (k, v) in enumerate(clean.items())}
    a, b = call(name, rewards, 4, T, **clean), call(name, rewards, 4, T, **dirty)
    assert torch.isfinite(b).all()
    close(a, b)
    if a.dim() == 2:
        assert (a[1] == 0).all() and (a[mask == 0] == 0).all()


@pytest.mark.parametrize("name", ALL)
def test_bfloat16_rewards(name):
    rewards = MIXED.to(torch.bfloat16)
    out = call(name, rewards, 4)
    assert out.dtype == torch.float32
    close(out, call(name, MIXED, 4), atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------------------------- calling and metadata


def test_compute_advantages_errors():
    with pytest.raises(RecipeError, match="unknown advantage estimator 'grpoo'.*did you mean 'grpo'"):
        compute_advantages("grpoo", MIXED, 4)
    with pytest.raises(RecipeError, match="unknown parameter 'alpha'.*max_reward"):
        compute_advantages("ngrpo", MIXED, 4, alpha=1.0)
    with pytest.raises(ValueError, match="needs mask"):
        compute_advantages("opo", MIXED, 4)
    with pytest.raises(ValueError, match="group_size=3"):
        compute_advantages("grpo", MIXED, 3)
    # Data inputs other entries read are ignored, not taken for hyperparameters.
    close(compute_advantages("grpo", MIXED, 4, entropies=torch.ones(20, 3), state=None), ref_grpo(MIXED, 4))


def test_metadata():
    assert len(ALL) >= 19
    for v in ADVANTAGES:
        assert v.paper and v.arxiv and v.description and v.notes, v.name
        assert "lambda_" not in v.params
    trl = {v.name: v.trl for v in ADVANTAGES if v.trl}
    assert trl == {"grpo": "scale_rewards=group", "dr_grpo": "scale_rewards=none", "lite_ppo": "scale_rewards=batch",
                   "rloo": "RLOOTrainer(beta=0.0, normalize_advantages=False)"}
    assert ADVANTAGES.get("pshw").params == {"alpha": -0.256, "offset": 1.256}
    assert ADVANTAGES.get("reinforce_pp").data == {"rewards": True, "mask": True, "old_logps": False,
                                                   "ref_logps": False}
