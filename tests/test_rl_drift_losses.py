"""discovered_po against a per-token loop written from the authors' purejaxrl _loss_fn (luchris429/purejaxrl
dpo_continuous_action.py), plus the properties the drift promises: zero with zero gradient at ratio 1, >= 0."""

import math

import pytest
import torch

from postrain.errors import RecipeError
from postrain.rl.registry import POLICY_LOSSES

LENGTHS = [5, 3, 0, 4]


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    n, t = len(LENGTHS), max(LENGTHS)
    logps = -(torch.rand(n, t, generator=g) * 3 + 0.05)
    old = logps + 0.5 * torch.randn(n, t, generator=g)
    mask = torch.zeros(n, t)
    for i, k in enumerate(LENGTHS):
        mask[i, :k] = 1
    adv = torch.tensor([1.3, -0.7, 0.4, -2.1])
    return logps, old, mask, adv


def _oracle_token(logp, old, a, alpha, beta):
    log_diff = logp - old
    ratio = math.exp(log_diff)
    if a >= 0:
        x = (ratio - 1.0) * a
        drift = max(0.0, x - alpha * math.tanh(x / alpha))
    else:
        x = log_diff * a
        drift = max(0.0, x - beta * math.tanh(x / beta))
    return -(ratio * a - drift)


def _call(logps, old, mask, adv, **params):
    return POLICY_LOSSES.call("discovered_po", {"logps": logps, "old_logps": old, "advantages": adv, "mask": mask},
                              params)


@pytest.mark.parametrize("params", [{}, {"alpha": 0.5, "beta": 1.5}])
def test_matches_the_authors_drift_token_by_token(params):
    logps, old, mask, adv = _batch()
    old = torch.where(mask.bool(), old, torch.full_like(old, float("nan")))  # padding may hold garbage
    loss, metrics = _call(logps, old, mask, adv, **params)
    alpha, beta = params.get("alpha", 2.0), params.get("beta", 0.6)
    for i, k in enumerate(LENGTHS):
        for t in range(loss.shape[1]):
            expected = (_oracle_token(float(logps[i, t]), float(old[i, t]), float(adv[i]), alpha, beta)
                        if t < k else 0.0)
            assert math.isclose(float(loss[i, t]), expected, rel_tol=1e-5, abs_tol=1e-6), (i, t)
    assert float(metrics["drift/mean"]) >= 0


def test_on_policy_it_is_the_plain_policy_gradient():
    # At r = 1 the drift and its derivative vanish: the gradient is -A grad log pi, as REINFORCE's.
    logps, _, mask, adv = _batch(1)
    lp = logps.clone().requires_grad_(True)
    loss, _ = _call(lp, logps.detach(), mask, adv)
    loss.sum().backward()
    expected = -adv.unsqueeze(1) * mask
    torch.testing.assert_close(lp.grad, expected)


def test_drift_is_nonnegative_and_pulls_a_runaway_ratio_back():
    # A positive advantage with a ratio already far above 1: the surrogate alone keeps pushing (gradient of -rA is
    # -rA < 0 in log space); the drift's gradient opposes it, so the net push is weaker than the surrogate's.
    a = torch.tensor([1.0])
    mask = torch.ones(1, 1)
    old = torch.tensor([[-2.0]])
    lp = torch.tensor([[-0.5]], requires_grad=True)  # ratio e^1.5
    loss, _ = _call(lp, old, mask, a)
    loss.sum().backward()
    surrogate_grad = -math.exp(1.5)
    assert surrogate_grad < float(lp.grad) and float(lp.grad) > surrogate_grad / 2
    # drift >= 0 everywhere: the loss is never below the surrogate -rA
    logps, old, mask, adv = _batch(2)
    loss, _ = _call(logps, old, mask, adv)
    surrogate = -(torch.exp(logps - old) * adv.unsqueeze(1)) * mask
    assert (loss >= surrogate - 1e-6).all()


def test_extreme_ratios_stay_finite_and_bad_scales_are_refused():
    logps = torch.tensor([[-0.01, -30.0]])
    old = torch.tensor([[-30.0, -0.01]])
    loss, _ = _call(logps, old, torch.ones(1, 2), torch.tensor([-3.0]))
    assert torch.isfinite(loss).all()
    with pytest.raises(RecipeError, match="alpha and beta"):
        _call(logps, old, torch.ones(1, 2), torch.tensor([1.0]), alpha=0.0)


def test_registered_with_the_authors_defaults():
    v = POLICY_LOSSES.get("discovered_po")
    assert v.params == {"alpha": 2.0, "beta": 0.6} and v.extra["catalog"] == "rl:87"
