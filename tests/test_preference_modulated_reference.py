"""MIPO against a per-pair reference written from the authors' mipo_loss (ncsoft/MIPO), token by token."""

import math

import torch

from postrain.preference import PREFERENCE, preference_loss


def _pair_tokens(g, n_w, n_l):
    draw = lambda n: (-6 * torch.rand(n, generator=g, dtype=torch.float64)).tolist()  # per-token log-probs in (-6, 0)
    return draw(n_w), draw(n_l), draw(n_w), draw(n_l)


def _oracle(tok_w, tok_l, ref_w, ref_l, beta):
    """The authors' formula on one pair: average log-probs over tokens, K from the reference's averages."""
    avg = lambda xs: sum(xs) / len(xs)
    k = avg(ref_w) - avg(ref_l)
    logit = avg(tok_w) - avg(tok_l) - math.log(1 + math.exp(k))
    return -math.log(1 / (1 + math.exp(-beta * logit)))


def test_mipo_matches_the_authors_formula_on_token_averages():
    g = torch.Generator().manual_seed(3)
    lengths = [(5, 9), (12, 3), (7, 7), (20, 11)]
    pairs = [_pair_tokens(g, a, b) for a, b in lengths]
    batch = {
        "chosen_logps": torch.tensor([sum(p[0]) for p in pairs]),
        "rejected_logps": torch.tensor([sum(p[1]) for p in pairs]),
        "ref_chosen_logps": torch.tensor([sum(p[2]) for p in pairs]),
        "ref_rejected_logps": torch.tensor([sum(p[3]) for p in pairs]),
        "chosen_lengths": torch.tensor([float(a) for a, _ in lengths]),
        "rejected_lengths": torch.tensor([float(b) for _, b in lengths]),
    }
    for beta in (20.0, 5.0):
        losses = preference_loss("mipo", **batch, beta=beta)
        expected = torch.tensor([_oracle(*p, beta) for p in pairs], dtype=torch.float64)
        torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-6)


def test_mipo_reference_enters_only_as_the_per_pair_offset():
    # The same reference averages give the same loss whatever the policy's reference-relative log-ratios are,
    # unlike DPO: shifting the reference's chosen and rejected averages by the same amount leaves K unchanged.
    base = dict(chosen_logps=torch.tensor([-10.0]), rejected_logps=torch.tensor([-14.0]),
                ref_chosen_logps=torch.tensor([-12.0]), ref_rejected_logps=torch.tensor([-12.0]),
                chosen_lengths=torch.tensor([4.0]), rejected_lengths=torch.tensor([4.0]))
    shifted = {**base, "ref_chosen_logps": torch.tensor([-40.0]), "ref_rejected_logps": torch.tensor([-40.0])}
    torch.testing.assert_close(preference_loss("mipo", **base), preference_loss("mipo", **shifted))
    # A pair the reference already prefers (K > 0) needs a larger policy margin: its loss is higher.
    easy = {**base, "ref_chosen_logps": torch.tensor([-4.0]), "ref_rejected_logps": torch.tensor([-20.0])}
    hard = {**base, "ref_chosen_logps": torch.tensor([-20.0]), "ref_rejected_logps": torch.tensor([-4.0])}
    assert preference_loss("mipo", **easy) > preference_loss("mipo", **hard)
    # With K ≪ 0 the offset vanishes: the loss is the reference-free −log σ(β(ℓ̄_w − ℓ̄_l)).
    margin = (-10.0 - -14.0) / 4
    torch.testing.assert_close(preference_loss("mipo", **hard, beta=1.0).double(),
                               torch.tensor([-math.log(1 / (1 + math.exp(-(margin - math.log1p(math.exp(-4.0))))))],
                                            dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_mipo_gradient_raises_the_chosen_average_and_stays_finite_at_extremes():
    chosen = torch.tensor([-30.0, -1e4], requires_grad=True)
    loss = preference_loss("mipo", chosen_logps=chosen, rejected_logps=torch.tensor([-20.0, -1.0]),
                           ref_chosen_logps=torch.tensor([-25.0, -1.0]), ref_rejected_logps=torch.tensor([-25.0, -1e4]),
                           chosen_lengths=torch.tensor([10.0, 1.0]), rejected_lengths=torch.tensor([10.0, 1.0]))
    assert torch.isfinite(loss).all()  # K = 1e4 - 1 and a margin of -1e4 + 1: softplus and logsigmoid stay finite
    loss.sum().backward()
    assert (chosen.grad < 0).all()  # descending the loss raises the chosen log-prob
    assert torch.isfinite(chosen.grad).all()


def test_mipo_is_registered_with_the_authors_default():
    variant = PREFERENCE.get("mipo")
    assert variant.params == {"beta": 20.0}
    assert variant.extra["catalog"] == "preference:16" and "ncsoft/MIPO" in variant.notes
