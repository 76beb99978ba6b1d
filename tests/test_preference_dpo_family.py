"""postrain.preference.dpo_family against independent references.

Each reference below is written from the paper's formula as a per-example loop over 0-d float64 tensors
(`torch.log(torch.sigmoid(.))`, explicit sorts, explicit token loops): it never calls the module under test.
Values and autograd gradients of every entry are compared with its reference; behaviour tests check what the
papers promise; TRL tests re-state `DPOTrainer._compute_loss` (TRL 1.16) in TRL's own vectorized form for the
entries marked `trl=`.
"""

from __future__ import annotations

import math

import pytest
import torch

from postrain.preference import PREFERENCE, preference_loss
from postrain.preference import dpo_family

B, T = 7, 12
POLICY_INPUTS = ("chosen_logps", "rejected_logps", "chosen_token_logps", "rejected_token_logps")
MODULE_ENTRIES = sorted(v.name for v in PREFERENCE if v.fn.__module__ == dpo_family.__name__)


def make_data(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    lw, ll = u(-60, -5, B), u(-60, -5, B)
    tw = torch.randint(1, T + 1, (B,), generator=g)
    tl = torch.randint(1, T + 1, (B,), generator=g)
    tw[0], tl[0] = 4, 9  # make sure both orders of "which side is longer" occur
    tw[1], tl[1] = 10, 3
    pos = torch.arange(T)
    chosen_mask, rejected_mask = (pos < tw[:, None]).float(), (pos < tl[:, None]).float()
    ctok, rtok = u(-3, -0.01, B, T), u(-3, -0.01, B, T)
    return {
        "chosen_logps": lw, "rejected_logps": ll,
        "ref_chosen_logps": lw + u(-4, 4, B), "ref_rejected_logps": ll + u(-4, 4, B),
        "chosen_lengths": torch.randint(1, 60, (B,), generator=g).float(),
        "rejected_lengths": torch.randint(1, 60, (B,), generator=g).float(),
        "chosen_probs": u(0.5, 1.0, B), "rejected_probs": u(0.0, 0.5, B),
        "reward_shift": torch.tensor(0.3),
        "chosen_token_logps": ctok, "rejected_token_logps": rtok,
        "ref_chosen_token_logps": ctok + u(-0.5, 0.5, B, T), "ref_rejected_token_logps": rtok + u(-0.5, 0.5, B, T),
        # log Σ_v π(v|prefix)² lies in (−∞, 0]; with these ranges some WPO weights exceed 1 before the clamp
        "chosen_token_log_sum_sq_probs": u(-3.5, -0.05, B, T),
        "rejected_token_log_sum_sq_probs": u(-3.5, -0.05, B, T),
        "chosen_mask": chosen_mask, "rejected_mask": rejected_mask,
    }


# --- references from the papers' formulas (scalar float64 torch ops) -------------------------------------------------


def ls(x):
    return torch.log(torch.sigmoid(x))


def h(r, side):  # implicit-reward log-ratio of one example
    return r[f"{side}_logps"] - r[f"ref_{side}_logps"]


def ref_dpo(r, beta):
    return -ls(beta * (h(r, "chosen") - h(r, "rejected")))


def ref_ipo(r, beta):
    return (h(r, "chosen") - h(r, "rejected") - 1 / (2 * beta)) ** 2


def ref_ipo_token_mean(r, beta):
    nw, nl = max(float(r["chosen_lengths"]), 1.0), max(float(r["rejected_lengths"]), 1.0)
    d = h(r, "chosen") / nw - h(r, "rejected") / nl
    return (d - 1 / (2 * beta)) ** 2


def ref_cdpo(r, beta, label_smoothing):
    z = beta * (h(r, "chosen") - h(r, "rejected"))
    return -(1 - label_smoothing) * ls(z) - label_smoothing * ls(-z)


def ref_robust(r, beta, label_smoothing):
    # Eq. 8 of rDPO: debiased BCE for flip rate ε
    z, e = beta * (h(r, "chosen") - h(r, "rejected")), label_smoothing
    return ((1 - e) * -ls(z) - e * -ls(-z)) / (1 - 2 * e)


def ref_hinge(r, beta):
    m = 1 - beta * (h(r, "chosen") - h(r, "rejected"))
    return m if m > 0 else m * 0


def ref_sigmoid_norm(r, beta):
    d = h(r, "chosen") / r["chosen_lengths"] - h(r, "rejected") / r["rejected_lengths"]
    return -ls(beta * d)


def ref_exo_pair(r, beta, label_smoothing):
    # KL(p_θ ‖ p_target) over the two responses, p_θ = softmax(β h), p_target = [1−ε, ε]
    zw, zl = beta * h(r, "chosen"), beta * h(r, "rejected")
    pw = torch.exp(zw) / (torch.exp(zw) + torch.exp(zl))
    pl = 1 - pw
    e = label_smoothing
    return pw * torch.log(pw / (1 - e)) + pl * torch.log(pl / e)


def ref_nca_pair(r, beta):
    rw, rl = beta * h(r, "chosen"), beta * h(r, "rejected")
    return -ls(rw) - 0.5 * (ls(-rw) + ls(-rl))


def ref_bco_pair(r, beta):
    d = float(r["reward_shift"])
    return -ls(beta * h(r, "chosen") - d) - ls(d - beta * h(r, "rejected"))


def ref_sppo_hard(r, beta):
    eta = 1 / beta
    return (h(r, "chosen") - eta * (1 - 0.5)) ** 2 + (h(r, "rejected") - eta * (0 - 0.5)) ** 2


def ref_sppo(r, beta):
    eta = 1 / beta
    return ((h(r, "chosen") - eta * (r["chosen_probs"] - 0.5)) ** 2
            + (h(r, "rejected") - eta * (r["rejected_probs"] - 0.5)) ** 2) / 2


def ref_apo_zero(r, beta):
    return 1 - torch.sigmoid(beta * h(r, "chosen")) + torch.sigmoid(beta * h(r, "rejected"))


def ref_apo_down(r, beta):
    return torch.sigmoid(beta * h(r, "chosen")) + 1 - torch.sigmoid(beta * (h(r, "chosen") - h(r, "rejected")))


def ref_discopop(r, beta, tau):
    rho = beta * (h(r, "chosen") - h(r, "rejected"))
    w = torch.sigmoid(rho / tau)
    return (1 - w) * -ls(rho) + w * torch.exp(-rho)


def f_prime(u_log, kind, alpha=None):
    """f′(u) at u = exp(u_log) for the f-DPO divergences (paper Table 1)."""
    u = torch.exp(u_log)
    if kind == "forward_kl":
        return -1 / u
    if kind == "js":
        return torch.log(2 * u / (1 + u))
    return (1 - u ** (-alpha)) / alpha


def ref_fdpo(kind):
    def ref(r, beta, alpha=None):
        d = f_prime(h(r, "chosen"), kind, alpha) - f_prime(h(r, "rejected"), kind, alpha)
        return -ls(beta * d)
    return ref


def ref_rpo(r, beta, eta):
    return ref_dpo(r, beta) + eta * beta * -r["chosen_logps"]


def ref_dpo_nll(r, beta, alpha):
    return ref_dpo(r, beta) + alpha * -r["chosen_logps"] / r["chosen_lengths"]


def ref_wpo(r, beta):
    def w(side):
        n = int(r[f"{side}_mask"].sum())
        # the WPO weight is detached
        tok, sq = r[f"{side}_token_logps"].detach(), r[f"{side}_token_log_sum_sq_probs"].detach()
        s = sum(float(tok[t]) - float(sq[t]) for t in range(n))
        return math.exp(s / n)
    return min(1.0, w("chosen") * w("rejected")) * ref_dpo(r, beta)


def ref_ld_dpo(r, beta, alpha):
    nw, nl = int(r["chosen_mask"].sum()), int(r["rejected_mask"].sum())
    lp = min(nw, nl)

    def ell(key, n):
        tokens = r[key]
        return sum(tokens[t] * (1.0 if t < lp else alpha) for t in range(n))

    hw = ell("chosen_token_logps", nw) - ell("ref_chosen_token_logps", nw)
    hl = ell("rejected_token_logps", nl) - ell("ref_rejected_token_logps", nl)
    return -ls(beta * (hw - hl))


def ref_aot(data, beta, label_smoothing):
    """Batch reference: sort the policy and reference margins independently (Python sort), pair quantiles."""
    pol = [data["chosen_logps"][i] - data["rejected_logps"][i] for i in range(B)]
    ref = [data["ref_chosen_logps"][i] - data["ref_rejected_logps"][i] for i in range(B)]
    pol, ref = sorted(pol, key=lambda t: float(t.detach())), sorted(ref, key=lambda t: float(t.detach()))
    terms = [-(1 - label_smoothing) * ls(beta * (p - q)) - label_smoothing * ls(-beta * (p - q))
             for p, q in zip(pol, ref)]
    return torch.stack([sum(terms) / B] * B)


def ref_aot_unpaired(data, beta, label_smoothing):
    def key(t):
        return float(t.detach())

    cw = sorted([data["chosen_logps"][i] - data["ref_chosen_logps"][i] for i in range(B)], key=key)
    cl = sorted([data["rejected_logps"][i] - data["ref_rejected_logps"][i] for i in range(B)], key=key)
    terms = [-(1 - label_smoothing) * ls(beta * (a - b)) - label_smoothing * ls(-beta * (a - b))
             for a, b in zip(cw, cl)]
    return torch.stack([sum(terms) / B] * B)


# name -> (reference, params used in the comparison (non-default where it helps catch wiring), per-example?)
REFERENCES = {
    "dpo": (ref_dpo, {"beta": 0.2}, True),
    "ipo": (ref_ipo, {"beta": 0.3}, True),
    "ipo_token_mean": (ref_ipo_token_mean, {"beta": 0.3}, True),
    "cdpo": (ref_cdpo, {"beta": 0.2, "label_smoothing": 0.15}, True),
    "robust": (ref_robust, {"beta": 0.2, "label_smoothing": 0.2}, True),
    "hinge": (ref_hinge, {"beta": 0.3}, True),
    "sigmoid_norm": (ref_sigmoid_norm, {"beta": 5.0}, True),
    "exo_pair": (ref_exo_pair, {"beta": 0.2, "label_smoothing": 0.01}, True),
    "nca_pair": (ref_nca_pair, {"beta": 0.3}, True),
    "bco_pair": (ref_bco_pair, {"beta": 0.3}, True),
    "sppo_hard": (ref_sppo_hard, {"beta": 0.5}, True),
    "sppo": (ref_sppo, {"beta": 0.5}, True),
    "apo_zero": (ref_apo_zero, {"beta": 0.3}, True),
    "apo_down": (ref_apo_down, {"beta": 0.3}, True),
    "discopop": (ref_discopop, {"beta": 0.2, "tau": 0.5}, True),
    "fdpo_forward_kl": (ref_fdpo("forward_kl"), {"beta": 0.1}, True),
    "fdpo_js": (ref_fdpo("js"), {"beta": 0.3}, True),
    "fdpo_alpha": (ref_fdpo("alpha"), {"beta": 0.1, "alpha": 0.3}, True),
    "rpo": (ref_rpo, {"beta": 0.1, "eta": 0.05}, True),
    "dpo_nll": (ref_dpo_nll, {"beta": 0.2, "alpha": 0.7}, True),
    "wpo": (ref_wpo, {"beta": 0.2}, True),
    "ld_dpo": (ref_ld_dpo, {"beta": 0.3, "alpha": 0.4}, True),
    "aot": (ref_aot, {"beta": 0.2, "label_smoothing": 0.1}, False),
    "aot_unpaired": (ref_aot_unpaired, {"beta": 0.2, "label_smoothing": 0.1}, False),
}


def run_entry(name, data, params):
    variant = PREFERENCE.get(name)
    return variant.fn(**{k: v for k, v in data.items() if k in variant.data}, **params)


def run_reference(name, data, params):
    ref, _, per_example = REFERENCES[name]
    if not per_example:
        return ref(data, **params)
    return torch.stack([torch.as_tensor(ref({k: v[i] if v.dim() else v for k, v in data.items()}, **params),
                                         dtype=torch.float64) for i in range(B)])


def with_grad(data, dtype):
    return {k: v.detach().to(dtype).requires_grad_(k in POLICY_INPUTS) for k, v in data.items()}


def test_every_entry_has_a_reference():
    assert sorted(REFERENCES) == MODULE_ENTRIES


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("seed", [0, 1])
def test_values_and_gradients_match_reference(name, seed):
    params = REFERENCES[name][1]
    data = make_data(seed)
    d32, d64 = with_grad(data, torch.float32), with_grad(data, torch.float64)
    out, expected = run_entry(name, d32, params), run_reference(name, d64, params)
    assert out.shape == (B,) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-5)
    out.sum().backward()
    expected.sum().backward()
    used = [k for k in POLICY_INPUTS if k in PREFERENCE.get(name).data]
    assert used
    for k in used:
        got = torch.zeros(d32[k].shape) if d32[k].grad is None else d32[k].grad
        want = torch.zeros(d64[k].shape) if d64[k].grad is None else d64[k].grad
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-6, msg=f"grad of {k}")


@pytest.mark.parametrize("name", MODULE_ENTRIES)
def test_bfloat16_inputs_and_registry_call(name):
    data = make_data(3)
    full = PREFERENCE.call(name, data, {})  # paper defaults
    half = PREFERENCE.call(name, {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                  for k, v in data.items()}, {})
    assert full.shape == half.shape == (B,) and half.dtype == torch.float32
    assert torch.isfinite(full).all() and torch.isfinite(half).all()


# --- behaviour the papers promise --------------------------------------------------------------------------------


def call(name, data, **params):
    return run_entry(name, data, params)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    d = with_grad(make_data(), torch.float32)
    call("dpo", d).sum().backward()
    assert (d["chosen_logps"].grad < 0).all() and (d["rejected_logps"].grad > 0).all()


def test_ipo_minimum_is_at_margin_one_over_two_tau():
    d = make_data()
    beta = 0.25
    d["chosen_logps"] = (d["ref_chosen_logps"] + d["rejected_logps"] - d["ref_rejected_logps"] + 1 / (2 * beta))
    d = with_grad(d, torch.float64)
    loss = call("ipo", d, beta=beta)
    loss.sum().backward()
    torch.testing.assert_close(loss, torch.zeros(B, dtype=torch.float32), atol=1e-8, rtol=0)
    assert d["chosen_logps"].grad.abs().max() < 1e-3


@pytest.mark.parametrize("name", ["cdpo", "robust"])
def test_label_noise_losses_reduce_to_dpo_at_zero_noise(name):
    d = make_data()
    torch.testing.assert_close(call(name, d, beta=0.2, label_smoothing=0.0), call("dpo", d, beta=0.2))


def test_robust_is_unbiased_under_label_flips():
    # rDPO's promise: E over a flip with probability ε of the robust loss equals the clean DPO loss
    d = make_data()
    flipped = dict(d, chosen_logps=d["rejected_logps"], rejected_logps=d["chosen_logps"],
                   ref_chosen_logps=d["ref_rejected_logps"], ref_rejected_logps=d["ref_chosen_logps"])
    eps = 0.2
    expected = (1 - eps) * call("robust", d, beta=0.2, label_smoothing=eps) + eps * call(
        "robust", flipped, beta=0.2, label_smoothing=eps)
    torch.testing.assert_close(expected, call("dpo", d, beta=0.2), rtol=1e-5, atol=1e-5)


def test_hinge_is_zero_with_zero_gradient_past_its_margin():
    d = make_data()
    d["chosen_logps"] = d["ref_chosen_logps"] + d["rejected_logps"] - d["ref_rejected_logps"] + 25.0
    d = with_grad(d, torch.float32)
    loss = call("hinge", d, beta=0.05)  # βΔ = 1.25 > 1
    loss.sum().backward()
    assert (loss == 0).all() and (d["chosen_logps"].grad == 0).all() and (d["rejected_logps"].grad == 0).all()
    d2 = with_grad(make_data(), torch.float32)
    loss = call("hinge", d2, beta=0.05)
    loss.sum().backward()
    inside = loss > 0
    assert inside.any() and torch.allclose(d2["chosen_logps"].grad[inside], torch.tensor(-0.05))


def test_length_normalized_losses_are_invariant_to_scaling_log_ratios_with_lengths():
    d = make_data()
    scaled = {k: (v * 3 if k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                                 "chosen_lengths", "rejected_lengths") else v) for k, v in d.items()}
    for name in ("sigmoid_norm", "ipo_token_mean"):
        torch.testing.assert_close(call(name, scaled), call(name, d), rtol=1e-5, atol=1e-5)


def test_ipo_token_mean_equals_ipo_for_unit_lengths():
    d = dict(make_data(), chosen_lengths=torch.ones(B), rejected_lengths=torch.ones(B))
    torch.testing.assert_close(call("ipo_token_mean", d, beta=0.3), call("ipo", d, beta=0.3))


def test_exo_pair_is_minimal_at_the_smoothed_target():
    eps, beta = 0.05, 0.2
    d = make_data()
    margin = math.log((1 - eps) / eps) / beta  # σ(βΔ) = 1 − ε
    d["chosen_logps"] = d["ref_chosen_logps"] + d["rejected_logps"] - d["ref_rejected_logps"] + margin
    d = with_grad(d, torch.float64)
    loss = call("exo_pair", d, beta=beta, label_smoothing=eps)
    loss.sum().backward()
    assert loss.abs().max() < 1e-5 and d["chosen_logps"].grad.abs().max() < 1e-5
    assert (call("exo_pair", make_data(), beta=beta, label_smoothing=eps) > 0).all()


def test_nca_and_apo_use_absolute_rewards_where_dpo_is_shift_invariant():
    d = make_data()
    shifted = dict(d, chosen_logps=d["chosen_logps"] + 5, rejected_logps=d["rejected_logps"] + 5)
    torch.testing.assert_close(call("dpo", shifted), call("dpo", d))
    for name in ("nca_pair", "apo_zero", "bco_pair"):
        assert not torch.allclose(call(name, shifted), call(name, d))


def test_apo_zero_raises_chosen_lowers_rejected_and_apo_down_lowers_rejected():
    d = with_grad(make_data(), torch.float32)
    call("apo_zero", d).sum().backward()
    assert (d["chosen_logps"].grad < 0).all() and (d["rejected_logps"].grad > 0).all()
    d = with_grad(make_data(), torch.float32)
    call("apo_down", d).sum().backward()
    assert (d["rejected_logps"].grad > 0).all()


def test_bco_reward_shift_is_detached_and_absent_shift_is_zero():
    d = with_grad(make_data(), torch.float32)
    shift = torch.tensor(0.4, requires_grad=True)
    loss = call("bco_pair", dict(d, reward_shift=shift), beta=0.3)
    loss.sum().backward()
    assert shift.grad is None
    no_shift = {k: v for k, v in d.items() if k != "reward_shift"}
    torch.testing.assert_close(call("bco_pair", no_shift, beta=0.3),
                               call("bco_pair", dict(d, reward_shift=torch.tensor(0.0)), beta=0.3))


def test_sppo_hard_is_twice_sppo_at_hard_win_rates_and_zero_at_its_targets():
    d = dict(make_data(), chosen_probs=torch.ones(B), rejected_probs=torch.zeros(B))
    torch.testing.assert_close(call("sppo_hard", d, beta=0.5), 2 * call("sppo", d, beta=0.5))
    beta = 0.5
    at_target = dict(d, chosen_logps=d["ref_chosen_logps"] + 0.5 / beta,
                     rejected_logps=d["ref_rejected_logps"] - 0.5 / beta)
    assert call("sppo_hard", at_target, beta=beta).abs().max() < 1e-4


def test_aot_couples_the_batch_and_aot_unpaired_ignores_the_pairing():
    d = make_data()
    out = call("aot", d, beta=0.2)
    assert torch.allclose(out, out[0].expand(B))  # batch loss at every position
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(5))
    permuted = {k: (v[perm] if v.dim() else v) for k, v in d.items()}
    torch.testing.assert_close(call("aot", permuted, beta=0.2), out)
    # unpaired: re-pairing the rejected side alone changes nothing
    repaired = dict(d, rejected_logps=d["rejected_logps"][perm], ref_rejected_logps=d["ref_rejected_logps"][perm])
    torch.testing.assert_close(call("aot_unpaired", repaired, beta=0.2), call("aot_unpaired", d, beta=0.2))
    assert not torch.allclose(call("aot", repaired, beta=0.2), out)


def test_discopop_tends_to_logistic_below_and_exponential_above_zero_margin_as_tau_shrinks():
    d = make_data()
    z = 0.2 * ((d["chosen_logps"] - d["ref_chosen_logps"]) - (d["rejected_logps"] - d["ref_rejected_logps"]))
    out = call("discopop", d, beta=0.2, tau=1e-4)
    expected = torch.where(z > 0, torch.exp(-z), torch.log1p(torch.exp(-z)))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_fdpo_alpha_limits_are_reverse_and_forward_kl():
    d = make_data()
    torch.testing.assert_close(call("fdpo_alpha", d, beta=0.1, alpha=1e-5), call("dpo", d, beta=0.1),
                               rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(call("fdpo_alpha", d, beta=0.1, alpha=1 - 1e-5), call("fdpo_forward_kl", d, beta=0.1),
                               rtol=1e-3, atol=1e-3)


def test_fdpo_exponentials_stay_finite_for_extreme_log_ratios():
    d = make_data()
    d["chosen_logps"] = d["ref_chosen_logps"] - 500.0
    for name in ("fdpo_forward_kl", "fdpo_alpha"):
        dd = with_grad(d, torch.float32)
        loss = call(name, dd)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(dd["chosen_logps"].grad).all()


def test_nll_terms_vanish_at_zero_weight_and_add_the_chosen_nll():
    d = make_data()
    torch.testing.assert_close(call("rpo", d, beta=0.1, eta=0.0), call("dpo", d, beta=0.1))
    torch.testing.assert_close(call("dpo_nll", d, beta=0.1, alpha=0.0), call("dpo", d, beta=0.1))
    dd = with_grad(d, torch.float32)
    call("dpo_nll", dd, beta=0.1, alpha=1.0).sum().backward()
    d0 = with_grad(d, torch.float32)
    call("dpo", d0, beta=0.1).sum().backward()
    torch.testing.assert_close(dd["chosen_logps"].grad - d0["chosen_logps"].grad, -1.0 / d["chosen_lengths"])


def test_wpo_weights_are_detached_clamped_and_ignore_padding():
    d = make_data()
    dd = with_grad(d, torch.float32)
    call("wpo", dd).sum().backward()
    assert dd["chosen_token_logps"].grad is None and dd["rejected_token_logps"].grad is None
    # tokens far more likely than the policy's own sampling distribution → weight clamped at 1 → plain DPO
    big = dict(d, chosen_token_log_sum_sq_probs=torch.full((B, T), -30.0))
    torch.testing.assert_close(call("wpo", big, beta=0.2), call("dpo", d, beta=0.2))
    garbage = {k: v.clone() for k, v in d.items()}
    for key in ("chosen_token_logps", "rejected_token_logps", "chosen_token_log_sum_sq_probs"):
        garbage[key][d[key.split("_token")[0] + "_mask"] == 0] = float("nan")
    garbage["rejected_token_log_sum_sq_probs"][d["rejected_mask"] == 0] = 1e4
    torch.testing.assert_close(call("wpo", garbage), call("wpo", d))
    empty = dict(d, chosen_mask=torch.zeros(B, T))
    assert torch.isfinite(call("wpo", empty)).all()


def test_ld_dpo_limits_padding_and_empty_rows():
    d = make_data()
    summed = {side: (d[f"{side}_token_logps"] * d[f"{side.split('ref_')[-1]}_mask"]).sum(-1)
              for side in ("chosen", "rejected", "ref_chosen", "ref_rejected")}
    as_dpo = {f"{side}_logps": v for side, v in summed.items()}
    torch.testing.assert_close(call("ld_dpo", d, beta=0.3, alpha=1.0), call("dpo", as_dpo, beta=0.3),
                               rtol=1e-5, atol=1e-5)
    # equal lengths: no verbose tail, α is irrelevant
    same = dict(d, rejected_mask=d["chosen_mask"])
    torch.testing.assert_close(call("ld_dpo", same, alpha=0.1), call("ld_dpo", same, alpha=0.9))
    assert not torch.allclose(call("ld_dpo", d, alpha=0.1), call("ld_dpo", d, alpha=0.9))
    garbage = {k: v.clone() for k, v in d.items()}
    for key in ("chosen_token_logps", "ref_rejected_token_logps"):
        mask = d["chosen_mask"] if "chosen" in key else d["rejected_mask"]
        garbage[key][mask == 0] = float("nan") if key.startswith("chosen") else 1e4
    torch.testing.assert_close(call("ld_dpo", garbage), call("ld_dpo", d))
    empty = with_grad(dict(d, rejected_mask=torch.zeros(B, T)), torch.float32)
    loss = call("ld_dpo", empty)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(empty["chosen_token_logps"].grad).all()


# --- TRL 1.16 DPOTrainer._compute_loss, restated in TRL's form, for entries marked trl= ----------------------------


def trl_loss(name, d, p):
    """The per-sequence loss block of trl/trainer/dpo_trainer.py (1.16) for one loss_type, then its batch mean."""
    F = torch.nn.functional
    chosen_logratios = d["chosen_logps"] - d["ref_chosen_logps"]
    rejected_logratios = d["rejected_logps"] - d["ref_rejected_logps"]
    beta = p.get("beta")
    if name == "fdpo_forward_kl":
        chosen_scores, rejected_scores = 1 - torch.exp(-chosen_logratios), 1 - torch.exp(-rejected_logratios)
    elif name == "fdpo_js":
        chosen_scores = math.log(2) + F.logsigmoid(chosen_logratios)
        rejected_scores = math.log(2) + F.logsigmoid(rejected_logratios)
    elif name == "fdpo_alpha":
        c = 1 - p["alpha"]  # f_alpha_divergence_coef
        chosen_scores = (torch.exp(torch.clamp((c - 1) * chosen_logratios, max=80.0)) - 1) / (c - 1)
        rejected_scores = (torch.exp(torch.clamp((c - 1) * rejected_logratios, max=80.0)) - 1) / (c - 1)
    else:
        chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
    delta_score = chosen_scores - rejected_scores
    eps = p.get("label_smoothing", 0.0)
    if name in ("dpo", "fdpo_forward_kl", "fdpo_js", "fdpo_alpha"):
        loss = -F.logsigmoid(beta * delta_score)
    elif name == "hinge":
        loss = torch.relu(1 - beta * delta_score)
    elif name in ("ipo_token_mean", "sigmoid_norm"):
        ipo_delta = (chosen_scores / d["chosen_lengths"].clamp(min=1.0)
                     - rejected_scores / d["rejected_lengths"].clamp(min=1.0))
        loss = (ipo_delta - 1 / (2 * beta)) ** 2 if name == "ipo_token_mean" else -F.logsigmoid(beta * ipo_delta)
    elif name == "exo_pair":
        e = torch.tensor(eps)
        loss = (torch.sigmoid(beta * delta_score) * (F.logsigmoid(beta * delta_score) - torch.log1p(-e))
                + torch.sigmoid(-beta * delta_score) * (F.logsigmoid(-beta * delta_score) - torch.log(e)))
    elif name == "nca_pair":
        cr, rr = beta * chosen_logratios, beta * rejected_logratios
        loss = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
    elif name == "robust":
        loss = (-(1 - eps) * F.logsigmoid(beta * delta_score) + eps * F.logsigmoid(-beta * delta_score)) / (1 - 2 * eps)
    elif name == "sppo_hard":
        loss = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    elif name in ("aot", "aot_unpaired"):
        if name == "aot":
            a = torch.sort(d["chosen_logps"] - d["rejected_logps"], dim=0)[0]
            b = torch.sort(d["ref_chosen_logps"] - d["ref_rejected_logps"], dim=0)[0]
        else:
            a, b = torch.sort(chosen_logratios, dim=0)[0], torch.sort(rejected_logratios, dim=0)[0]
        loss = -F.logsigmoid(beta * (a - b)) * (1 - eps) - F.logsigmoid(-beta * (a - b)) * eps
    elif name == "apo_zero":
        loss = 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    elif name == "apo_down":
        loss = (torch.sigmoid(beta * chosen_logratios)
                + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))
    elif name == "discopop":
        logits = delta_score * beta
        mod = torch.sigmoid(logits / p["tau"])
        loss = -F.logsigmoid(logits) * (1 - mod) + torch.exp(-logits) * mod
    else:
        raise KeyError(name)
    return loss.mean()


def trl_ld_alpha(d, beta, ld_alpha):
    """TRL 1.16's ld_alpha branch: masks from cumsum over the completion mask, padding log-probs zero."""
    mask = torch.cat([d["chosen_mask"], d["rejected_mask"]])
    comp_pos = mask.cumsum(dim=1)
    chosen_lens, rejected_lens = mask.sum(dim=1).long().chunk(2)
    shared = torch.minimum(chosen_lens, rejected_lens).repeat(2)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared.unsqueeze(1))
    tail_mask = comp_pos > shared.unsqueeze(1)

    def logps(a, b):
        per_token = torch.cat([a, b]) * mask  # TRL's log-probs are zero at masked positions
        return (per_token * shared_mask).sum(1) + ld_alpha * (per_token * tail_mask).sum(1)

    cw, cl = logps(d["chosen_token_logps"], d["rejected_token_logps"]).chunk(2)
    rw, rl = logps(d["ref_chosen_token_logps"], d["ref_rejected_token_logps"]).chunk(2)
    return (-torch.nn.functional.logsigmoid(beta * ((cw - rw) - (cl - rl)))).mean()


TRL_PARAMS = {
    "dpo": {"beta": 0.1}, "hinge": {"beta": 0.1}, "ipo_token_mean": {"beta": 0.1}, "sigmoid_norm": {"beta": 0.5},
    "exo_pair": {"beta": 0.1, "label_smoothing": 1e-3}, "nca_pair": {"beta": 0.1},
    "robust": {"beta": 0.1, "label_smoothing": 0.1}, "sppo_hard": {"beta": 0.1},
    "aot": {"beta": 0.1, "label_smoothing": 0.05}, "aot_unpaired": {"beta": 0.1, "label_smoothing": 0.05},
    "apo_zero": {"beta": 0.1}, "apo_down": {"beta": 0.1}, "discopop": {"beta": 0.05, "tau": 0.05},
    "fdpo_forward_kl": {"beta": 0.1}, "fdpo_js": {"beta": 0.1}, "fdpo_alpha": {"beta": 0.1, "alpha": 0.3},
}


def test_trl_expressions_cover_exactly_the_entries_marked_trl():
    marked = sorted(n for n in MODULE_ENTRIES if PREFERENCE.get(n).trl)
    assert marked == sorted(list(TRL_PARAMS) + ["ld_dpo"])


@pytest.mark.parametrize("name", sorted(TRL_PARAMS))
def test_batch_loss_matches_trl_dpo_trainer(name):
    d = make_data(2)
    p = TRL_PARAMS[name]
    torch.testing.assert_close(call(name, d, **p).mean(), trl_loss(name, d, p), rtol=1e-5, atol=1e-5)


def test_ld_dpo_matches_trl_ld_alpha():
    d = make_data(4)
    torch.testing.assert_close(call("ld_dpo", d, beta=0.1, alpha=0.3).mean(), trl_ld_alpha(d, 0.1, 0.3),
                               rtol=1e-5, atol=1e-5)


def test_trl_ipo_differs_from_the_paper_form_and_trl_sft_from_dpo_nll():
    # documented differences, not equalities: TRL 1.16 averages IPO per token; its 'sft' term is a batch token mean
    d = make_data()
    assert not torch.allclose(call("ipo", d).mean(), trl_loss("ipo_token_mean", d, {"beta": 0.1}))
    masks = torch.arange(60)[None, :] < d["chosen_lengths"][:, None]
    batch_token_mean = d["chosen_logps"].sum() / masks.sum()  # TRL: −mean over all chosen tokens of the batch
    trl_rpo = trl_loss("dpo", d, {"beta": 0.1}) - batch_token_mean
    assert not torch.allclose(call("dpo_nll", d, beta=0.1, alpha=1.0).mean(), trl_rpo)


def test_discopop_is_not_convex_in_the_margin():
    """At the paper's tau, the loss falls as the margin goes from 0 to about -0.12 (beta * delta) and rises on the
    way to +0.07: gradient descent from the reference lowers the margin first (see the entry's docstring)."""
    import torch.nn.functional as F

    def reference(z, tau=0.05):  # the authors' log_ratio_modulated_loss, written out on the scaled margin
        mix = torch.sigmoid(z / tau)
        return (1 - mix) * F.softplus(-z) + mix * torch.exp(-z)

    beta = 0.05
    z = torch.tensor([-0.3, -0.05, 0.0, 0.03, 0.15, 2.0])
    chosen = (z / beta).clone().requires_grad_(True)  # delta = chosen log-ratio, everything else 0
    zeros = torch.zeros(len(z))
    loss = preference_loss("discopop", chosen_logps=chosen, rejected_logps=zeros, ref_chosen_logps=zeros,
                           ref_rejected_logps=zeros, beta=beta, tau=0.05)
    torch.testing.assert_close(loss, reference(z))
    loss.sum().backward()
    # descent moves z toward the local minimum near -0.12 from anywhere left of the maximum near +0.07
    assert chosen.grad.sign().tolist() == [-1.0, 1.0, 1.0, 1.0, -1.0, -1.0], chosen.grad
