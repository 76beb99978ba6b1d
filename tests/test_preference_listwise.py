"""List-wise and batch-coupled preference losses against loop references written from the papers' formulas."""

import math

import pytest
import torch

from postrain.preference import preference_loss

B, K = 4, 5
LIST_NAMES = ["lipo_lambda", "plackett_luce_dpo", "exo_k"]


def lists(seed=0, ragged=False, garbage=float("nan")):
    g = torch.Generator().manual_seed(seed)
    data = {
        "list_logps": -5 - 55 * torch.rand(B, K, generator=g, dtype=torch.float64),
        "list_ref_logps": -5 - 55 * torch.rand(B, K, generator=g, dtype=torch.float64),
        "list_scores": torch.rand(B, K, generator=g, dtype=torch.float64),
        "list_mask": torch.ones(B, K),
    }
    if ragged:
        data["list_mask"] = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 1, 1, 0, 0], [1, 1, 0, 0, 0]],
                                         dtype=torch.float32)
        off = data["list_mask"] == 0
        for k in ("list_logps", "list_ref_logps", "list_scores"):
            data[k] = data[k].masked_fill(off, garbage)
    return data


def valid_rows(data):
    """Per prompt: lists of (logp, ref_logp, score) of the valid slots only, in slot order."""
    out = []
    for b in range(B):
        keep = [k for k in range(K) if data["list_mask"][b, k] > 0]
        out.append([(float(data["list_logps"][b, k]), float(data["list_ref_logps"][b, k]),
                     float(data["list_scores"][b, k])) for k in keep])
    return out


# --- references --------------------------------------------------------------------------------------------

def ref_lipo(items, beta=0.05):
    s = [beta * (l - r) for l, r, _ in items]
    by_model = sorted(range(len(items)), key=lambda i: -s[i])
    rank = {i: pos + 1 for pos, i in enumerate(by_model)}
    total = 0.0
    for i in range(len(items)):
        for j in range(len(items)):
            if items[i][2] > items[j][2]:
                gain = abs((2 ** items[i][2] - 1) - (2 ** items[j][2] - 1))
                disc = abs(1 / math.log(1 + rank[i]) - 1 / math.log(1 + rank[j]))
                total += gain * disc * math.log(1 + math.exp(-(s[i] - s[j])))
    return total


def ref_pl(items, beta=0.1):
    ranked = sorted(items, key=lambda t: -t[2])
    z = [beta * (l - r) for l, r, _ in ranked]
    return -sum(z[k] - math.log(sum(math.exp(v) for v in z[k:])) for k in range(len(z)))


def ref_exo(items, beta=0.5, beta_r=0.5):
    a = [beta * (l - r) for l, r, _ in items]
    c = [s / beta_r for _, _, s in items]
    za, zc = sum(math.exp(x) for x in a), sum(math.exp(x) for x in c)
    p = [math.exp(x) / za for x in a]
    q = [math.exp(x) / zc for x in c]
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


REFS = {"lipo_lambda": ref_lipo, "plackett_luce_dpo": ref_pl, "exo_k": ref_exo}


def reference(name, data, **params):
    return torch.tensor([REFS[name](items, **params) for items in valid_rows(data)], dtype=torch.float32)


@pytest.mark.parametrize("name", LIST_NAMES)
@pytest.mark.parametrize("ragged", [False, True])
def test_list_values_match_reference(name, ragged):
    data = lists(seed=1, ragged=ragged)
    out = preference_loss(name, **data)
    assert out.shape == (B,) and torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(name, data), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,params", [("lipo_lambda", {"beta": 0.5}), ("plackett_luce_dpo", {"beta": 0.05}),
                                         ("exo_k", {"beta": 0.1, "beta_r": 0.2})])
def test_list_non_default_hyperparameters(name, params):
    data = lists(seed=2, ragged=True)
    torch.testing.assert_close(preference_loss(name, **data, **params), reference(name, data, **params),
                               rtol=1e-5, atol=1e-6)


def torch_ref(name, logps, data):
    """Loop-form torch reference (differentiable) over the valid slots."""
    out = []
    for b in range(B):
        keep = [k for k in range(K) if data["list_mask"][b, k] > 0]
        h = [logps[b, k] - data["list_ref_logps"][b, k] for k in keep]
        sc = [float(data["list_scores"][b, k]) for k in keep]
        if name == "lipo_lambda":
            s = [0.05 * x for x in h]
            order = sorted(range(len(s)), key=lambda i: -float(s[i].detach()))
            rank = {i: p + 1 for p, i in enumerate(order)}
            terms = [abs(2 ** sc[i] - 2 ** sc[j]) * abs(1 / math.log(1 + rank[i]) - 1 / math.log(1 + rank[j]))
                     * torch.nn.functional.softplus(-(s[i] - s[j]))
                     for i in range(len(s)) for j in range(len(s)) if sc[i] > sc[j]]
            out.append(torch.stack(terms).sum() if terms else logps.sum() * 0)
        elif name == "plackett_luce_dpo":
            z = [0.1 * h[i] for i in sorted(range(len(h)), key=lambda i: -sc[i])]
            out.append(-sum(z[k] - torch.logsumexp(torch.stack(z[k:]), 0) for k in range(len(z))))
        else:
            a = torch.stack([0.5 * x for x in h])
            p = torch.softmax(a, 0)
            q = torch.softmax(torch.tensor(sc, dtype=a.dtype) / 0.5, 0)
            out.append((p * (p.log() - q.log())).sum())
    return torch.stack(out)


@pytest.mark.parametrize("name", LIST_NAMES)
def test_list_gradients_match_reference_and_masked_slots_get_none(name):
    data = lists(seed=3, ragged=True, garbage=1e4)
    data["list_logps"].requires_grad_(True)
    preference_loss(name, **data).sum().backward()
    got = data["list_logps"].grad
    assert torch.isfinite(got).all()
    assert (got[data["list_mask"] == 0] == 0).all()
    logps = data["list_logps"].detach().clone().requires_grad_(True)
    torch_ref(name, logps, data).sum().backward()
    torch.testing.assert_close(got, logps.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", LIST_NAMES)
def test_masked_slots_do_not_change_the_loss(name):
    a = lists(seed=4, ragged=True, garbage=float("nan"))
    b = lists(seed=4, ragged=True, garbage=-1e4)
    torch.testing.assert_close(preference_loss(name, **a), preference_loss(name, **b))


def test_plackett_luce_with_two_responses_is_dpo():
    data = lists(seed=5)
    two = {k: v[:, :2] for k, v in data.items()}
    better = two["list_scores"][:, 0] > two["list_scores"][:, 1]
    h = two["list_logps"] - two["list_ref_logps"]
    margin = torch.where(better, h[:, 0] - h[:, 1], h[:, 1] - h[:, 0])
    torch.testing.assert_close(preference_loss("plackett_luce_dpo", **two, beta=0.1),
                               -torch.nn.functional.logsigmoid(0.1 * margin).float())


def test_exo_k_is_zero_when_policy_matches_reward_distribution():
    # softmax(β h) = softmax(r/β_r) when β h = r/β_r + const: the KL vanishes (and so does its gradient).
    data = lists(seed=6)
    data["list_logps"] = (data["list_ref_logps"] + (data["list_scores"] / 0.5) / 0.5 + 3.0).requires_grad_(True)
    out = preference_loss("exo_k", **data)
    out.sum().backward()
    torch.testing.assert_close(out, torch.zeros(B), atol=1e-6, rtol=0)
    torch.testing.assert_close(data["list_logps"].grad, torch.zeros(B, K, dtype=torch.float64), atol=1e-6, rtol=0)


def test_lipo_lambda_weights_use_model_ranks():
    # Two lists with the same labels and the same pairwise score gaps but permuted model ranks get different
    # Lambda weights; a list the model already ranks perfectly with huge gaps has ~zero loss.
    data = {"list_logps": torch.tensor([[-10.0, -600.0, -1200.0]]), "list_ref_logps": torch.zeros(1, 3),
            "list_scores": torch.tensor([[1.0, 0.5, 0.0]])}
    assert preference_loss("lipo_lambda", **data).item() < 1e-6
    data["list_logps"] = torch.tensor([[-1200.0, -600.0, -10.0]])
    assert preference_loss("lipo_lambda", **data).item() > 10


def test_list_bfloat16_inputs():
    data = lists(seed=7, ragged=True, garbage=0.0)
    low = {k: v.to(torch.bfloat16) for k, v in data.items()}
    for name in LIST_NAMES:
        out = preference_loss(name, **low)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, preference_loss(name, **{k: v.double() for k, v in low.items()}))


# --- relative_po ---------------------------------------------------------------------------------------------

def pairs(seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    data = {k: -5 - 55 * torch.rand(6, generator=g, dtype=torch.float64)
            for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")}
    data["prompt_embeddings"] = torch.randn(6, 8, generator=g, dtype=torch.float64)
    if requires_grad:
        data["chosen_logps"].requires_grad_(True)
        data["rejected_logps"].requires_grad_(True)
    return data


def ref_relative(data, beta=0.1, tau=0.5, use_emb=True):
    n = data["chosen_logps"].shape[0]
    hw = [float(data["chosen_logps"][i] - data["ref_chosen_logps"][i]) for i in range(n)]
    hl = [float(data["rejected_logps"][j] - data["ref_rejected_logps"][j]) for j in range(n)]
    e = data["prompt_embeddings"].tolist()

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    out = []
    for i in range(n):
        if use_emb:
            raw = [math.exp(-(1 - cos(e[i], e[j])) / tau) for j in range(n)]
            w = [r / sum(raw) for r in raw]
        else:
            w = [1.0] * n
        out.append(sum(math.log1p(math.exp(-beta * w[j] * (hw[i] - hl[j]))) for j in range(n)) / n)
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("params", [{}, {"beta": 0.3, "tau": 0.1}])
def test_relative_po_matches_reference(params):
    data = pairs(0)
    torch.testing.assert_close(preference_loss("relative_po", **data, **params), ref_relative(data, **params),
                               rtol=1e-5, atol=1e-6)
    no_emb = {k: v for k, v in data.items() if k != "prompt_embeddings"}
    torch.testing.assert_close(preference_loss("relative_po", **no_emb, **params),
                               ref_relative(data, **params, use_emb=False), rtol=1e-5, atol=1e-6)


def test_relative_po_gradients_and_similar_prompts_weigh_more():
    data = pairs(1, requires_grad=True)
    preference_loss("relative_po", **data).sum().backward()
    lw = data["chosen_logps"].detach().clone().requires_grad_(True)
    ll = data["rejected_logps"].detach().clone().requires_grad_(True)
    e = torch.nn.functional.normalize(data["prompt_embeddings"], dim=-1)
    total = 0
    for i in range(6):
        w = torch.softmax(torch.stack([-(1 - e[i] @ e[j]) / 0.5 for j in range(6)]), 0)
        for j in range(6):
            diff = (lw[i] - data["ref_chosen_logps"][i]) - (ll[j] - data["ref_rejected_logps"][j])
            total = total + torch.nn.functional.softplus(-0.1 * w[j] * diff) / 6
    total.backward()
    torch.testing.assert_close(data["chosen_logps"].grad, lw.grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(data["rejected_logps"].grad, ll.grad, rtol=1e-4, atol=1e-8)
    # A prompt identical to prompt 0 gets the largest weight in row 0: its rejected gets the largest push.
    data2 = pairs(2, requires_grad=True)
    data2["prompt_embeddings"][3] = data2["prompt_embeddings"][0]
    for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"):
        data2[k] = torch.full((6,), -20.0, dtype=torch.float64, requires_grad=k == "rejected_logps")
    preference_loss("relative_po", **data2)[0].backward()
    g = data2["rejected_logps"].grad
    assert g[0] == g.max() and g[3] == g.max()


# --- group_robust_po -----------------------------------------------------------------------------------------

def groups(seed=0):
    data = pairs(seed)
    del data["prompt_embeddings"]
    data["group_ids"] = torch.tensor([0, 2, 0, 2, 2, 0])  # group 1 absent from the batch
    data["group_weights"] = torch.tensor([0.5, 0.3, 0.2])
    return data


def ref_group(data, beta=0.01, ipo=True, fractions=None):
    n = len(data["group_ids"])
    losses = []
    for i in range(n):
        d = float((data["chosen_logps"][i] - data["ref_chosen_logps"][i])
                  - (data["rejected_logps"][i] - data["ref_rejected_logps"][i]))
        losses.append((d - 1 / (2 * beta)) ** 2 if ipo else math.log1p(math.exp(-beta * d)))
    ids, alpha = data["group_ids"].tolist(), data["group_weights"].tolist()
    if fractions is not None:
        return sum(alpha[ids[i]] * losses[i] / fractions[ids[i]] for i in range(n)) / n
    total = 0.0
    for gidx, a in enumerate(alpha):
        members = [losses[i] for i in range(n) if ids[i] == gidx]
        if members:
            total += a * sum(members) / len(members)
    return total


@pytest.mark.parametrize("params", [{}, {"ipo": False, "beta": 0.1}])
@pytest.mark.parametrize("fractions", [None, [0.6, 0.1, 0.3]])
def test_group_robust_po_matches_reference(params, fractions):
    data = groups(0)
    extra = {} if fractions is None else {"group_fractions": torch.tensor(fractions)}
    out = preference_loss("group_robust_po", **data, **extra, **params)
    expect = ref_group(data, fractions=fractions, **params)
    assert out.shape == (6,)
    torch.testing.assert_close(out, torch.full((6,), expect, dtype=torch.float32), rtol=1e-5, atol=1e-5)


def test_group_robust_po_gradient_weights_and_detached_alpha():
    data = groups(1)
    data["chosen_logps"].requires_grad_(True)
    alpha = data["group_weights"].clone().requires_grad_(True)
    out = preference_loss("group_robust_po", **{**data, "group_weights": alpha}, ipo=False, beta=0.1)
    out[0].backward()
    assert alpha.grad is None
    # Each pair's gradient is α_g/|g| times the DPO gradient.
    lw = data["chosen_logps"].detach()
    d = (lw - data["ref_chosen_logps"]) - (data["rejected_logps"] - data["ref_rejected_logps"])
    counts = {0: 3, 2: 3}
    expect = torch.tensor([-(float(data["group_weights"][gid]) / counts[gid]) * 0.1 / (1 + math.exp(0.1 * float(x)))
                           for gid, x in zip(data["group_ids"].tolist(), d)], dtype=torch.float64)
    torch.testing.assert_close(data["chosen_logps"].grad, expect, rtol=1e-4, atol=1e-9)
    # Uniform α over present groups of equal size is the plain mean of the per-pair losses.
    uniform = preference_loss("group_robust_po", **{**data, "group_weights": torch.tensor([1.0, 0.0, 1.0])},
                              ipo=False, beta=0.1)
    plain = -torch.nn.functional.logsigmoid(0.1 * d).mean() * 2
    torch.testing.assert_close(uniform[0], plain.float().detach())
