"""Reference-free preference losses against per-example references written from the papers' formulas."""

import inspect
import math

import pytest
import torch

from postrain.preference import PREFERENCE, preference_loss

B = 6
NAMES = ["simpo", "orpo", "repo", "contrastive_po", "alphapo", "cpl"]


def logsig(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def batch(seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    data = {
        "chosen_logps": -5 - 55 * torch.rand(B, generator=g, dtype=torch.float64),
        "rejected_logps": -5 - 55 * torch.rand(B, generator=g, dtype=torch.float64),
        "chosen_lengths": torch.randint(5, 60, (B,), generator=g).double(),
        "rejected_lengths": torch.randint(5, 60, (B,), generator=g).double(),
    }
    if requires_grad:
        for k in ("chosen_logps", "rejected_logps"):
            data[k].requires_grad_(True)
    return data


# --- references: one pair at a time, plain math ------------------------------------------------------------

def ref_simpo(lw, ll, nw, nl, beta=2.0, gamma=1.0):
    return -logsig(beta * (lw / nw - ll / nl) - gamma)


def ref_orpo(lw, ll, nw, nl, beta=0.1):
    pw, pl = math.exp(lw / nw), math.exp(ll / nl)
    odds_w, odds_l = pw / (1 - pw), pl / (1 - pl)
    return -lw / nw - beta * math.log(1 / (1 + odds_l / odds_w))


def ref_repo(lw, ll, nw, nl, gamma=0.4):
    return max(0.0, gamma - (lw / nw - ll / nl))


def ref_cpo(lw, ll, nw, nl, beta=0.1, cpo_alpha=1.0):
    return -logsig(beta * lw - beta * ll) + cpo_alpha * (-lw / nw)


def ref_alphapo(lw, ll, nw, nl, alpha=0.25, beta=2.5, gamma=0.1):
    r = lambda l, n: (1 - math.exp(l / n) ** (-alpha)) / alpha  # noqa: E731  (paper's (1 − p̄^-α)/α)
    return -logsig(beta * (r(lw, nw) - r(ll, nl)) - gamma)


def ref_cpl(lw, ll, nw, nl, alpha=0.1, lam=0.5):
    a, b = alpha * lw, lam * alpha * ll
    return -(a - math.log(math.exp(a) + math.exp(b)))


REFS = {"simpo": ref_simpo, "orpo": ref_orpo, "repo": ref_repo, "contrastive_po": ref_cpo,
        "alphapo": ref_alphapo, "cpl": ref_cpl}


def reference(name, data, **params):
    cols = [data[k].detach().tolist() for k in ("chosen_logps", "rejected_logps", "chosen_lengths",
                                                "rejected_lengths")]
    return torch.tensor([REFS[name](*row, **params) for row in zip(*cols)], dtype=torch.float32)


@pytest.mark.parametrize("name", NAMES)
def test_signature_is_reference_free(name):
    params = inspect.signature(PREFERENCE.get(name).fn).parameters
    assert not [p for p in params if p.startswith("ref_")]
    assert PREFERENCE.get(name).data.get("chosen_logps") is True


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_values_match_reference(name, seed):
    data = batch(seed)
    torch.testing.assert_close(preference_loss(name, **data), reference(name, data), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,params", [("simpo", {"beta": 10.0, "gamma": 3.0}), ("orpo", {"beta": 0.5}),
                                         ("repo", {"gamma": 2.0}), ("contrastive_po", {"beta": 0.5, "cpo_alpha": 0.3}),
                                         ("alphapo", {"alpha": -0.5, "beta": 1.0, "gamma": 0.3}),
                                         ("cpl", {"alpha": 0.05, "lam": 0.9})])
def test_non_default_hyperparameters(name, params):
    data = batch(3)
    torch.testing.assert_close(preference_loss(name, **data, **params), reference(name, data, **params),
                               rtol=1e-5, atol=1e-5)


def ref_torch(name, lw, ll, nw, nl):
    """Loop-form torch references (scalar ops) for autograd comparisons."""
    out = []
    for i in range(B):
        w, l, a, b = lw[i], ll[i], nw[i], nl[i]
        if name == "simpo":
            out.append(-torch.nn.functional.logsigmoid(2.0 * (w / a - l / b) - 1.0))
        elif name == "orpo":
            odds = lambda x: torch.exp(x) / (1 - torch.exp(x))  # noqa: E731
            out.append(-w / a - 0.1 * torch.log(torch.sigmoid(torch.log(odds(w / a) / odds(l / b)))))
        elif name == "repo":
            out.append(torch.clamp(0.4 - (w / a - l / b), min=0))
        elif name == "contrastive_po":
            out.append(torch.log1p(torch.exp(-0.1 * (w - l))) - w / a)
        elif name == "alphapo":
            r = lambda x, n: (1 - torch.exp(x / n) ** -0.25) / 0.25  # noqa: E731
            out.append(torch.log1p(torch.exp(-(2.5 * (r(w, a) - r(l, b)) - 0.1))))
        elif name == "cpl":
            out.append(torch.logaddexp(0.1 * w, 0.05 * l) - 0.1 * w)
    return torch.stack(out)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_reference(name):
    data = batch(2, requires_grad=True)
    preference_loss(name, **data).sum().backward()
    got = (data["chosen_logps"].grad.clone(), data["rejected_logps"].grad.clone())
    lw = data["chosen_logps"].detach().clone().requires_grad_(True)
    ll = data["rejected_logps"].detach().clone().requires_grad_(True)
    ref_torch(name, lw, ll, data["chosen_lengths"], data["rejected_lengths"]).sum().backward()
    torch.testing.assert_close(got[0], lw.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[1], ll.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_inputs_computed_in_float32(name):
    data = {k: v.to(torch.bfloat16) for k, v in batch(4).items()}
    out = preference_loss(name, **data)
    assert out.dtype == torch.float32 and out.shape == (B,)
    torch.testing.assert_close(out, reference(name, {k: v.double() for k, v in data.items()}),
                               rtol=1e-4, atol=1e-4)


def test_simpo_is_length_normalized_and_gamma_is_the_margin():
    # Same average log-prob, different lengths: SimPO's reward does not see the length.
    a = preference_loss("simpo", chosen_logps=torch.tensor([-10.0]), rejected_logps=torch.tensor([-20.0]),
                        chosen_lengths=torch.tensor([10.0]), rejected_lengths=torch.tensor([10.0]))
    b = preference_loss("simpo", chosen_logps=torch.tensor([-40.0]), rejected_logps=torch.tensor([-20.0]),
                        chosen_lengths=torch.tensor([40.0]), rejected_lengths=torch.tensor([10.0]))
    torch.testing.assert_close(a, b)
    # At margin ℓ̄_w − ℓ̄_l = γ/β the loss is log 2, for gamma the margin γ itself (not γ/β).
    z = preference_loss("simpo", chosen_logps=torch.tensor([-5.0]), rejected_logps=torch.tensor([-10.0]),
                        chosen_lengths=torch.tensor([10.0]), rejected_lengths=torch.tensor([10.0]),
                        beta=4.0, gamma=2.0)
    torch.testing.assert_close(z, torch.tensor([math.log(2.0)]))


def test_repo_hinge_zero_loss_and_gradient_past_margin_and_simpo_limit():
    lw = torch.tensor([-10.0, -30.0], requires_grad=True)
    data = dict(chosen_logps=lw, rejected_logps=torch.tensor([-30.0, -10.0]),
                chosen_lengths=torch.tensor([10.0, 10.0]), rejected_lengths=torch.tensor([10.0, 10.0]))
    out = preference_loss("repo", **data, gamma=0.5)  # margins +2 (separated) and -2
    out.sum().backward()
    assert out[0].item() == 0.0 and lw.grad[0].item() == 0.0
    assert out[1].item() == pytest.approx(2.5) and lw.grad[1].item() == pytest.approx(-0.1)
    # RePO is SimPO's β → ∞ limit: SimPO(β, γ=β·γ')/β → relu(γ' − margin).
    big = 1e4
    simpo = preference_loss("simpo", **{k: v.detach() for k, v in data.items()}, beta=big, gamma=big * 0.5)
    torch.testing.assert_close(simpo / big, out.detach(), atol=1e-4, rtol=0)


def test_alphapo_reduces_to_simpo_as_alpha_goes_to_zero():
    data = batch(5)
    for alpha in (0.0, 1e-6):
        torch.testing.assert_close(preference_loss("alphapo", **data, alpha=alpha, beta=2.0, gamma=1.0),
                                   preference_loss("simpo", **data, beta=2.0, gamma=1.0), rtol=1e-4, atol=1e-5)


def test_orpo_and_cpo_nll_term_raises_chosen_likelihood():
    # With equal chosen/rejected the preference part is symmetric; the NLL part still pushes ℓ_w up.
    for name in ("orpo", "contrastive_po"):
        lw = torch.tensor([-20.0], requires_grad=True)
        preference_loss(name, chosen_logps=lw, rejected_logps=torch.tensor([-20.0]),
                        chosen_lengths=torch.tensor([10.0]), rejected_lengths=torch.tensor([10.0])).sum().backward()
        assert lw.grad.item() < 0


def test_cpl_conservative_bias():
    # λ=1 is a plain Bradley–Terry on α·ℓ, invariant to shifting both log-probs; λ<1 is not (it is biased
    # towards the preferred segment's own likelihood: shifting both up lowers the loss).
    data = batch(6)
    bt = -torch.nn.functional.logsigmoid(0.1 * (data["chosen_logps"] - data["rejected_logps"])).float()
    torch.testing.assert_close(preference_loss("cpl", **data, lam=1.0), bt)
    shifted = {**data, "chosen_logps": data["chosen_logps"] + 5, "rejected_logps": data["rejected_logps"] + 5}
    torch.testing.assert_close(preference_loss("cpl", **shifted, lam=1.0), bt)
    assert (preference_loss("cpl", **shifted, lam=0.5) < preference_loss("cpl", **data, lam=0.5)).all()
