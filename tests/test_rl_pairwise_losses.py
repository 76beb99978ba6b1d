"""trpa against a loop written from the authors' compute_pairwise_policy_loss and dp_actor's trust-region term
(XueruiSu/Trust-Region-Preference-Approximation), aggregated as the authors' micro-batch loss."""

import math

import pytest
import torch

from postrain.errors import RecipeError
from postrain.rl.registry import AGGREGATIONS, POLICY_LOSSES

LENGTHS = [4, 2, 5, 3, 1, 5, 2, 4]
G = 4


def _batch(rewards, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, t = len(LENGTHS), max(LENGTHS)
    logps = -(torch.rand(n, t, generator=g, dtype=torch.float64) * 3 + 0.05)
    ref = logps + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    old = logps + 0.2 * torch.randn(n, t, generator=g, dtype=torch.float64)
    mask = torch.zeros(n, t, dtype=torch.float64)
    for i, k in enumerate(LENGTHS):
        mask[i, :k] = 1
    return logps, old, ref, torch.tensor(rewards, dtype=torch.float64), mask


def _loss(logps, old, ref, rewards, mask, **params):
    per_token, metrics = POLICY_LOSSES.call(
        "trpa", {"logps": logps, "old_logps": old, "ref_logps": ref, "rewards": rewards, "mask": mask,
                 "group_size": G}, params)
    return AGGREGATIONS.call("seq_mean_token_mean", {"per_token_loss": per_token, "mask": mask}, {}), metrics


def _oracle(logps, old, ref, rewards, mask, beta=0.1, anisotropy=2.5, top=1.0, coef=1e-3):
    rows = range(len(LENGTHS))
    mean = lambda x, i: sum(float(x[i, t]) for t in range(LENGTHS[i])) / LENGTHS[i]
    rho = [mean(logps, i) - mean(ref, i) for i in rows]
    r = [float(x) for x in rewards]
    h = []
    for start in range(0, len(r), G):
        idx = range(start, start + G)
        for lw in sorted({r[i] for i in idx}, reverse=True):  # the better level first
            for ll in sorted({r[i] for i in idx}):
                if ll >= lw:
                    continue
                for i in idx:
                    for j in idx:
                        if r[i] == lw and r[j] == ll:
                            h.append((anisotropy if lw == top else 1.0) * beta * (rho[i] - rho[j]))
    nll = lambda z: math.log1p(math.exp(-z))
    if h:
        pg = sum(nll(z) for z in h) / len(h)
    else:
        pg = sum(nll(rho[i] if r[i] == top else -rho[i]) for i in rows) / len(r)
    kl, tokens = 0.0, 0
    for i in rows:
        for t in range(LENGTHS[i]):
            d = float(old[i, t]) - float(logps[i, t])
            kl += min(max(math.exp(d) - d - 1, -10.0), 10.0)
            tokens += 1
    return pg + coef * kl / tokens, len(h)


@pytest.mark.parametrize("rewards", [
    [1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 1.0, -1.0],    # three levels in group 0, two in group 1
    [0.5, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0],     # no top-level completion
])
def test_matches_the_authors_pairwise_loss_and_trust_region(rewards):
    batch = _batch(rewards)
    loss, metrics = _loss(*batch)
    expected, pairs = _oracle(*batch)
    assert math.isclose(float(loss), expected, rel_tol=1e-6, abs_tol=1e-7)
    assert int(metrics["trpa/pairs"]) == pairs > 0


def test_without_pairs_it_falls_back_to_the_per_completion_loss():
    batch = _batch([1.0] * 4 + [0.0] * 4)  # every group all-equal: no pair in the micro-batch
    loss, metrics = _loss(*batch, anisotropy=3.0, tr_kl_coef=0.0)
    expected, pairs = _oracle(*batch, anisotropy=3.0, coef=0.0)
    assert pairs == 0 and int(metrics["trpa/pairs"]) == 0
    assert math.isclose(float(loss), expected, rel_tol=1e-6)


def test_gradient_raises_the_better_completions_log_ratio():
    logps, old, ref, rewards, mask = _batch([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    lp = logps.clone().requires_grad_(True)
    loss, _ = _loss(lp, old, ref, rewards, mask, tr_kl_coef=0.0)
    loss.backward()
    assert (lp.grad[0, :LENGTHS[0]] < 0).all() and (lp.grad[1, :LENGTHS[1]] > 0).all()
    assert (lp.grad * (1 - mask) == 0).all()


def test_bad_parameters_are_refused_and_groups_are_required(tmp_path):
    with pytest.raises(RecipeError, match="anisotropy must be > 0"):
        _loss(*_batch([1.0, 0.0] * 4), anisotropy=0.0)
    from postrain.rl.section import check_rl_section  # a recipe splitting groups over micro-batches is refused
    with pytest.raises(RecipeError, match="whole groups"):
        check_rl_section("grpo", {"rl": {"policy_loss": "trpa"},
                          "trainer": {"num_generations": 8, "per_device_train_batch_size": 4,
                                      "gradient_accumulation_steps": 2}}, {})
    v = POLICY_LOSSES.get("trpa")
    assert v.params == {"beta": 0.1, "anisotropy": 2.5, "top_reward": 1.0, "tr_kl_coef": 1e-3}
    assert v.extra["catalog"] == ("rl:15", "preference:104")
