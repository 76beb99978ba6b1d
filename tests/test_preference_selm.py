"""SELM (`selm`) against a reference written from the authors' code (shenao-zhang/SELM), candidate by candidate.

scripts/online_feedback.py ranks the candidates [the model's greedy answer, the data's chosen, the data's rejected]
with PairRM (rank 1 = best) and takes chosen = numpy argmin of the ranks, rejected = argmax; the model's answer is
kept as `reference_response`. scripts/selm_trainer.py::optimistic_dpo_loss is
-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) + alpha * beta * (pi_resp - ref_resp) on summed log-probs.
The entry receives scores K - rank (what `ranks:` become in postrain's list rows).
"""

import math

import pytest
import torch

from postrain.preference import PREFERENCE, preference_loss


def _authors_pair(ranks):
    """numpy's argmin / argmax: the first index of the smallest / largest rank."""
    chosen = min(range(len(ranks)), key=lambda i: (ranks[i], i))
    rejected = max(range(len(ranks)), key=lambda i: (ranks[i], -i))
    return chosen, rejected


def _oracle(policy, reference, ranks, beta, alpha):
    c, r = _authors_pair(ranks)
    logits = (policy[c] - policy[r]) - (reference[c] - reference[r])
    response_logratio = policy[0] - reference[0]  # slot 0: the model's own answer
    return -math.log(1 / (1 + math.exp(-beta * logits))) + alpha * beta * response_logratio


# PairRM gives each candidate its own rank; the model's answer may be the best, the worst or in between.
RANKS = [[2, 1, 3], [1, 3, 2], [3, 1, 2], [2, 3, 1], [1, 2, 3]]


def test_selm_matches_the_authors_ranking_and_optimistic_loss():
    g = torch.Generator().manual_seed(4)
    policy = (-200 * torch.rand(len(RANKS), 3, generator=g, dtype=torch.float64)).tolist()
    reference = (-200 * torch.rand(len(RANKS), 3, generator=g, dtype=torch.float64)).tolist()
    scores = torch.tensor([[3.0 - r for r in ranks] for ranks in RANKS])
    for beta, alpha in ((0.01, 0.001), (0.5, 0.3)):
        losses = preference_loss("selm", list_logps=torch.tensor(policy), list_ref_logps=torch.tensor(reference),
                                 list_scores=scores, list_mask=torch.ones(len(RANKS), 3), beta=beta, alpha=alpha)
        expected = torch.tensor([_oracle(p, q, ranks, beta, alpha) for p, q, ranks in zip(policy, reference, RANKS)],
                                dtype=torch.float64)
        torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-5)


def test_masked_slots_are_never_chosen_nor_rejected_and_ties_take_the_first():
    # A padded fourth slot with the best score and nan log-probs must change nothing; equal scores pick the first.
    policy = torch.tensor([[-10.0, -12.0, -15.0, float("nan")], [-4.0, -5.0, -6.0, float("nan")]])
    reference = torch.tensor([[-11.0, -11.0, -11.0, float("nan")], [-4.0, -4.0, -4.0, float("nan")]])
    scores = torch.tensor([[1.0, 1.0, 0.0, 9.0], [2.0, 2.0, 2.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    losses = preference_loss("selm", list_logps=policy, list_ref_logps=reference, list_scores=scores, list_mask=mask,
                             beta=0.5, alpha=0.2)
    # row 0: chosen slot 0 (first of the two 1.0), rejected slot 2: logits (1) - (-4) = 5; own answer h_0 = 1
    # row 1: every score equal, so chosen = rejected = slot 0: logits 0; h_0 = 0
    expected = torch.tensor([-math.log(1 / (1 + math.exp(-2.5))) + 0.1 * 1.0, math.log(2.0)])
    torch.testing.assert_close(losses, expected.float(), rtol=1e-6, atol=1e-6)


def test_the_optimism_term_lowers_the_policys_own_answer():
    # With the chosen and rejected fixed, the gradient on slot 0 (here neither) is +alpha*beta: descending the loss
    # lowers the log-prob of the answer the model generated itself, the exploration the authors' term adds.
    policy = torch.tensor([[-10.0, -12.0, -15.0]], requires_grad=True)
    loss = preference_loss("selm", list_logps=policy, list_ref_logps=torch.tensor([[-10.0, -12.0, -15.0]]),
                           list_scores=torch.tensor([[1.0, 2.0, 0.0]]), beta=0.5, alpha=0.2)
    loss.sum().backward()
    assert policy.grad[0, 0].item() == pytest.approx(0.2 * 0.5, rel=1e-6)
    assert policy.grad[0, 1] < 0 < policy.grad[0, 2]  # chosen raised, rejected lowered


def test_selm_is_registered_with_the_authors_defaults():
    variant = PREFERENCE.get("selm")
    assert variant.params == {"beta": 0.01, "alpha": 0.001}
    assert variant.extra["catalog"] == "preference:67" and "shenao-zhang/SELM" in variant.notes
