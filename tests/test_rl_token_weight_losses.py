"""tw_grpo and gtpo against loops written from the authors' code (longmalongma/TW-GRPO grpo_trainer.py
compute_token_importance_kl_logs_uniform and loss_type tw_grpo; winstonsmith1897/GTPO gtpo_training.py
build_conflict_mask, UnslothEfficientGTPO.forward and gtpo_compute_loss), one completion and one position at a time."""

import math

import pytest
import torch

from postrain.errors import RecipeError
from postrain.rl.registry import POLICY_LOSSES

G = 4


# --- TW-GRPO ---------------------------------------------------------------------------------------------------

def _tw_weights_one_group(vocab_logps, lengths, alpha):
    """The authors' weights for one prompt's group, padded (as their batch) to the group's longest completion:
    a list of per-position weights (length max(lengths))."""
    t_max, vocab = max(lengths), vocab_logps.shape[-1]
    kl = []
    for t in range(t_max):
        rows = [vocab_logps[i, t].tolist() if t < lengths[i] else [-math.log(vocab)] * vocab
                for i in range(len(lengths))]
        mean = [sum(r[v] for r in rows) / len(rows) for v in range(vocab)]
        total = 0.0
        for r in rows:
            for v in range(vocab):
                d = min(max(mean[v] - r[v], -11.0), 11.0)
                total += math.exp(d) - d - 1
        kl.append(total / len(rows))
    lo, hi = min(kl), max(kl)
    return [1.0 + (alpha - 1.0) * (k - lo) / (hi - lo + 1e-8) for k in kl]


def _tw_batch(seed=0, vocab=7, t=6):
    g = torch.Generator().manual_seed(seed)
    lengths = [6, 2, 4, 3, 1, 5, 5, 2]  # two groups of 4; the first reaches the padded width, the second does not
    lengths[0] = t
    lengths = lengths[:2 * G]
    n = len(lengths)
    vocab_logps = torch.log_softmax(torch.randn(n, t, vocab, generator=g) * 2, -1)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    logps = vocab_logps.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    mask = (torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()
    vocab_logps = torch.where(mask.bool().unsqueeze(-1), vocab_logps, torch.full_like(vocab_logps, float("nan")))
    old = logps + 0.2 * torch.randn(n, t, generator=g)
    adv = torch.tensor([1.1, -0.4, 0.7, -1.4, 0.3, -0.2, 0.9, -1.0])
    return lengths, vocab_logps, logps, old, mask, adv


def _call_tw(logps, old, adv, mask, vocab_logps, **params):
    return POLICY_LOSSES.call("tw_grpo", {"logps": logps, "old_logps": old, "advantages": adv, "mask": mask,
                                          "vocab_logps": vocab_logps, "group_size": G}, params)


@pytest.mark.parametrize("params", [{}, {"alpha": 1.4, "epsilon": 0.1, "epsilon_high": 0.15}])
def test_tw_grpo_matches_the_authors_weights_and_clipped_loss(params):
    lengths, vocab_logps, logps, old, mask, adv = _tw_batch()
    loss, metrics = _call_tw(logps, old, adv, mask, vocab_logps, **params)
    alpha, lo, hi = params.get("alpha", 1.7), params.get("epsilon", 0.2), params.get("epsilon_high", 0.28)
    for start in range(0, len(lengths), G):
        group = lengths[start:start + G]
        weights = _tw_weights_one_group(vocab_logps[start:start + G], group, alpha)
        for i, k in enumerate(group):
            row = start + i
            for t in range(loss.shape[1]):
                if t >= k:
                    assert float(loss[row, t]) == 0.0
                    continue
                r = math.exp(float(logps[row, t]) - float(old[row, t]))
                a = float(adv[row])
                surrogate = min(r * a, min(max(r, 1 - lo), 1 + hi) * a)
                assert math.isclose(float(loss[row, t]), -surrogate * weights[t], rel_tol=1e-5, abs_tol=1e-6), \
                    (row, t)
    assert 1.0 <= float(metrics["tw_grpo/weight_mean"]) <= alpha


def test_tw_grpo_weights_carry_the_gradient_of_the_vocabulary_log_probs_as_the_authors_do():
    # The authors compute the weights from the log-softmax they train through (not detached): the loss moves with
    # vocab_logps even where logps is held fixed.
    lengths, vocab_logps, logps, old, mask, adv = _tw_batch(1)
    full = torch.nan_to_num(vocab_logps, nan=0.0).requires_grad_(True)
    loss, _ = _call_tw(logps, old, adv, mask, full)
    loss.sum().backward()
    assert full.grad is not None and float(full.grad.abs().sum()) > 0
    assert float(full.grad[~mask.bool()].abs().sum()) == 0.0  # padding positions get no gradient


def test_tw_grpo_weight_one_everywhere_at_alpha_one_is_the_ppo_clip():
    lengths, vocab_logps, logps, old, mask, adv = _tw_batch(2)
    loss, _ = _call_tw(logps, old, adv, mask, vocab_logps, alpha=1.0)
    plain, _ = POLICY_LOSSES.call("ppo_clip", {"logps": logps, "old_logps": old, "advantages": adv, "mask": mask},
                                  {"epsilon": 0.2, "epsilon_high": 0.28})
    torch.testing.assert_close(loss, plain)


def test_tw_grpo_refuses_an_alpha_below_one():
    lengths, vocab_logps, logps, old, mask, adv = _tw_batch()
    with pytest.raises(RecipeError, match="largest token weight"):
        _call_tw(logps, old, adv, mask, vocab_logps, alpha=0.5)


# --- GTPO ------------------------------------------------------------------------------------------------------

def _gtpo_oracle(ids, lengths, adv, w_raw):
    """The authors' build_conflict_mask for one group, position by position: (delta per completion, conflict count)."""
    pos = [a > 0 for a in adv]
    neg = [a < 0 for a in adv]
    fwd_pos = {(t, ids[i][t]) for i in range(len(ids)) if pos[i] for t in range(lengths[i])}
    fwd_neg = {(t, ids[i][t]) for i in range(len(ids)) if neg[i] for t in range(lengths[i])}
    rev_pos = {(r, ids[i][lengths[i] - 1 - r]) for i in range(len(ids)) if pos[i] for r in range(lengths[i])}
    rev_neg = {(r, ids[i][lengths[i] - 1 - r]) for i in range(len(ids)) if neg[i] for r in range(lengths[i])}
    deltas, counts = [], []
    for i in range(len(ids)):
        n = lengths[i]
        if not (pos[i] or neg[i]):
            deltas.append([1.0] * n)
            counts.append(1)
            continue
        fwd = [False] * n
        for t in range(n):
            if (t, ids[i][t]) in fwd_pos and (t, ids[i][t]) in fwd_neg:
                fwd[t] = True
            else:
                break
        bwd = [False] * n
        for r in range(n):
            key = (r, ids[i][n - 1 - r])
            if key in rev_pos and key in rev_neg:
                bwd[n - 1 - r] = True
            else:
                break
        conflict_value = w_raw if pos[i] else 0.0
        deltas.append([(conflict_value if fwd[t] else 1.0) * (conflict_value if bwd[t] else 1.0) for t in range(n)])
        counts.append(max(1, sum(f or b for f, b in zip(fwd, bwd))))
    return deltas, counts


def _gtpo_batch():
    # group 1: a shared opening (7, 8) and a shared ending (9) between positive and negative completions, a
    # positive completion identical to a negative one, an all-equal group (advantage 0) as group 2
    rows = [([7, 8, 1, 2, 9], 1.0), ([7, 8, 3, 9], -0.5), ([7, 5, 9], 0.8), ([7, 8, 3, 9], -1.3),
            ([4, 4, 4], 0.0), ([4, 6], 0.0), ([4, 4, 4], 0.0), ([6], 0.0)]
    t = max(len(r) for r, _ in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t)
    for i, (r, _) in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    ids[~mask.bool()] = 8  # padding that happens to equal a real token must not count as a shared token
    adv = torch.tensor([a for _, a in rows])
    g = torch.Generator().manual_seed(0)
    logps = -(torch.rand(len(rows), t, generator=g) + 0.1)
    entropies = torch.rand(len(rows), t, generator=g)
    entropies[1] += 1.0  # one completion above the entropy threshold
    return rows, ids, mask, adv, logps, entropies


def _call_gtpo(logps, adv, mask, entropies, ids, **params):
    return POLICY_LOSSES.call("gtpo", {"logps": logps, "advantages": adv, "mask": mask, "entropies": entropies,
                                       "completion_ids": ids, "group_size": G}, params)


@pytest.mark.parametrize("params", [{}, {"entropy_threshold": 2.0, "entropy_scale": 0.3, "conflict_weight": 3.0}])
def test_gtpo_matches_the_authors_conflict_masks_entropy_filter_and_loss(params):
    rows, ids, mask, adv, logps, entropies = _gtpo_batch()
    lp = logps.clone().requires_grad_(True)
    loss, metrics = _call_gtpo(lp, adv, mask, entropies, ids, **params)
    threshold, scale = params.get("entropy_threshold", 0.7), params.get("entropy_scale", 0.1)
    w_raw = params.get("conflict_weight", 2.0)
    expected = torch.zeros_like(loss)
    for start in range(0, len(rows), G):
        group = rows[start:start + G]
        deltas, counts = _gtpo_oracle([r for r, _ in group], [len(r) for r, _ in group], [a for _, a in group], w_raw)
        for i, (r, a) in enumerate(group):
            h = sum(float(entropies[start + i, t]) for t in range(len(r))) / len(r)
            shaped = a - scale * h if h <= threshold else 0.0
            for t in range(len(r)):
                expected[start + i, t] = -shaped * deltas[i][t] / counts[i]
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)
    loss.sum().backward()  # the ratio pi / sg(pi) is 1 with the gradient of log pi: d l / d log pi = l
    torch.testing.assert_close(lp.grad, expected, rtol=1e-5, atol=1e-7)
    assert 0 < float(metrics["gtpo/conflict_fraction"]) < 1


def test_gtpo_protects_shared_tokens_of_negative_completions_and_boosts_them_in_positive_ones():
    rows, ids, mask, adv, logps, entropies = _gtpo_batch()
    entropies = torch.zeros_like(entropies)  # no filtering, no shaping
    loss, _ = _call_gtpo(logps, adv, mask, entropies, ids, entropy_scale=0.0)
    # row 1 (negative, [7, 8, 3, 9]): the opening 7 8 and the ending 9 it shares with the positive row 0 are left
    # alone (weight 0); its own token 3 is pushed down: -A / n_conflict = 0.5 / 3
    assert [float(x) for x in loss[1, :4]] == pytest.approx([0.0, 0.0, 0.5 / 3, 0.0])
    # row 0 (positive, [7, 8, 1, 2, 9]): the same shared tokens get twice the push (conflict_weight 2), the others
    # the plain one, all divided by its 3 conflict tokens
    assert [float(x) for x in loss[0]] == pytest.approx([-2 / 3, -2 / 3, -1 / 3, -1 / 3, -2 / 3])


def test_gtpo_refuses_negative_settings():
    rows, ids, mask, adv, logps, entropies = _gtpo_batch()
    with pytest.raises(RecipeError, match="must be >= 0"):
        _call_gtpo(logps, adv, mask, entropies, ids, conflict_weight=-1.0)


def test_registered_with_the_authors_defaults():
    assert POLICY_LOSSES.get("tw_grpo").params == {"alpha": 1.7, "epsilon": 0.2, "epsilon_high": 0.28}
    assert POLICY_LOSSES.get("gtpo").params == {"entropy_threshold": 0.7, "entropy_scale": 0.1,
                                                "conflict_weight": 2.0}
    assert POLICY_LOSSES.get("tw_grpo").extra["catalog"] == "rl:71"
    assert POLICY_LOSSES.get("gtpo").extra["catalog"] == "rl:69"
