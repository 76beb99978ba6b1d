"""Reference-based pairwise variants: each entry against a per-example reference written from the paper / authors'
code formula (scalar loops, never the module's helpers), plus gradients and the behaviour each paper promises."""

import inspect
import math

import pytest
import torch

from postrain.errors import DataError, RecipeError
from postrain.preference import PREFERENCE, preference_loss
from postrain.preference import pairwise_variants as pv

B = 6


def logsig(z):
    """log σ(z) for a 0-d tensor, written out (not F.logsigmoid)."""
    return torch.minimum(z, torch.zeros_like(z)) - torch.log1p(torch.exp(-z.abs()))


def sig(z):
    return 1 / (1 + torch.exp(-z))


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(*(shape or (B,)), generator=g, dtype=torch.float64)
    return {
        "chosen_logps": u(-60, -5), "rejected_logps": u(-60, -5),
        "ref_chosen_logps": u(-60, -5), "ref_rejected_logps": u(-60, -5),
        "chosen_lengths": torch.randint(5, 40, (B,), generator=g).double(),
        "rejected_lengths": torch.randint(5, 40, (B,), generator=g).double(),
        "score_chosen": u(0.6, 1.0), "score_rejected": u(0.0, 0.5),
    }


def leaf(batch, *names):
    """Copies of `batch` whose named policy inputs require grad (float64 leaves)."""
    out = dict(batch)
    for n in names:
        out[n] = batch[n].clone().requires_grad_(True)
    return out


def grads_match(entry_fn, ref_fn, batch, names, tol=1e-5, **params):
    a, b = leaf(batch, *names), leaf(batch, *names)
    entry_fn(**a, **params).mean().backward()
    torch.stack([ref_fn(b, i, **params) for i in range(B)]).mean().backward()
    for n in names:
        close(a[n].grad, b[n].grad, tol)


def check(entry_fn, ref_fn, batch, grad_names=("chosen_logps", "rejected_logps"), tol=1e-5, **params):
    """Values per example and gradients of the batch mean w.r.t. the policy inputs."""
    got = entry_fn(**batch, **params)
    assert got.shape == (B,) and got.dtype == torch.float32
    close(got, torch.stack([ref_fn(batch, i, **params) for i in range(B)]), tol)
    grads_match(entry_fn, ref_fn, batch, grad_names, tol, **params)


def pick(fn, batch):
    return {k: v for k, v in batch.items() if k in inspect.signature(fn).parameters}


# ---------------------------------------------------------------- references (one example i at a time)

def h(b, i, side):
    return b[f"{side}_logps"][i] - b[f"ref_{side}_logps"][i]


def ref_dpo(b, i, beta=0.1):
    return -logsig(beta * (h(b, i, "chosen") - h(b, i, "rejected")))


def ref_odpo(b, i, beta=0.1, alpha=1.0):
    offset = math.log(float(b["score_chosen"][i] - b["score_rejected"][i]))
    return -logsig(beta * (h(b, i, "chosen") - h(b, i, "rejected")) - alpha * offset)


def ref_odpo_ratio(b, i, beta=0.1, alpha=1.0):
    offset = math.log(float(b["score_chosen"][i] / b["score_rejected"][i]))
    return -logsig(beta * (h(b, i, "chosen") - h(b, i, "rejected")) - alpha * offset)


def ref_r_dpo(b, i, beta=0.1, alpha=0.01):
    length_gap = float(b["chosen_lengths"][i] - b["rejected_lengths"][i])
    return -logsig(beta * (h(b, i, "chosen") - h(b, i, "rejected")) + alpha * length_gap)


def ref_h_dpo(b, i, beta=0.1, alpha=0.9):
    w = alpha * b["chosen_logps"][i] - b["ref_chosen_logps"][i]
    l = alpha * b["rejected_logps"][i] - b["ref_rejected_logps"][i]
    return -logsig(beta * (w - l))


def ref_mappo(b, i, beta=0.1):
    dr = float(b["score_chosen"][i] - b["score_rejected"][i])
    return -logsig(beta * h(b, i, "chosen") - dr * beta * h(b, i, "rejected"))


def ref_dr_dpo_batch(b, beta=0.1, beta_prime=1.0):
    total = sum(torch.exp(-ref_dpo(b, i, beta) / beta_prime) for i in range(B))
    return -beta_prime * torch.log(total / B)


def ref_modpo(b, i, beta=0.1, w=(0.5, 0.5)):
    s_w, s_l = b["score_chosen"][i], b["score_rejected"][i]
    s_w, s_l = (s_w.reshape(-1), s_l.reshape(-1))
    margin = sum(w[k + 1] * (s_w[k] - s_l[k]) for k in range(len(w) - 1))
    return -logsig((beta * (h(b, i, "chosen") - h(b, i, "rejected")) - margin) / w[0])


def ref_inpo(b, i, eta=0.0075, tau=0.0025):
    d_pi = b["chosen_logps"][i] - b["rejected_logps"][i]
    d_ref = b["ref_chosen_logps"][i] - b["ref_rejected_logps"][i]
    d_t = b["prev_chosen_logps"][i] - b["prev_rejected_logps"][i]
    return (d_pi - tau / eta * d_ref - (eta - tau) / eta * d_t - 1 / (2 * eta)) ** 2


def ref_rebel(b, i, eta=1.0):
    dr = b["score_chosen"][i] - b["score_rejected"][i]
    return ((h(b, i, "chosen") - h(b, i, "rejected")) - eta * dr) ** 2


def ref_rpo(b, i, beta=0.2, eta=1.0, distance="bwd_kl"):
    model = beta * (h(b, i, "chosen") - h(b, i, "rejected"))
    target = eta * (b["score_chosen"][i] - b["score_rejected"][i])
    if distance == "sq":
        return (model - target) ** 2
    p, q = (sig(target), sig(model)) if distance == "bwd_kl" else (sig(model), sig(target))
    return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))


def ref_implicit_prm(b, i, beta=0.05):
    z = beta * (b["logps"][i] - b["ref_logps"][i])
    l = float(b["labels"][i])
    return -l * logsig(z) - (1 - l) * logsig(-z)


# ---------------------------------------------------------------- sequence-level pairwise entries

def test_odpo(batch):
    check(pv.odpo, ref_odpo, pick(pv.odpo, batch))
    check(pv.odpo, ref_odpo, pick(pv.odpo, batch), beta=0.5, alpha=2.0)
    # alpha=0 is DPO; a larger score gap demands a larger margin (higher loss at the same Δ).
    close(pv.odpo(**pick(pv.odpo, batch), alpha=0.0), torch.stack([ref_dpo(batch, i) for i in range(B)]))
    wider = dict(pick(pv.odpo, batch), score_chosen=batch["score_chosen"] + 1.0)
    assert (pv.odpo(**wider) > pv.odpo(**pick(pv.odpo, batch))).all()


def test_odpo_log_ratio(batch):
    check(pv.odpo_log_ratio, ref_odpo_ratio, pick(pv.odpo_log_ratio, batch))
    assert not torch.allclose(pv.odpo_log_ratio(**pick(pv.odpo, batch)), pv.odpo(**pick(pv.odpo, batch)))


def with_ties(data, tied):
    """`data` with score_rejected set equal to score_chosen at the rows `tied`."""
    rejected = data["score_rejected"].clone()
    rejected[tied] = data["score_chosen"][tied]
    return dict(data, score_rejected=rejected)


@pytest.mark.parametrize("entry, ref", [(pv.odpo, ref_odpo), (pv.odpo_log_ratio, ref_odpo_ratio)])
@pytest.mark.parametrize("params", [{}, {"alpha": 0.0}])
def test_odpo_drops_tied_pairs_as_the_authors_data_does(batch, entry, ref, params):
    """rycolab/odpo preference_datasets.py::tldr_paired_responses skips pairs of equal reward, so the loss over a
    batch with ties is the loss over the same batch without them (log 0 never reaches the loss or its gradient,
    also at alpha=0, where 0 * log 0 would be nan)."""
    tied = [1, 4]
    data = with_ties(pick(entry, batch), tied)
    kept = [i for i in range(B) if i not in tied]
    got_in, want_in = leaf(data, "chosen_logps", "rejected_logps"), leaf(data, "chosen_logps", "rejected_logps")
    got = entry(**got_in, **params).mean()
    want = torch.stack([ref(want_in, i, **params) for i in kept]).mean()
    close(got, want)
    got.backward()
    want.backward()
    for name in ("chosen_logps", "rejected_logps"):
        close(got_in[name].grad, want_in[name].grad)
        assert torch.all(got_in[name].grad[tied] == 0)
    # A batch of ties only has nothing to learn from: loss 0, gradient 0, nothing nan.
    all_tied = leaf(with_ties(pick(entry, batch), list(range(B))), "chosen_logps")
    out = entry(**all_tied, **params)
    out.mean().backward()
    assert torch.all(out == 0) and torch.all(all_tied["chosen_logps"].grad == 0)


def test_odpo_rejects_pairs_scored_against_their_labels(batch):
    data = pick(pv.odpo, batch)
    for bad in (data["score_rejected"][2] - 0.1, float("nan")):
        chosen = data["score_chosen"].clone()
        chosen[2] = bad
        with pytest.raises(DataError, match="score_chosen below score_rejected"):
            pv.odpo(**dict(data, score_chosen=chosen))


def test_odpo_log_ratio_rejects_scores_that_are_not_positive(batch):
    data = pick(pv.odpo_log_ratio, batch)
    rejected = data["score_rejected"].clone()
    rejected[0] = 0.0  # the built-in tasks' verifier score of a wrong answer
    with pytest.raises(DataError, match="positive"):
        pv.odpo_log_ratio(**dict(data, score_rejected=rejected))


def test_r_dpo(batch):
    data = pick(pv.r_dpo, batch)
    check(pv.r_dpo, ref_r_dpo, data, alpha=0.01)
    check(pv.r_dpo, ref_r_dpo, data, beta=0.3, alpha=0.2)
    close(pv.r_dpo(**data, alpha=0.0), torch.stack([ref_dpo(batch, i) for i in range(B)]))
    # A longer chosen response is credited its length: same Δ, lower loss (no incentive to grow it).
    longer = dict(data, chosen_lengths=data["chosen_lengths"] + 20)
    assert (pv.r_dpo(**longer, alpha=0.05) < pv.r_dpo(**data, alpha=0.05)).all()
    with pytest.raises(TypeError):
        pv.r_dpo(**data)  # alpha has no paper default: it must be set


def test_h_dpo(batch):
    data = pick(pv.h_dpo, batch)
    check(pv.h_dpo, ref_h_dpo, data, alpha=0.9)
    close(pv.h_dpo(**data, alpha=1.0), torch.stack([ref_dpo(batch, i) for i in range(B)]))
    # α < 1 scales only the policy term: shifting the policy log-probs of both responses by c changes the
    # logit by β·α·c, which DPO (α = 1) would leave... at β·c; check the exact shift.
    shifted = dict(data, chosen_logps=data["chosen_logps"] + 10, rejected_logps=data["rejected_logps"] + 10)
    close(pv.h_dpo(**shifted, alpha=0.9), pv.h_dpo(**data, alpha=0.9))


def test_mappo(batch):
    data = pick(pv.mappo, batch)
    check(pv.mappo, ref_mappo, data)
    # Δr = 1 is DPO; Δr = 0 leaves the rejected response untouched.
    one = dict(data, score_chosen=torch.ones(B, dtype=torch.float64), score_rejected=torch.zeros(B, dtype=torch.float64))
    close(pv.mappo(**one), torch.stack([ref_dpo(batch, i) for i in range(B)]))
    zero = leaf(dict(data, score_chosen=data["score_rejected"]), "rejected_logps", "score_chosen")
    pv.mappo(**zero).sum().backward()
    assert torch.all(zero["rejected_logps"].grad == 0)
    assert zero["score_chosen"].grad is None or torch.all(zero["score_chosen"].grad == 0)


JUDGE_CHOSEN = [10.0, 8.0, 7.0, 9.0, 5.0, 6.0]  # 1-10 judge scores, as UltraFeedback's GPT-4 ratings
JUDGE_REJECTED = [1.0, 8.0, 3.0, 2.0, 4.0, 5.5]


def ref_mappo_rewards(b, i, r_w, r_l, beta=0.1):
    """Paper Eq. 8 with the [0, 1] rewards given explicitly."""
    return -logsig(beta * h(b, i, "chosen") - (r_w[i] - r_l[i]) * beta * h(b, i, "rejected"))


def test_mappo_score_scale_maps_judge_scores_onto_the_unit_interval(batch):
    judged = dict(pick(pv.mappo, batch), score_chosen=torch.tensor(JUDGE_CHOSEN, dtype=torch.float64),
                  score_rejected=torch.tensor(JUDGE_REJECTED, dtype=torch.float64))
    # [0, 10]: a 1-10 judge score divided by 10.
    r_w, r_l = [s / 10 for s in JUDGE_CHOSEN], [s / 10 for s in JUDGE_REJECTED]
    check(pv.mappo, lambda b, i, score_scale: ref_mappo_rewards(b, i, r_w, r_l), judged, score_scale=[0, 10])
    # [1, 10]: the scale's ends go to 0 and 1, so the (10, 1) pair is plain DPO.
    unit = pv.mappo(**judged, score_scale=[1, 10])
    close(unit[0], ref_dpo(batch, 0))
    # 'logistic': σ of unbounded reward-model scores (the paper's App. D.2.4).
    rm = dict(judged, score_chosen=judged["score_chosen"] - 6, score_rejected=judged["score_rejected"] - 6)
    s_w, s_l = [sig(torch.tensor(s - 6.0)) for s in JUDGE_CHOSEN], [sig(torch.tensor(s - 6.0)) for s in JUDGE_REJECTED]
    check(pv.mappo, lambda b, i, score_scale: ref_mappo_rewards(b, i, s_w, s_l), rm, score_scale="logistic")


def test_mappo_rejects_scores_off_the_unit_interval_and_bad_scales(batch):
    judged = dict(pick(pv.mappo, batch), score_chosen=torch.tensor(JUDGE_CHOSEN, dtype=torch.float64),
                  score_rejected=torch.tensor(JUDGE_REJECTED, dtype=torch.float64))
    with pytest.raises(DataError, match=r"\[0, 1\] after score_scale=\(0.0, 1.0\).*score_scale"):
        pv.mappo(**judged)  # raw 1-10 scores: a reward gap of up to 9
    for bad in ([10, 0], [5], "sigmoid", None):
        with pytest.raises(RecipeError, match="score_scale must be two numbers lo < hi"):
            pv.mappo(**judged, score_scale=bad)
    swapped = dict(judged, score_chosen=judged["score_rejected"], score_rejected=judged["score_chosen"])
    with pytest.raises(DataError, match="score_chosen below score_rejected"):
        pv.mappo(**swapped, score_scale=[0, 10])


def test_dr_dpo(batch):
    data = pick(pv.dr_dpo, batch)
    for params in ({}, {"beta_prime": 0.3, "beta": 0.5}):
        got = pv.dr_dpo(**data, **params)
        assert got.shape == (B,) and torch.all(got == got[0])
        close(got.mean(), ref_dr_dpo_batch(batch, **params))
        a, b = leaf(data, "chosen_logps", "rejected_logps"), leaf(batch, "chosen_logps", "rejected_logps")
        pv.dr_dpo(**a, **params).mean().backward()
        ref_dr_dpo_batch(b, **params).backward()
        for n in ("chosen_logps", "rejected_logps"):
            close(a[n].grad, b[n].grad)
    # β′ → ∞ is the mean DPO loss; small β′ sits below it (soft minimum).
    dpo_mean = torch.stack([ref_dpo(batch, i) for i in range(B)]).mean()
    close(pv.dr_dpo(**data, beta_prime=1e3).mean(), dpo_mean, tol=1e-2)
    assert pv.dr_dpo(**data, beta_prime=0.05).mean() < dpo_mean - 1e-3


def ref_beta_dpo(b, mask, ema_mean, beta=0.1, alpha=0.6):
    """Batch loss: β_b from the selected margins' mean, DPO averaged over the selected pairs."""
    margins = [h(b, i, "chosen") - h(b, i, "rejected") for i in range(B)]
    kept = [i for i in range(B) if mask[i] > 0]
    sel_mean = sum(float(margins[i].detach()) for i in kept) / len(kept)
    beta_b = max(beta * (1 + alpha * (sel_mean - ema_mean)), 1e-3)
    return sum(-logsig(beta_b * margins[i]) for i in kept) / len(kept)


def test_beta_dpo(batch):
    data = pick(pv.beta_dpo, batch)
    data["margin_ema_mean"], data["margin_ema_std"] = torch.tensor(-1.5), torch.tensor(8.0)
    mask = torch.tensor([1, 0, 1, 1, 0, 1.0])
    for m in (None, mask):
        got = pv.beta_dpo(**data, selection_mask=m)
        mm = torch.ones(B) if m is None else m
        close(got.mean(), ref_beta_dpo(batch, mm, -1.5))
        # β_b is detached: the gradient is DPO's at the fixed β_b, and dropped pairs get none.
        a, b = leaf(data, "chosen_logps", "rejected_logps"), leaf(batch, "chosen_logps", "rejected_logps")
        pv.beta_dpo(**a, selection_mask=m).mean().backward()
        ref_beta_dpo(b, mm, -1.5).backward()
        close(a["chosen_logps"].grad, b["chosen_logps"].grad)
        if m is not None:
            assert torch.all(a["rejected_logps"].grad[m == 0] == 0) and torch.all(got[m == 0] == 0)
    # alpha=0 is DPO with β0; a huge negative batch shift clamps β_b at 1e-3.
    close(pv.beta_dpo(**data, alpha=0.0), torch.stack([ref_dpo(batch, i) for i in range(B)]))
    far = dict(data, margin_ema_mean=torch.tensor(1e6))
    margins = torch.stack([h(batch, i, "chosen") - h(batch, i, "rejected") for i in range(B)])
    close(pv.beta_dpo(**far), -torch.stack([logsig(1e-3 * x) for x in margins]))


def test_modpo(batch):
    data = pick(pv.modpo, batch)
    check(pv.modpo, ref_modpo, data)
    # Two margin objectives, shape (B, 2).
    g = torch.Generator().manual_seed(3)
    two = dict(data, score_chosen=torch.rand(B, 2, generator=g, dtype=torch.float64),
               score_rejected=torch.rand(B, 2, generator=g, dtype=torch.float64))
    check(pv.modpo, ref_modpo, two, w=(0.4, 0.35, 0.25))
    # w_0 = 1 with equal margin rewards is DPO.
    same = dict(data, score_rejected=data["score_chosen"])
    close(pv.modpo(**same, w=(1.0, 0.0)), torch.stack([ref_dpo(batch, i) for i in range(B)]))
    with pytest.raises(ValueError):
        pv.modpo(**two, w=(0.5, 0.5))


def test_inpo(batch):
    g = torch.Generator().manual_seed(5)
    batch = dict(batch, prev_chosen_logps=-60 + 55 * torch.rand(B, generator=g, dtype=torch.float64),
                 prev_rejected_logps=-60 + 55 * torch.rand(B, generator=g, dtype=torch.float64))
    data = pick(pv.inpo, batch)
    check(pv.inpo, ref_inpo, data)
    check(pv.inpo, ref_inpo, data, eta=0.05, tau=0.01)
    # τ = η: the previous iterate drops out and INPO is IPO against π_ref with τ_IPO = η.
    no_prev = dict(data, prev_chosen_logps=torch.zeros(B, dtype=torch.float64),
                   prev_rejected_logps=torch.full((B,), 50.0, dtype=torch.float64))
    ipo = torch.stack([((h(batch, i, "chosen") - h(batch, i, "rejected")) - 1 / (2 * 0.01)) ** 2 for i in range(B)])
    close(pv.inpo(**no_prev, eta=0.01, tau=0.01), ipo)


def test_rebel(batch):
    data = pick(pv.rebel, batch)
    check(pv.rebel, ref_rebel, data, tol=1e-4)
    check(pv.rebel, ref_rebel, data, eta=0.1, tol=1e-4)
    # The pair is unordered: swapping the two responses (and their rewards) changes nothing.
    swapped = {k.replace("chosen", "TMP").replace("rejected", "chosen").replace("TMP", "rejected"): v
               for k, v in data.items()}
    close(pv.rebel(**swapped), pv.rebel(**data))


@pytest.mark.parametrize("distance", ["sq", "bwd_kl", "fwd_kl"])
def test_reward_aware_po(batch, distance):
    data = pick(pv.reward_aware_po, batch)
    data = dict(data, score_chosen=data["score_chosen"] * 3, score_rejected=data["score_rejected"] * 3)
    check(pv.reward_aware_po, ref_rpo, data, distance=distance, tol=1e-4)
    check(pv.reward_aware_po, ref_rpo, data, distance=distance, beta=0.05, eta=2.0, tol=1e-4)
    # Zero loss and zero gradient where the implicit gap matches the target gap.
    matched = dict(data, score_chosen=torch.stack([0.2 * (h(data, i, "chosen") - h(data, i, "rejected"))
                                                   for i in range(B)]).detach(),
                   score_rejected=torch.zeros(B, dtype=torch.float64))
    x = leaf(matched, "chosen_logps")
    loss = pv.reward_aware_po(**x, distance=distance)
    loss.sum().backward()
    close(loss, torch.zeros(B), tol=1e-5)
    close(x["chosen_logps"].grad, torch.zeros(B), tol=1e-5)


def test_reward_aware_po_rejects_unknown_distance(batch):
    with pytest.raises(ValueError):
        pv.reward_aware_po(**pick(pv.reward_aware_po, batch), distance="l1")


def test_implicit_prm_ce():
    g = torch.Generator().manual_seed(7)
    b = {"logps": -60 + 55 * torch.rand(B, generator=g, dtype=torch.float64),
         "ref_logps": -60 + 55 * torch.rand(B, generator=g, dtype=torch.float64),
         "labels": torch.tensor([1, 0, 1, 0, 0.7, 1.0], dtype=torch.float64)}
    check(pv.implicit_prm_ce, ref_implicit_prm, b, grad_names=("logps",))
    check(pv.implicit_prm_ce, ref_implicit_prm, b, grad_names=("logps",), beta=0.5)
    # Positive label: lowering the log-ratio raises the loss.
    lower = dict(b, logps=b["logps"] - 10)
    assert pv.implicit_prm_ce(**lower)[0] > pv.implicit_prm_ce(**b)[0]
    assert pv.implicit_prm_ce(**lower)[1] < pv.implicit_prm_ce(**b)[1]


# ---------------------------------------------------------------- length-normalized / batch-margin entries

def ref_omni(b, i, beta=10.0, eta=0.7, tau_ref=0.8, gamma=3.0, lam=1e-3, tau_good=3.2):
    lw, ll = float(b["chosen_lengths"][i]), float(b["rejected_lengths"][i])
    pw, pl = b["chosen_logps"][i] / lw, b["rejected_logps"][i] / ll
    rw, rl = b["ref_chosen_logps"][i] / lw, b["ref_rejected_logps"][i] / ll
    s_w, s_l = float(b["score_chosen"][i]), float(b["score_rejected"][i])
    w_qual = 1 / (1 + math.exp(-eta * (s_w - s_l)))
    w_perf = (1 - sig(beta * (pw - pl) - tau_ref)) ** gamma
    loss = -w_qual * w_perf * logsig(beta * ((pw - rw) - (pl - rl)))
    if s_w >= tau_good and float(rw.detach()) > float(pw.detach()):
        loss = loss - lam * pw
    return loss


def test_omni_dpo(batch):
    b = dict(batch, score_chosen=torch.tensor([4.0, 2.0, 5.0, 3.2, 1.0, 4.5], dtype=torch.float64),
             score_rejected=torch.tensor([1.0, 1.5, 4.0, 2.0, 0.5, 1.0], dtype=torch.float64))
    # Chosen below the reference for some rows so the calibrated NLL term is active on them.
    b["ref_chosen_logps"] = b["chosen_logps"] + torch.tensor([5.0, 5.0, -5.0, 3.0, 1.0, -2.0], dtype=torch.float64)
    data = pick(pv.omni_dpo, b)
    check(pv.omni_dpo, ref_omni, data)
    check(pv.omni_dpo, ref_omni, data, beta=2.0, eta=0.1, gamma=1.0, lam=0.01, tau_good=3.0)
    # η = γ = λ = 0: half the length-normalized DPO loss.
    plain = pv.omni_dpo(**data, eta=0.0, gamma=0.0, lam=0.0, beta=2.0)
    ln_dpo = torch.stack([-logsig(2.0 * ((b["chosen_logps"][i] - b["ref_chosen_logps"][i]) / b["chosen_lengths"][i]
                                         - (b["rejected_logps"][i] - b["ref_rejected_logps"][i])
                                         / b["rejected_lengths"][i])) for i in range(B)])
    close(plain, 0.5 * ln_dpo)
    # The NLL term acts only on rows with a good judge score and the policy below the reference.
    with_nll = pv.omni_dpo(**data, lam=1.0) - pv.omni_dpo(**data, lam=0.0)
    active = torch.tensor([True, False, False, True, False, False])
    assert torch.all(with_nll[~active] == 0) and torch.all(with_nll[active] > 0)


def ref_gamma_margins(gaps, gamma0, tau):
    """The authors' exponentiated-gradient loop, per element in plain Python floats."""
    n = len(gaps)
    p = [1.0 / n] * n
    lr = min(0.5 / tau, 1.0)
    margins = None
    for _ in range(20):
        margins = [gamma0 * n * q for q in p]
        grad = [tau * (1 + math.log(n * (q + 1e-10))) + gamma0 * n / (1 + math.exp(g - m)) / n
                for q, g, m in zip(p, gaps, margins)]
        z = sum(q * math.exp(-lr * d) for q, d in zip(p, grad))
        p = [q * math.exp(-lr * d) / z for q, d in zip(p, grad)]
    return margins


def ref_gamma_po(b, beta=10.0, gamma=4.0, tau=10.0, queue=()):
    gaps = [beta * (b["chosen_logps"][i] / b["chosen_lengths"][i] - b["rejected_logps"][i] / b["rejected_lengths"][i])
            for i in range(B)]
    margins = ref_gamma_margins(list(queue) + [float(g.detach()) for g in gaps], gamma, tau)[len(queue):]
    return torch.stack([-logsig(g - m) for g, m in zip(gaps, margins)])


def test_gamma_po(batch):
    # Average log-probs near the ones SimPO sees (gaps of a few units at β=10).
    b = dict(batch, chosen_logps=batch["chosen_logps"] / 20, rejected_logps=batch["rejected_logps"] / 20)
    data = pick(pv.gamma_po, b)
    assert not any(n.startswith("ref_") for n in inspect.signature(pv.gamma_po).parameters)  # reference-free
    for params, queue in (({}, ()), ({"tau": 3.0, "gamma": 3.0}, (0.5, -1.0, 2.0, 4.0))):
        q = torch.tensor(queue, dtype=torch.float64) if queue else None
        close(pv.gamma_po(**data, queue_gaps=q, **params), ref_gamma_po(b, queue=queue, **params), tol=1e-4)
        a, r = leaf(data, "chosen_logps", "rejected_logps"), leaf(b, "chosen_logps", "rejected_logps")
        pv.gamma_po(**a, queue_gaps=q, **params).mean().backward()
        ref_gamma_po(r, queue=queue, **params).mean().backward()  # margins are floats: detached
        for n in ("chosen_logps", "rejected_logps"):
            close(a[n].grad, r[n].grad, tol=1e-4)
    # Margins: they sum to γ0·N, larger gaps get larger margins; with a huge τ they are uniform (SimPO).
    gaps = torch.tensor([-1.0, 0.0, 2.0, 5.0])
    margins = pv._gamma_po_margins(gaps, 4.0, 10.0)
    assert margins.argsort().tolist() == [0, 1, 2, 3]
    simpo = torch.stack([-logsig(10 * (b["chosen_logps"][i] / b["chosen_lengths"][i]
                                       - b["rejected_logps"][i] / b["rejected_lengths"][i]) - 4.0) for i in range(B)])
    close(pv.gamma_po(**data, tau=1e6), simpo, tol=1e-4)
    # The queue changes the solution.
    assert not torch.allclose(pv.gamma_po(**data), pv.gamma_po(**data, queue_gaps=torch.tensor([9.0, 9.0, -9.0])))


def test_gamma_po_margin_total():
    gaps = torch.tensor([-1.0, 0.0, 2.0, 5.0, 0.3])
    m = ref_gamma_margins(gaps.tolist(), 4.0, 10.0)
    # The returned margins come from the normalized iterate before the last step: Σγ = γ0·N.
    assert math.isclose(sum(m), 4.0 * 5, rel_tol=1e-9)
    close(pv._gamma_po_margins(gaps.double(), 4.0, 10.0), torch.tensor(m))
    # With a small τ (step size 1) the iterates still move: the margins are the last iterate but one.
    close(pv._gamma_po_margins(gaps.double(), 4.0, 0.5), torch.tensor(ref_gamma_margins(gaps.tolist(), 4.0, 0.5)))


# ---------------------------------------------------------------- token- and turn-level entries

@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    T = 7
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(B, T, generator=g, dtype=torch.float64)
    lengths_w, lengths_l = [7, 3, 5, 1, 6, 4], [2, 7, 4, 6, 0, 5]  # one empty rejected completion
    mask = lambda ls: torch.tensor([[1.0] * n + [0.0] * (T - n) for n in ls], dtype=torch.float64)
    d = {"chosen_token_logps": u(-8, -0.05), "rejected_token_logps": u(-8, -0.05),
         "ref_chosen_token_logps": u(-8, -0.05), "ref_rejected_token_logps": u(-8, -0.05),
         "chosen_token_rewards": u(-2, 2), "rejected_token_rewards": u(-2, 2),
         "chosen_token_risk_ratios": u(0, 0.5), "rejected_token_risk_ratios": u(0, 0.5),
         "chosen_mask": mask(lengths_w), "rejected_mask": mask(lengths_l)}
    return d


def poison(d, value):
    """Garbage in every padded position of the per-token inputs."""
    out = dict(d)
    for k, v in d.items():
        if "token" in k:
            side = "chosen" if "chosen" in k else "rejected"
            out[k] = torch.where(d[f"{side}_mask"] > 0, v, torch.full_like(v, value))
    return out


def ref_tgdpo(d, i, beta=0.1, alpha=0.5):
    total = 0
    for side, sign in (("chosen", 1), ("rejected", -1)):
        s = 0
        for t in range(d[f"{side}_mask"].shape[1]):
            if d[f"{side}_mask"][i, t] > 0:
                h_t = d[f"{side}_token_logps"][i, t] - d[f"ref_{side}_token_logps"][i, t]
                s = s + beta * (1 + sign * alpha * beta * float(d[f"{side}_token_rewards"][i, t])) * h_t
        total = total + sign * s
    return -logsig(total)


def test_tgdpo(tokens):
    data = pick(pv.tgdpo, tokens)
    names = ("chosen_token_logps", "rejected_token_logps")
    check(pv.tgdpo, ref_tgdpo, data, grad_names=names)
    check(pv.tgdpo, ref_tgdpo, data, grad_names=names, beta=0.5, alpha=2.0)
    # Padding holding nan / huge values changes nothing, values or gradients.
    for bad in (float("nan"), 1e4):
        close(pv.tgdpo(**poison(data, bad)), pv.tgdpo(**data))
        x = leaf(poison(data, bad), *names)
        pv.tgdpo(**x).sum().backward()
        pad = data["chosen_mask"] == 0
        assert torch.isfinite(x["chosen_token_logps"].grad).all() and torch.all(x["chosen_token_logps"].grad[pad] == 0)
    # alpha=0 is DPO on the summed token log-ratios; the token rewards are detached.
    def seq(side, i):
        m = data[f"{side}_mask"][i] > 0
        return (data[f"{side}_token_logps"][i][m] - data[f"ref_{side}_token_logps"][i][m]).sum()
    dpo = torch.stack([-logsig(0.1 * (seq("chosen", i) - seq("rejected", i))) for i in range(B)])
    close(pv.tgdpo(**data, alpha=0.0), dpo)
    x = leaf(data, "chosen_token_rewards", "chosen_token_logps")
    pv.tgdpo(**x).sum().backward()
    assert x["chosen_token_rewards"].grad is None


def ref_ra_dpo(d, i, beta=0.1, alpha=0.5, ra_dpo2=False):
    def seq(side, what):
        return sum(d[f"{side}_token_{what}"][i, t] for t in range(d[f"{side}_mask"].shape[1])
                   if d[f"{side}_mask"][i, t] > 0)
    delta = (d["chosen_logps"][i] - d["ref_chosen_logps"][i]) - (d["rejected_logps"][i] - d["ref_rejected_logps"][i])
    r_w, r_l = seq("chosen", "risk_ratios"), seq("rejected", "risk_ratios")
    risk = alpha * (r_l - float(r_w)) if ra_dpo2 else r_l - r_w
    return -logsig(beta * (delta - risk))


def test_ra_dpo(batch, tokens):
    data = {**pick(pv.ra_dpo, batch), **pick(pv.ra_dpo, tokens)}
    names = ("chosen_logps", "rejected_logps", "chosen_token_risk_ratios")
    check(pv.ra_dpo, ref_ra_dpo, data, grad_names=names)
    check(pv.ra_dpo, ref_ra_dpo, data, grad_names=names[:2], ra_dpo2=True, alpha=0.7)
    close(pv.ra_dpo(**poison(data, float("nan"))), pv.ra_dpo(**data))
    # Zero risk is DPO; Ra-DPO2 stops the gradient through the chosen risk.
    zero = dict(data, chosen_token_risk_ratios=torch.zeros(B, 7), rejected_token_risk_ratios=torch.zeros(B, 7))
    close(pv.ra_dpo(**zero), torch.stack([ref_dpo(batch, i) for i in range(B)]))
    x = leaf(data, "chosen_token_risk_ratios", "chosen_logps")
    pv.ra_dpo(**x, ra_dpo2=True).sum().backward()
    assert x["chosen_token_risk_ratios"].grad is None or torch.all(x["chosen_token_risk_ratios"].grad == 0)


@pytest.fixture
def turns():
    g = torch.Generator().manual_seed(2)
    J = 4
    u = lambda: -30 + 28 * torch.rand(B, J, generator=g, dtype=torch.float64)
    mask = lambda ls: torch.tensor([[1.0] * n + [0.0] * (J - n) for n in ls], dtype=torch.float64)
    return {"chosen_turn_logps": u(), "rejected_turn_logps": u(), "ref_chosen_turn_logps": u(),
            "ref_rejected_turn_logps": u(), "chosen_turn_mask": mask([4, 1, 3, 2, 4, 1]),
            "rejected_turn_mask": mask([2, 3, 4, 1, 4, 1])}


def ref_dmpo(d, i, beta=0.1, gamma=0.7):
    total = 0
    for side, sign in (("chosen", 1), ("rejected", -1)):
        T = int(d[f"{side}_turn_mask"][i].sum())
        for j in range(T):
            a = (T - j) / T if gamma == 1 else gamma ** j * (1 - gamma ** (T - j)) / (1 - gamma ** T)
            total = total + sign * a * (d[f"{side}_turn_logps"][i, j] - d[f"ref_{side}_turn_logps"][i, j])
    return -logsig(beta * total)


def test_dmpo(turns):
    names = ("chosen_turn_logps", "rejected_turn_logps")
    check(pv.dmpo, ref_dmpo, turns, grad_names=names)
    check(pv.dmpo, ref_dmpo, turns, grad_names=names, gamma=1.0, beta=0.5)
    check(pv.dmpo, ref_dmpo, turns, grad_names=names, gamma=0.3)
    # Padding turns hold garbage without effect.
    bad = dict(turns)
    for k in ("chosen_turn_logps", "ref_rejected_turn_logps"):
        side = "chosen" if "chosen" in k else "rejected"
        bad[k] = torch.where(turns[f"{side}_turn_mask"] > 0, turns[k], torch.full_like(turns[k], float("nan")))
    close(pv.dmpo(**bad), pv.dmpo(**turns))
    # One turn each: weight 1, plain DPO on that turn; earlier turns weigh more than later ones.
    i = 5
    dpo = -logsig(0.1 * ((turns["chosen_turn_logps"][i, 0] - turns["ref_chosen_turn_logps"][i, 0])
                         - (turns["rejected_turn_logps"][i, 0] - turns["ref_rejected_turn_logps"][i, 0])))
    close(pv.dmpo(**turns)[i], dpo)
    w = pv._dmpo_turn_weights(torch.ones(1, 4), 0.7)[0]
    assert torch.all(w[:-1] > w[1:])


# ---------------------------------------------------------------- registry, dtypes

NAMES = ["odpo", "odpo_log_ratio", "r_dpo", "h_dpo", "mappo", "tgdpo", "omni_dpo", "gamma_po", "dr_dpo",
         "beta_dpo", "ra_dpo", "modpo", "inpo", "rebel", "reward_aware_po", "dmpo", "sdpo_segment",
         "implicit_prm_ce"]


def test_registered_with_metadata():
    for name in NAMES:
        v = PREFERENCE.get(name)
        assert v.arxiv and v.paper and v.notes and v.description
        assert "lambda_" not in v.params


def full_batch(batch, tokens, turns):
    g = torch.Generator().manual_seed(9)
    extra = {"prev_chosen_logps": batch["chosen_logps"] + 1, "prev_rejected_logps": batch["rejected_logps"] - 1,
             "margin_ema_mean": torch.tensor(0.5), "margin_ema_std": torch.tensor(3.0),
             "logps": batch["chosen_logps"], "ref_logps": batch["ref_chosen_logps"],
             "labels": (torch.rand(B, generator=g) > 0.5).double()}
    return {**batch, **tokens, **turns, **extra}


REQUIRED = {"r_dpo": {"alpha": 0.01}, "h_dpo": {"alpha": 0.9}}


@pytest.mark.parametrize("name", NAMES)
def test_through_registry_and_bfloat16(name, batch, tokens, turns):
    data = full_batch(batch, tokens, turns)
    params = REQUIRED.get(name, {})
    out = preference_loss(name, **data, **params)
    assert out.shape == (B,) and torch.isfinite(out).all()
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in data.items()}
    low = preference_loss(name, **bf16, **params)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    rounded = {k: v.to(torch.bfloat16).double() if v.is_floating_point() else v for k, v in data.items()}
    torch.testing.assert_close(low, preference_loss(name, **rounded, **params).float(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- MRPO (two references)

def ref_mrpo(b, i, references=("hermes",), beta=0.1, epsilon=0.1, adaptive_epsilon=True, alpha=None):
    """MRPO for pair i, written from the authors' trainer_mref.py in the harmonic form 1/π̃ = α/π_main + (1−α)/π_c
    (probabilities, not log-sum-exp), with the clipping written as a clamp."""
    main = {s: b[f"ref_{s}_logps"][i] for s in ("chosen", "rejected")}
    extra = {s: b[f"extra_ref_{s}_logps"][i, 0] for s in ("chosen", "rejected")}
    if alpha is None:
        a_extra = abs(extra["chosen"] - extra["rejected"])
        a_main = abs(main["chosen"] - main["rejected"])
        alpha = a_extra / (a_extra + a_main + 1e-6)
    if adaptive_epsilon:
        bw = abs((main["chosen"] + extra["chosen"]) / 2)
        bl = abs((main["rejected"] + extra["rejected"]) / 2)
        eps = {"chosen": epsilon * bw / (bw + bl), "rejected": epsilon * bl / (bw + bl)}
    else:
        eps = {"chosen": epsilon, "rejected": epsilon}
    combined = {}
    for s in ("chosen", "rejected"):
        lo, hi = main[s] * (1 + eps[s]), main[s] * (1 - eps[s])  # log-probs are negative: (1+ε)ℓ <= (1−ε)ℓ
        clipped = torch.clamp(extra[s], min=lo, max=hi)
        combined[s] = -torch.log(alpha / torch.exp(main[s]) + (1 - alpha) / torch.exp(clipped))
    z = beta * ((b["chosen_logps"][i] - combined["chosen"]) - (b["rejected_logps"][i] - combined["rejected"]))
    return -logsig(z)


@pytest.fixture
def mrpo_batch():
    """Log-probs small enough that exp() of them is exact in float64 (the reference works with probabilities)."""
    g = torch.Generator().manual_seed(11)
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(*(shape or (B,)), generator=g, dtype=torch.float64)
    return {"chosen_logps": u(-30, -3), "rejected_logps": u(-30, -3),
            "ref_chosen_logps": u(-30, -3), "ref_rejected_logps": u(-30, -3),
            "extra_ref_chosen_logps": u(-30, -3, B, 1), "extra_ref_rejected_logps": u(-30, -3, B, 1)}


def test_mrpo(mrpo_batch):
    data = mrpo_batch
    refs = {"references": ["hermes"]}
    check(pv.mrpo, ref_mrpo, data, **refs)
    check(pv.mrpo, ref_mrpo, data, **refs, alpha=0.3, epsilon=0.5, adaptive_epsilon=False, beta=0.5)
    check(pv.mrpo, ref_mrpo, data, **refs, epsilon=2.0)  # ε > 1: the lower clip bound is positive, as in the code
    # α = 1: DPO against the main reference, whatever the further one says.
    dpo = torch.stack([ref_dpo(data, i) for i in range(B)])
    close(pv.mrpo(**data, **refs, alpha=1.0), dpo)
    # A further reference equal to the main one changes nothing (the harmonic mean of equal values).
    same = dict(data, extra_ref_chosen_logps=data["ref_chosen_logps"][:, None],
                extra_ref_rejected_logps=data["ref_rejected_logps"][:, None])
    close(pv.mrpo(**same, **refs), dpo)
    close(pv.mrpo(**same, **refs, alpha=0.2, adaptive_epsilon=False), dpo)
    # Clipping bounds the combined reference: α = 0 uses the further reference alone, and one far from the main
    # reference counts as the main one moved by ε: log π̃ = (1 ∓ ε)ℓ_main.
    far = dict(data, extra_ref_chosen_logps=data["ref_chosen_logps"][:, None] * 10,
               extra_ref_rejected_logps=torch.zeros(B, 1, dtype=torch.float64))
    eps = 0.1
    bounded = dict(data, ref_chosen_logps=data["ref_chosen_logps"] * (1 + eps),
                   ref_rejected_logps=data["ref_rejected_logps"] * (1 - eps))
    close(pv.mrpo(**far, **refs, alpha=0.0, epsilon=eps, adaptive_epsilon=False),
          torch.stack([ref_dpo(bounded, i) for i in range(B)]))


def test_mrpo_refuses_what_its_closed_form_does_not_cover(mrpo_batch):
    two = dict(mrpo_batch, extra_ref_chosen_logps=mrpo_batch["extra_ref_chosen_logps"].repeat(1, 2),
               extra_ref_rejected_logps=mrpo_batch["extra_ref_rejected_logps"].repeat(1, 2))
    with pytest.raises(RecipeError, match="exactly one"):
        pv.mrpo(**two, references=["a", "b"])
    with pytest.raises(ValueError, match="names 2 model"):
        pv.mrpo(**mrpo_batch, references=["a", "b"])
    with pytest.raises(RecipeError, match=r"alpha must be in \[0, 1\]"):
        pv.mrpo(**mrpo_batch, references=["a"], alpha=1.5)
    v = PREFERENCE.get("mrpo")
    assert v.arxiv == "2405.16388" and "trainer_mref.py" in v.notes
    assert v.params == {"references": None, "beta": 0.1, "epsilon": 0.1, "adaptive_epsilon": True, "alpha": None}
