"""Policy losses and aggregations against independent per-token / per-sequence loop references written from the
papers' formulas (never calling postrain.rl.losses helpers), plus gradient, clipping-region and degenerate checks."""

import math

import numpy as np
import pytest
import torch

from postrain.errors import RecipeError
from postrain.rl import policy_loss
from postrain.rl.registry import AGGREGATIONS, POLICY_LOSSES

N, T, G = 6, 7, 3
LENGTHS = [7, 5, 0, 3, 6, 1]  # row 2 is an empty completion
DATA = {"rewards", "group_size", "ref_logps", "entropies", "completion_ids", "vocab_logps"}


def batch(seed=0, spread=0.4, garbage=float("nan")):
    g = torch.Generator().manual_seed(seed)
    lp = -(torch.rand(N, T, generator=g) * 4.0 + 0.01)
    old = lp + spread * torch.randn(N, T, generator=g)
    old = old.clamp(max=-1e-3)
    mask = torch.zeros(N, T)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1.0
    adv = torch.randn(N, generator=g)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    return lp, old, mask, adv, rewards, garbage


def dirty(x, mask, garbage):
    """Padding filled with garbage, gradient still flowing to x at valid positions."""
    return torch.where(mask.bool(), x, torch.full_like(x, garbage))


def run(name, lp, old, mask, adv, garbage=float("nan"), **kw):
    lp = lp.clone().requires_grad_(True)
    per_tok, metrics = POLICY_LOSSES.call(
        name, {"logps": dirty(lp, mask, garbage), "old_logps": dirty(old, mask, garbage), "advantages": adv,
               "mask": mask, **{k: v for k, v in kw.items() if k in POLICY_LOSSES.get(name).data}},
        {k: v for k, v in kw.items() if k not in POLICY_LOSSES.get(name).data and k not in DATA})
    per_tok.sum().backward()
    return per_tok.detach(), lp.grad, metrics


def ref_grad(fn, lp, *args):
    lp = lp.clone().requires_grad_(True)
    out = fn(lp, *args)
    out.sum().backward()
    return out.detach(), lp.grad


# --------------------------------------------------------------------------------------------- references (loops)

def token_loop(lp, old, mask, adv, per_token):
    rows = []
    for i in range(N):
        row = []
        for t in range(T):
            if mask[i, t] == 0:
                row.append(torch.zeros(()))
                continue
            a = adv[i] if adv.dim() == 1 else adv[i, t]
            r = torch.exp(lp[i, t] - old[i, t])
            row.append(per_token(r, float(a), lp[i, t], old[i, t]))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def ref_ppo(eps, eh, c=None):
    def f(r, a, *_):
        loss = -torch.min(r * a, torch.clamp(r, 1 - eps, 1 + eh) * a)
        if c is not None and a < 0:
            loss = torch.min(loss, torch.tensor(-c * a))
        return loss
    return f


def ref_spo(eps):
    return lambda r, a, *_: -(r * a - abs(a) * (r - 1) ** 2 / (2 * eps))


def ref_cegppo(eps, eh, b1, b2, c):
    def f(r, a, *_):
        if r.item() < 1 - eps and a < 0:
            loss = -b1 * (1 - eps) * (r / r.detach()) * a
        elif r.item() > 1 + eh and a > 0:
            loss = -b2 * (1 + eh) * (r / r.detach()) * a
        else:
            loss = -r * a
        if a < 0:
            loss = torch.min(loss, torch.tensor(-c * a))
        return loss
    return f


def ref_dcpo(eps, eh, c):
    def f(r, a, lp_t, old_t):
        q = math.exp(float(old_t))
        lo = 0.5 + 0.5 * math.sqrt(max(0.0, 1 - 4 * eps / q))
        hi = min(0.5 + 0.5 * math.sqrt(1 + 4 * eh / q), max(c, 10.0))
        loss = torch.max(-a * r, -a * torch.clamp(r, lo, hi))
        if a < 0:
            loss = torch.min(loss, torch.tensor(-c * a))
        return loss
    return f


def ref_cispo(cap):
    return lambda r, a, lp_t, _: -min(r.item(), cap) * a * lp_t


def seq_loop(lp, old, mask, fn):
    """Per-sequence values fn(i, valid_lp_list, valid_old_list) spread over the row's valid tokens."""
    rows = []
    for i in range(N):
        idx = [t for t in range(T) if mask[i, t] > 0]
        v = fn(i, [lp[i, t] for t in idx], [old[i, t] for t in idx])
        rows.append(torch.stack([v if mask[i, t] > 0 else torch.zeros(()) for t in range(T)]))
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------------ token losses

TOKEN_CASES = [
    ("ppo_clip", {}, ref_ppo(0.2, 0.2)),
    ("ppo_clip", {"epsilon": 0.2, "epsilon_high": 0.28}, ref_ppo(0.2, 0.28)),
    ("dual_clip", {}, ref_ppo(0.2, 0.2, c=3.0)),
    ("dual_clip", {"dual_clip_c": 1.5}, ref_ppo(0.2, 0.2, c=1.5)),
    ("simple_po", {}, ref_spo(0.2)),
    ("ce_gppo", {}, ref_cegppo(0.2, 0.2, 0.5, 1.0, 10.0)),
    ("ce_gppo", {"beta1": 0.75, "epsilon_high": 0.28}, ref_cegppo(0.2, 0.28, 0.75, 1.0, 10.0)),
    ("dcpo_clip", {}, ref_dcpo(0.2, 0.28, 10.0)),
    ("cispo", {}, ref_cispo(5.0)),
    ("cispo", {"epsilon_high": 1.1}, ref_cispo(1.1)),
    ("gpg_pg", {}, lambda r, a, lp_t, _: -a * lp_t),
]


@pytest.mark.parametrize("name,params,ref", TOKEN_CASES)
@pytest.mark.parametrize("spread", [0.05, 0.6])
def test_token_losses_match_reference(name, params, ref, spread):
    lp, old, mask, adv, _, garbage = batch(seed=int(spread * 100), spread=spread)
    got, grad, _ = run(name, lp, old, mask, adv, garbage, **params)
    want, want_grad = ref_grad(lambda x: token_loop(x, old, mask, adv, ref), lp)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)
    assert torch.all(grad[mask == 0] == 0)


@pytest.mark.parametrize("name", ["ppo_clip", "dual_clip", "simple_po", "ce_gppo", "dcpo_clip", "cispo", "gspo",
                                  "gspo_token"])
def test_on_policy_is_minus_advantage_with_policy_gradient(name):
    lp, _, mask, adv, _, garbage = batch(seed=3)
    got, grad, _ = run(name, lp, lp, mask, adv, garbage)
    a = adv.unsqueeze(1).expand(N, T)
    expected = -a * mask if name != "cispo" else -a * lp * mask
    torch.testing.assert_close(got, expected)
    # r = 1: every surrogate's gradient is the policy gradient -A grad log pi per token (for GSPO the row's
    # |o_i| copies of -s_i A_i each carry d s_i / d log pi_t = 1/|o_i|, which sum to the same)
    torch.testing.assert_close(grad, -a * mask)


def test_gpg_gradient_equals_ppo_on_policy():
    lp, _, mask, adv, _, garbage = batch(seed=4)
    _, g_pg, _ = run("gpg_pg", lp, lp, mask, adv, garbage)
    _, g_ppo, _ = run("ppo_clip", lp, lp, mask, adv, garbage)
    torch.testing.assert_close(g_pg, g_ppo)


def one_token(r_value, a_value, name, **params):
    lp = torch.tensor([[-1.0]])
    old = lp - math.log(r_value)
    return run_small(name, lp, old, torch.tensor([a_value]), **params)


def run_small(name, lp, old, adv, **params):
    lp = lp.clone().requires_grad_(True)
    mask = torch.ones_like(lp)
    loss, _ = POLICY_LOSSES.call(name, {"logps": lp, "old_logps": old, "advantages": adv, "mask": mask}, params)
    loss.sum().backward()
    return loss.sum().item(), lp.grad.sum().item()


@pytest.mark.parametrize("r,a", [(1.5, 1.0), (0.5, -1.0)])
def test_ppo_clip_zero_gradient_in_clipped_region(r, a):
    value, grad = one_token(r, a, "ppo_clip")
    assert grad == 0.0
    assert value == pytest.approx(-(1.2 if a > 0 else 0.8) * a)
    _, grad_inside = one_token(1.1, a, "ppo_clip")
    assert grad_inside != 0.0


def test_clip_higher_moves_only_the_upper_bound():
    assert one_token(1.25, 1.0, "ppo_clip")[1] == 0.0
    assert one_token(1.25, 1.0, "ppo_clip", epsilon_high=0.28)[1] != 0.0
    assert one_token(0.75, -1.0, "ppo_clip", epsilon_high=0.28)[1] == 0.0


def test_dual_clip_caps_negative_advantage_tokens():
    value, grad = one_token(5.0, -1.0, "dual_clip")
    assert value == pytest.approx(3.0) and grad == 0.0
    value_ppo, grad_ppo = one_token(5.0, -1.0, "ppo_clip")
    assert value_ppo == pytest.approx(5.0) and grad_ppo != 0.0
    assert one_token(5.0, 1.0, "dual_clip") == one_token(5.0, 1.0, "ppo_clip")


def test_ce_gppo_keeps_bounded_gradient_where_ppo_clips():
    for r, a, beta, bound in [(0.5, -1.0, 0.5, 0.8), (1.5, 1.0, 1.0, 1.2)]:
        value, grad = one_token(r, a, "ce_gppo")
        assert value == pytest.approx(-beta * bound * a)
        assert grad == pytest.approx(-beta * bound * a)  # d(r/sg(r))/dlogp = 1
        assert one_token(r, a, "ppo_clip")[1] == 0.0
    assert one_token(1.5, 1.0, "ce_gppo", beta2=0.0)[1] == 0.0


def test_simple_po_optimum_sits_at_the_clip_boundary():
    for a in (1.0, -2.0):
        _, grad = one_token(1 + math.copysign(0.2, a), a, "simple_po")
        assert abs(grad) < 1e-5
        _, grad_past = one_token(1 + math.copysign(0.4, a), a, "simple_po")
        assert grad_past * a > 0  # descent moves r back toward the boundary


def test_dcpo_bounds_widen_for_rare_tokens():
    # likely token (q ~ 0.9): r = 1.5 is outside the bound -> clipped; rare token (q ~ 0.01): inside
    lp_likely, lp_rare = math.log(0.9) + math.log(1.5), math.log(0.01) + math.log(1.5)
    _, g_likely = run_small("dcpo_clip", torch.tensor([[lp_likely]]), torch.tensor([[math.log(0.9)]]),
                            torch.tensor([1.0]))
    _, g_rare = run_small("dcpo_clip", torch.tensor([[lp_rare]]), torch.tensor([[math.log(0.01)]]),
                          torch.tensor([1.0]))
    assert g_likely == 0.0 and g_rare != 0.0


def test_cispo_weight_is_detached():
    lp, old, mask, adv, _, garbage = batch(seed=5, spread=0.8)
    _, grad, _ = run("cispo", lp, old, mask, adv, garbage, epsilon_high=1.2)
    w = torch.clamp(torch.exp(lp - old), max=1.2)
    torch.testing.assert_close(grad, -(w * adv.unsqueeze(1)) * mask)


# --------------------------------------------------------------------------------------------- sequence losses

def ref_gspo(adv, eps, eh):
    def fn(i, lps, olds):
        if not lps:
            return torch.zeros(())
        s = torch.exp(sum(a - b for a, b in zip(lps, olds)) / len(lps))
        return -torch.min(s * adv[i], torch.clamp(s, 1 - eps, 1 + eh) * adv[i])
    return fn


def ref_gmpo(adv, eps, eh):
    def fn(i, lps, olds):
        if not lps:
            return torch.zeros(())
        ds = []
        for a, b in zip(lps, olds):
            d = a - b
            dc = torch.clamp(d, -eps, eh)
            ds.append(torch.min(d, dc) if adv[i] > 0 else torch.max(d, dc))
        return -adv[i] * torch.exp(sum(ds) / len(ds))
    return fn


@pytest.mark.parametrize("params,eps,eh", [({}, 3e-4, 4e-4), ({"epsilon": 0.2, "epsilon_high": 0.3}, 0.2, 0.3)])
def test_gspo_matches_reference(params, eps, eh):
    lp, old, mask, adv, _, garbage = batch(seed=6, spread=0.05)
    got, grad, _ = run("gspo", lp, old, mask, adv, garbage, **params)
    want, want_grad = ref_grad(lambda x: seq_loop(x, old, mask, ref_gspo(adv, eps, eh)), lp)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)


def test_gspo_token_value_and_gradient_equal_gspo_with_sequence_advantages():
    lp, old, mask, adv, _, garbage = batch(seed=7, spread=0.05)
    params = {"epsilon": 0.2, "epsilon_high": 0.2}
    v_seq, _, _ = run("gspo", lp, old, mask, adv, garbage, **params)
    v_tok, g_tok, _ = run("gspo_token", lp, old, mask, adv, garbage, **params)
    torch.testing.assert_close(v_tok, v_seq)

    def per_row_mean(x):  # the paper's (1/|y_i|) sum_t, whose gradients must agree
        return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    lp1 = lp.clone().requires_grad_(True)
    p1, _ = POLICY_LOSSES.call("gspo", {"logps": lp1, "old_logps": old, "advantages": adv, "mask": mask}, params)
    per_row_mean(p1).sum().backward()
    lp2 = lp.clone().requires_grad_(True)
    p2, _ = POLICY_LOSSES.call("gspo_token", {"logps": lp2, "old_logps": old, "advantages": adv, "mask": mask},
                               params)
    per_row_mean(p2).sum().backward()
    torch.testing.assert_close(lp2.grad, lp1.grad)
    # per-token advantages: token t's gradient is -s_i A_it (unclipped), a reference written from the paper
    a_tok = torch.randn(N, T, generator=torch.Generator().manual_seed(1))
    _, g, _ = run("gspo_token", lp, old, mask, a_tok, garbage, **params)
    s = torch.stack([torch.exp(((lp[i] - old[i]) * mask[i]).sum() / max(mask[i].sum(), 1)) for i in range(N)])
    torch.testing.assert_close(g, -(s.unsqueeze(1) * a_tok) * mask)
    assert g_tok.shape == (N, T)


@pytest.mark.parametrize("params,eps,eh", [({}, 0.4, 0.4), ({"epsilon": 0.1, "epsilon_high": 0.3}, 0.1, 0.3)])
def test_gmpo_matches_reference(params, eps, eh):
    lp, old, mask, adv, _, garbage = batch(seed=8, spread=0.5)
    got, grad, _ = run("gmpo", lp, old, mask, adv, garbage, **params)
    want, want_grad = ref_grad(lambda x: seq_loop(x, old, mask, ref_gmpo(adv, eps, eh)), lp)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)


def test_gmpo_row_fully_clipped_has_zero_gradient():
    lp = torch.full((1, 3), -1.0)
    old = lp - 1.0  # every log-ratio 1.0 > 0.4
    v, g = run_small("gmpo", lp, old, torch.tensor([1.0]))
    assert g == 0.0 and v == pytest.approx(-3 * math.exp(0.4))  # spread on 3 tokens
    with pytest.raises(ValueError):
        POLICY_LOSSES.call("gmpo", {"logps": lp, "old_logps": old, "advantages": torch.ones(1, 3),
                                    "mask": torch.ones(1, 3)}, {})


def ref_gvpo(rewards, beta, gsize):
    def fn(lp, old, mask):
        rho = [beta * sum((lp[i, t] - old[i, t] for t in range(T) if mask[i, t] > 0), torch.zeros(()))
               for i in range(N)]
        rows = []
        for g in range(N // gsize):
            idx = range(g * gsize, g * gsize + gsize)
            rbar = sum(float(rewards[i]) for i in idx) / gsize
            rhobar = sum(rho[i].item() for i in idx) / gsize  # detached mean, as the authors' code
            for i in idx:
                rows.append(0.5 * ((rho[i] - rhobar) - (float(rewards[i]) - rbar)) ** 2 / max(gsize - 1, 1))
        return torch.stack([torch.stack([rows[i] if mask[i, t] > 0 else torch.zeros(()) for t in range(T)])
                            for i in range(N)])
    return fn


@pytest.mark.parametrize("gsize", [3, 2, 1])
def test_gvpo_matches_reference(gsize):
    lp, old, mask, _, _, garbage = batch(seed=9, spread=0.3)
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 0.0])
    got, grad, _ = run("gvpo", lp, old, mask, None, garbage, rewards=rewards, group_size=gsize)
    want, want_grad = ref_grad(lambda x: ref_gvpo(rewards, 0.1, gsize)(x, old, mask), lp)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)
    if gsize == 1:
        assert torch.all(got == 0) and torch.all(grad == 0)


def test_gvpo_all_equal_rewards_on_policy_is_zero():
    lp, _, mask, _, _, garbage = batch(seed=10)
    got, grad, _ = run("gvpo", lp, lp, mask, None, garbage, rewards=torch.ones(N), group_size=G)
    assert torch.all(got == 0) and torch.all(grad == 0)


def test_a_star_po_matches_reference():
    lp, _, mask, adv, _, garbage = batch(seed=11)
    ref = lp + 0.3
    lp_ = lp.clone().requires_grad_(True)
    got, _ = POLICY_LOSSES.call("a_star_po", {"logps": dirty(lp_, mask, garbage), "ref_logps": dirty(ref, mask, garbage),
                                              "advantages": adv, "mask": mask}, {"beta2": 0.01})
    got.sum().backward()

    def f(x):
        def fn(i, lps, refs):
            return (0.01 * sum((a - b for a, b in zip(lps, refs)), torch.zeros(())) - adv[i]) ** 2
        return seq_loop(x, ref, mask, fn)

    want, want_grad = ref_grad(f, lp)
    torch.testing.assert_close(got.detach(), want)
    torch.testing.assert_close(lp_.grad, want_grad)


def ref_disco(lp, old, mask, rewards, gsize, score, tau, beta, delta, surrogate=False):
    """Scalar DisCO loss written from the paper; surrogate=True uses the authors' neg_sum_exp / sg(neg_sum_exp)."""
    s = []
    for i in range(N):
        idx = [t for t in range(T) if mask[i, t] > 0]
        vals = [lp[i, t] if score == "logL" else torch.exp(lp[i, t] - old[i, t]) for t in idx]
        s.append(sum(vals) / len(vals) if vals else torch.zeros(()))
    total = torch.zeros(())
    for g in range(N // gsize):
        idx = list(range(g * gsize, g * gsize + gsize))
        pos = [i for i in idx if rewards[i] == 1]
        neg = [i for i in idx if rewards[i] == 0]
        if not pos or not neg:
            continue
        if surrogate:
            nse = sum(torch.exp(s[i] / tau) for i in neg)
            neg_term = tau * nse / nse.detach()
        else:
            neg_term = tau * torch.log(sum(torch.exp(s[i] / tau) for i in neg) / len(neg))
        total = total + sum(s[i] for i in pos) / len(pos) - neg_term
    kls, count = torch.zeros(()), 0
    for i in range(N):
        for t in range(T):
            if mask[i, t] > 0:
                d = lp[i, t] - old[i, t]
                kls = kls + torch.exp(d) - d - 1
                count += 1
    kl = kls / count
    coef = max(beta * (kl.item() - delta), 0.0)
    return -total / (N // gsize) + coef * kl


@pytest.mark.parametrize("score", ["logL", "Lratio"])
@pytest.mark.parametrize("beta", [1e3, 0.0])
def test_disco_matches_reference_under_seq_mean_token_mean(score, beta):
    lp, old, mask, _, _, garbage = batch(seed=12, spread=0.05)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # group 2 is all-correct: no contribution
    lp_ = lp.clone().requires_grad_(True)
    loss, metrics = policy_loss("disco", logps=dirty(lp_, mask, garbage), old_logps=dirty(old, mask, garbage),
                                mask=mask, rewards=rewards, group_size=2, score=score, beta=beta,
                                aggregation="seq_mean_token_mean")
    loss.backward()
    want, want_grad = ref_grad(lambda x: ref_disco(x, old, mask, rewards, 2, score, 10.0, beta, 1e-4), lp)
    torch.testing.assert_close(loss.detach(), want)
    torch.testing.assert_close(lp_.grad, want_grad)
    _, sur_grad = ref_grad(lambda x: ref_disco(x, old, mask, rewards, 2, score, 10.0, beta, 1e-4, True), lp)
    torch.testing.assert_close(lp_.grad, sur_grad)  # the authors' surrogate has the same gradient
    assert metrics["disco/valid_group_fraction"].item() == pytest.approx(2 / 3)
    if beta:
        assert metrics["disco/constraint_coef"].item() > 0


# ------------------------------------------------------------------------------------- degenerate & API checks

ALL = sorted(POLICY_LOSSES.entries)


def call_any(name, lp, old, mask, adv, rewards, garbage):
    if name == "nft":  # NFT reads the group accuracy as rewards - advantages: the dr_grpo advantage (r - mean)
        adv = rewards - rewards.view(-1, G).mean(1).repeat_interleave(G)
    # the inputs some entries read besides: entropies (GTPO's filter: below its threshold, so it trains), the token
    # ids (GTPO: few distinct ones, so completions share tokens) and the vocabulary log-probs (TW-GRPO)
    g = torch.Generator().manual_seed(99)
    vocab = torch.log_softmax(torch.randn(*lp.shape, 5, generator=g), -1)
    extra = {"entropies": dirty(torch.full_like(lp, 0.3), mask, garbage),
             "completion_ids": torch.randint(0, 3, lp.shape, generator=g),
             "vocab_logps": torch.where(mask.bool().unsqueeze(-1), vocab, torch.full_like(vocab, garbage))}
    return run(name, lp, old, mask, adv, garbage, rewards=rewards, group_size=G, ref_logps=dirty(old, mask, garbage),
               **extra)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("garbage", [float("nan"), 1e4, float("inf")])
def test_garbage_in_padding_changes_nothing(name, garbage):
    lp, old, mask, adv, rewards, _ = batch(seed=13, spread=0.2)
    clean_v, clean_g, _ = call_any(name, lp, old, mask, adv, rewards, 0.0)
    v, g, metrics = call_any(name, lp, old, mask, adv, rewards, garbage)
    torch.testing.assert_close(v, clean_v)
    torch.testing.assert_close(g, clean_g)
    assert torch.all(v[mask == 0] == 0) and torch.all(g[mask == 0] == 0)
    assert torch.all(v[2] == 0)  # the empty completion
    assert all(torch.isfinite(torch.as_tensor(m)).all() for m in metrics.values())


@pytest.mark.parametrize("name", ALL)
def test_all_equal_rewards_zero_advantages(name):
    lp, old, mask, _, _, garbage = batch(seed=14)
    v, g, _ = call_any(name, lp, lp, mask, torch.zeros(N), torch.ones(N), garbage)
    if name == "a_star_po":  # regression toward A = 0 from pi_ref != pi keeps a gradient by design
        return
    if name == "trpa":  # without pairs the authors' fallback -log σ(±ρ) against the reference keeps a gradient
        return
    if name == "gtpo":  # the authors' entropy shaping A - 0.1 H applies to zero-advantage completions too
        return
    assert torch.all(g == 0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bfloat16_inputs_give_float32_loss(name, dtype):
    lp, old, mask, adv, rewards, _ = batch(seed=15)
    v, g, _ = call_any(name, lp.to(dtype), old.to(dtype), mask, adv, rewards, 0.0)
    assert v.dtype == torch.float32 and torch.isfinite(g.float()).all()


def test_policy_loss_entry_point_and_errors():
    lp, old, mask, adv, rewards, garbage = batch(seed=16)
    loss, metrics = policy_loss("ppo_clip", logps=lp, old_logps=old, advantages=adv, mask=mask,
                                aggregation="seq_mean_token_mean", epsilon=0.1, rewards=rewards, group_size=G)
    per_tok, _ = POLICY_LOSSES.call("ppo_clip", {"logps": lp, "old_logps": old, "advantages": adv, "mask": mask},
                                    {"epsilon": 0.1})
    want = sum((per_tok[i] * mask[i]).sum() / max(mask[i].sum(), 1) for i in range(N)) / N
    torch.testing.assert_close(loss, want)
    assert "clip_ratio/region_mean" in metrics
    with pytest.raises(RecipeError):
        policy_loss("ppo_clip", logps=lp, old_logps=old, advantages=adv, mask=mask, epsilonn=0.1)
    with pytest.raises(RecipeError):
        policy_loss("ppo_clipp", logps=lp, advantages=adv, mask=mask)
    with pytest.raises(ValueError):
        policy_loss("gvpo", logps=lp, old_logps=old, mask=mask)  # needs rewards and group_size
    on, _ = policy_loss("ppo_clip", logps=lp, advantages=adv, mask=mask)  # no old_logps: on-policy
    torch.testing.assert_close(on, -(adv.unsqueeze(1) * mask).sum() / mask.sum())


def test_every_entry_documents_its_formula():
    for v in list(POLICY_LOSSES) + list(AGGREGATIONS):
        assert v.description and v.paper and v.arxiv
    assert "advantages" not in POLICY_LOSSES.get("gvpo").data and "ref_logps" in POLICY_LOSSES.get("a_star_po").data


# ------------------------------------------------------------------------------------------------- aggregations

def np_aggs(loss, mask, max_len=None, alpha=1.0):
    l, m = loss.numpy().astype(np.float64), mask.numpy().astype(np.float64)
    l = np.where(m > 0, l, 0.0)
    lengths = m.sum(1)
    n, width = l.shape
    m_len = width if max_len is None else max_len
    w = np.array([x ** -alpha if x > 0 else 0.0 for x in lengths])
    return {
        "token_mean": l.sum() / max(m.sum(), 1),
        "seq_mean_token_mean": np.mean([l[i].sum() / max(lengths[i], 1) for i in range(n)]),
        "seq_mean_token_sum": np.mean([l[i].sum() for i in range(n)]),
        "seq_mean_token_sum_norm": l.sum() / (n * m_len),
        "delta_l": sum(w[i] / w.sum() * l[i].sum() for i in range(n)) / m_len,
    }


def agg_batch(seed=20):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(N, T, generator=g)
    _, _, mask, _, _, _ = batch()
    return torch.where(mask.bool(), loss, torch.full_like(loss, float("nan"))), mask


@pytest.mark.parametrize("name", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                  "seq_mean_token_sum_norm", "delta_l"])
def test_aggregations_match_numpy(name):
    loss, mask = agg_batch()
    got = AGGREGATIONS.call(name, {"per_token_loss": loss, "mask": mask}, {})
    assert got.item() == pytest.approx(np_aggs(loss, mask)[name], rel=1e-5)
    params = {"max_completion_length": 16} if name in ("seq_mean_token_sum_norm", "delta_l") else {}
    if name == "delta_l":
        params["alpha"] = 0.75
    got = AGGREGATIONS.call(name, {"per_token_loss": loss, "mask": mask}, params)
    assert got.item() == pytest.approx(np_aggs(loss, mask, 16, 0.75)[name], rel=1e-5)


def test_delta_l_alpha_zero_is_dr_grpo():
    loss, mask = agg_batch(21)
    a = AGGREGATIONS.call("delta_l", {"per_token_loss": loss, "mask": mask},
                          {"alpha": 0.0, "max_completion_length": 32})
    nonempty = int((mask.sum(-1) > 0).sum())
    b = AGGREGATIONS.call("seq_mean_token_sum_norm", {"per_token_loss": loss, "mask": mask, "num_sequences": nonempty},
                          {"max_completion_length": 32})
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                  "seq_mean_token_sum_norm", "delta_l"])
def test_two_process_split_sums_to_whole(name):
    loss, mask = agg_batch(22)
    whole = AGGREGATIONS.call(name, {"per_token_loss": loss, "mask": mask}, {})
    lengths = mask.sum(-1)
    glob = {"global_tokens": mask.sum(), "num_sequences": N,
            "length_weight_sum": sum(x ** -1.0 for x in lengths.tolist() if x > 0)}
    parts = []
    for rows in (slice(0, 2), slice(2, N)):
        data = {"per_token_loss": loss[rows], "mask": mask[rows], **glob}
        parts.append(AGGREGATIONS.call(name, data, {"max_completion_length": T} if name in
                                       ("seq_mean_token_sum_norm", "delta_l") else {}))
    torch.testing.assert_close(parts[0] + parts[1], whole)
    if name != "seq_mean_token_sum":  # without the global normalizer the halves do not add up
        local = [AGGREGATIONS.call(name, {"per_token_loss": loss[r], "mask": mask[r]}, {})
                 for r in (slice(0, 2), slice(2, N))]
        assert not torch.allclose(local[0] + local[1], whole)


def test_sequence_loss_spread_then_seq_mean_is_mean_over_sequences():
    lp, old, mask, adv, _, _ = batch(seed=23, spread=0.5)
    per_tok, _ = POLICY_LOSSES.call("gmpo", {"logps": lp, "old_logps": old, "advantages": adv, "mask": mask}, {})
    agg = AGGREGATIONS.call("seq_mean_token_mean", {"per_token_loss": per_tok, "mask": mask}, {})
    per_seq = [per_tok[i, 0] if mask[i].sum() else torch.zeros(()) for i in range(N)]
    torch.testing.assert_close(agg, sum(per_seq) / N)
