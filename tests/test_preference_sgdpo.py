"""SGDPO (`sgdpo`) against a reference written from the authors' pdpo_loss (WNQzhu/SGDPO pdpo_trainer_v4.py).

The authors' pilot term is the log-ratio summed over a random subset of a response's tokens (torch.randperm over
its length, the first max(int(min_len * ratio), 1)); the reference below takes such subsets from its own generator
and the entry is made to use the same ones, so the loss is compared token for token. The draw itself is checked
separately: its size, that it stays inside the completion, that every token is equally likely, that it is detached.
"""

import math

import pytest
import torch

from postrain.preference import PREFERENCE, preference_loss
from postrain.preference import token_weighted


def _logsig(z):
    return -math.log1p(math.exp(-z)) if z > -30 else z - math.log1p(math.exp(z))


def _oracle_counts(n_w, n_l, r1, r2):
    """pdpo_loss / get_pilot_logps: min_len = min of the two lengths, then max(int(min_len * r), 1)."""
    m = min(n_w, n_l)
    return max(int(m * r1), 1), max(int(m * r2), 1)


def _oracle(tok_w, ref_w, tok_l, ref_l, pick_w, pick_l, beta, eps):
    """pdpo_loss on one pair: logits_1 = (chosen - ref) - pilot(rejected), logits_2 = pilot(chosen) - (rejected - ref),
    each through the label-smoothed sigmoid loss, averaged."""
    h_w = sum(tok_w) - sum(ref_w)
    h_l = sum(tok_l) - sum(ref_l)
    pilot_w = sum(tok_w[i] for i in pick_w) - sum(ref_w[i] for i in pick_w)
    pilot_l = sum(tok_l[i] for i in pick_l) - sum(ref_l[i] for i in pick_l)

    def loss(z):
        return -(1 - eps) * _logsig(beta * z) - eps * _logsig(-beta * z)

    return 0.5 * loss(h_w - pilot_l) + 0.5 * loss(pilot_w - h_l)


LENGTHS = [(7, 5), (3, 9), (10, 10), (1, 4)]
T = 12


def _batch(g):
    rows, batch = [], {k: torch.full((len(LENGTHS), T), float("nan")) for k in
                       ("chosen_token_logps", "ref_chosen_token_logps", "rejected_token_logps",
                        "ref_rejected_token_logps")}
    batch["chosen_mask"] = torch.zeros(len(LENGTHS), T)
    batch["rejected_mask"] = torch.zeros(len(LENGTHS), T)
    for b, (n_w, n_l) in enumerate(LENGTHS):
        row = [(-5 * torch.rand(n, generator=g, dtype=torch.float64)).tolist() for n in (n_w, n_w, n_l, n_l)]
        rows.append(row)
        for key, values in zip(("chosen_token_logps", "ref_chosen_token_logps", "rejected_token_logps",
                                "ref_rejected_token_logps"), row):
            batch[key][b, :len(values)] = torch.tensor(values)
        batch["chosen_mask"][b, :n_w] = 1.0
        batch["rejected_mask"][b, :n_l] = 1.0
    return rows, batch


@pytest.mark.parametrize("beta,r1,r2,eps", [(0.1, 0.7, 0.9, 0.0), (0.5, 0.6, 0.3, 0.2)])
def test_sgdpo_matches_the_authors_pdpo_loss_on_the_same_pilot_tokens(monkeypatch, beta, r1, r2, eps):
    g = torch.Generator().manual_seed(5)
    rows, batch = _batch(g)
    counts = [_oracle_counts(n_w, n_l, r1, r2) for n_w, n_l in LENGTHS]
    picks = [(torch.randperm(n_w, generator=g)[:k_w].tolist(), torch.randperm(n_l, generator=g)[:k_l].tolist())
             for (n_w, n_l), (k_w, k_l) in zip(LENGTHS, counts)]
    calls = []

    def same_tokens(token_logratios, mask, wanted):
        side = len(calls)  # the entry draws the chosen's pilot first, then the rejected's
        calls.append(wanted.tolist())
        return torch.stack([token_logratios[b, picks[b][side]].sum() for b in range(len(LENGTHS))]).detach()

    monkeypatch.setattr(token_weighted, "_pilot_sums", same_tokens)
    losses = preference_loss("sgdpo", **batch, beta=beta, pilot_ratio_chosen=r1, pilot_ratio_rejected=r2,
                             label_smoothing=eps)
    assert calls == [[c[0] for c in counts], [c[1] for c in counts]]  # the authors' subset sizes
    expected = torch.tensor([_oracle(*row, *pick, beta, eps) for row, pick in zip(rows, picks)], dtype=torch.float64)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-6)


def test_the_pilot_draw_is_a_uniform_subset_of_the_completion_and_detached():
    torch.manual_seed(0)
    n, k, draws = 6, 2, 6000
    logratios = torch.arange(1.0, 9.0).repeat(draws, 1).requires_grad_()  # token t holds t + 1; 2 padding slots
    mask = torch.tensor([[1.0] * n + [0.0, 0.0]]).repeat(draws, 1)
    sums = token_weighted._pilot_sums(logratios, mask, torch.full((draws,), k))
    assert not sums.requires_grad
    # Each sum is two distinct tokens of the first six: 1 + 2 = 3 up to 5 + 6 = 11, never a padding slot.
    assert sums.min() >= 3 and sums.max() <= 11
    # Uniform without replacement: every token is in the pair with probability k / n, so the mean is k * 3.5.
    assert sums.mean().item() == pytest.approx(k * 3.5, abs=0.12)  # 4 standard errors
    pairs = {}
    for s in sums.tolist():
        pairs[s] = pairs.get(s, 0) + 1
    # sums 3 (only {1, 2}) and 7 ({1, 6}, {2, 5}, {3, 4}): probabilities 1/15 and 3/15
    assert pairs[3.0] / draws == pytest.approx(1 / 15, abs=0.015)
    assert pairs[7.0] / draws == pytest.approx(3 / 15, abs=0.02)
    # More wanted than the completion has: all of it.
    assert token_weighted._pilot_sums(logratios[:1], mask[:1], torch.tensor([50])).item() == 21.0


def test_each_half_moves_one_response_and_padding_is_ignored():
    g = torch.Generator().manual_seed(1)
    _, batch = _batch(g)
    chosen = batch["chosen_token_logps"].clone().requires_grad_()
    rejected = batch["rejected_token_logps"].clone().requires_grad_()
    losses = preference_loss("sgdpo", **{**batch, "chosen_token_logps": chosen, "rejected_token_logps": rejected})
    assert torch.isfinite(losses).all()  # the nan padding is masked out
    losses.sum().backward()
    for grad, mask, sign in ((chosen.grad, batch["chosen_mask"], -1), (rejected.grad, batch["rejected_mask"], 1)):
        assert (grad[mask == 0] == 0).all()
        for b in range(len(LENGTHS)):
            row = grad[b][mask[b] > 0]
            # the pilots carry no gradient, so every token of a response gets the same one, of the DPO sign
            torch.testing.assert_close(row, row[:1].expand_as(row))
            assert (torch.sign(row) == sign).all()


def test_sgdpo_is_registered_with_the_authors_defaults():
    variant = PREFERENCE.get("sgdpo")
    assert variant.params == {"beta": 0.1, "pilot_ratio_chosen": 0.7, "pilot_ratio_rejected": 0.9,
                              "label_smoothing": 0.0}
    assert variant.extra["catalog"] == "preference:23" and "WNQzhu/SGDPO" in variant.notes
