"""Unpaired preference losses (KTO, APO-zero unpaired, BCO) against per-example references from the papers."""

import math

import pytest
import torch

from postrain.preference import preference_loss

B = 8


def sig(z):
    return 1 / (1 + math.exp(-z))


def batch(seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    data = {
        "logps": -5 - 55 * torch.rand(B, generator=g, dtype=torch.float64),
        "ref_logps": -5 - 55 * torch.rand(B, generator=g, dtype=torch.float64),
        "labels": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]),
    }
    if requires_grad:
        data["logps"].requires_grad_(True)
    return data


def ref_kto(l, r, y, kl, beta=0.1, wd=1.0, wu=1.0):
    z0 = max(kl, 0.0)
    return wd * (1 - sig(beta * (l - r - z0))) if y == 1 else wu * (1 - sig(beta * (z0 - (l - r))))


def ref_apo(l, r, y, beta=0.1, wd=1.0, wu=1.0):
    return wd * (1 - sig(beta * (l - r))) if y == 1 else wu * sig(beta * (l - r))


def ref_bco(l, r, y, delta, beta=0.1):
    z = beta * (l - r) - delta
    return -math.log(sig(z)) if y == 1 else -math.log(sig(-z))


def rows(data):
    return zip(data["logps"].detach().tolist(), data["ref_logps"].tolist(), data["labels"].tolist())


@pytest.mark.parametrize("kl", [0.7, -0.3])
@pytest.mark.parametrize("params", [{}, {"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.8}])
def test_kto_matches_reference(kl, params):
    data = batch(0)
    short = {"beta": "beta", "desirable_weight": "wd", "undesirable_weight": "wu"}
    expect = torch.tensor([ref_kto(*row, kl, **{short[k]: v for k, v in params.items()}) for row in rows(data)])
    got = preference_loss("kto", **data, kl=torch.tensor(kl), **params)
    torch.testing.assert_close(got, expect.float(), rtol=1e-5, atol=1e-6)


def test_kto_per_example_kl_and_kl_is_detached():
    data = batch(1, requires_grad=True)
    kl = torch.linspace(0.0, 2.0, B, dtype=torch.float64, requires_grad=True)
    out = preference_loss("kto", **data, kl=kl)
    expect = torch.tensor([ref_kto(*row, k) for row, k in zip(rows(data), kl.tolist())])
    torch.testing.assert_close(out, expect.float(), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert kl.grad is None  # the reference point carries no gradient
    # Loop-form torch reference for the policy gradient.
    logps = data["logps"].detach().clone().requires_grad_(True)
    terms = []
    for i in range(B):
        h = logps[i] - data["ref_logps"][i]
        z0 = float(kl[i].detach())
        terms.append(1 - torch.sigmoid(0.1 * (h - z0)) if data["labels"][i] == 1 else
                     1 - torch.sigmoid(0.1 * (z0 - h)))
    torch.stack(terms).sum().backward()
    torch.testing.assert_close(data["logps"].grad, logps.grad, rtol=1e-5, atol=1e-8)


def test_kto_desirable_pushes_up_undesirable_pushes_down():
    data = batch(2, requires_grad=True)
    preference_loss("kto", **data, kl=0.5).sum().backward()
    g = data["logps"].grad
    assert (g[data["labels"] == 1] < 0).all() and (g[data["labels"] == 0] > 0).all()


@pytest.mark.parametrize("params", [{}, {"beta": 0.3, "desirable_weight": 2.0, "undesirable_weight": 0.5}])
def test_apo_zero_unpaired_matches_reference(params):
    data = batch(3, requires_grad=True)
    short = {"beta": "beta", "desirable_weight": "wd", "undesirable_weight": "wu"}
    expect = torch.tensor([ref_apo(*row, **{short[k]: v for k, v in params.items()}) for row in rows(data)])
    out = preference_loss("apo_zero_unpaired", **data, **params)
    torch.testing.assert_close(out, expect.float(), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    beta, wd, wu = params.get("beta", 0.1), params.get("desirable_weight", 1.0), params.get("undesirable_weight", 1.0)
    grads = []
    for (l, r, y) in rows(data):
        s = sig(beta * (l - r))
        grads.append(-wd * beta * s * (1 - s) if y == 1 else wu * beta * s * (1 - s))
    torch.testing.assert_close(data["logps"].grad, torch.tensor(grads, dtype=torch.float64), rtol=1e-4, atol=1e-7)


def test_apo_zero_unpaired_is_kto_without_reference_point_for_desirable():
    data = batch(4)
    torch.testing.assert_close(preference_loss("apo_zero_unpaired", **data)[data["labels"] == 1],
                               preference_loss("kto", **data, kl=0.0)[data["labels"] == 1])


@pytest.mark.parametrize("delta", [0.0, -0.8, 1.5])
def test_bco_matches_reference_and_delta_is_detached(delta):
    data = batch(5, requires_grad=True)
    d = torch.tensor(delta, requires_grad=True)
    out = preference_loss("bco", **data, delta=d, beta=0.2)
    expect = torch.tensor([ref_bco(*row, delta, beta=0.2) for row in rows(data)])
    torch.testing.assert_close(out, expect.float(), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert d.grad is None
    grads = []
    for (l, r, y) in rows(data):
        z = 0.2 * (l - r) - delta
        grads.append(-0.2 * (1 - sig(z)) if y == 1 else 0.2 * sig(z))
    torch.testing.assert_close(data["logps"].grad, torch.tensor(grads, dtype=torch.float64), rtol=1e-4, atol=1e-7)


def test_bco_delta_shifts_the_decision_boundary():
    # An example whose reward equals δ is at the classifier's boundary: loss log 2 whatever its label.
    out = preference_loss("bco", logps=torch.tensor([-10.0, -10.0]), ref_logps=torch.tensor([-20.0, -20.0]),
                          labels=torch.tensor([1.0, 0.0]), delta=torch.tensor(1.0), beta=0.1)
    torch.testing.assert_close(out, torch.full((2,), math.log(2.0)))


@pytest.mark.parametrize("name,extra", [("kto", {"kl": 0.2}), ("apo_zero_unpaired", {}), ("bco", {"delta": 0.1})])
def test_bfloat16_inputs(name, extra):
    data = batch(6)
    low = {k: v.to(torch.bfloat16) for k, v in data.items()}
    out = preference_loss(name, **low, **extra)
    assert out.dtype == torch.float32 and out.shape == (B,)
    torch.testing.assert_close(out, preference_loss(name, **{k: v.double() for k, v in low.items()}, **extra))
