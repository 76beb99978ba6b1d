"""BMC (preference row 73): the entry against a loop written from the authors' YJiangcm/BMC dpo_bmc_trainer.py
(concatenated_forward's token weights, dpo_loss's sigmoid branch), the pair difference masks against their
find_modifications, and the DPO trainer's loss against the entry on plain forwards of the tiny models."""

from __future__ import annotations

import difflib
import math

import pytest
import torch

from postrain.errors import RecipeError
from postrain.preference.registry import PREFERENCE
from postrain.jobs import load_recipe
from tests.test_dpo_token_level import dpo_recipe, first_batch, full_logps, make_trainer, pair, token_logps


def authors_find_modifications(original, corrected, stopword_ids):
    """scripts/dpo_bmc_trainer.py find_modifications, as the authors wrote it (original = rejected)."""
    d = difflib.SequenceMatcher(None, original, corrected)
    original_modifications = [0] * len(original)
    corrected_modifications = [0] * len(corrected)
    for tag, i1, i2, j1, j2 in d.get_opcodes():
        if tag in ("replace", "delete"):
            for i in range(i1, i2):
                if original[i] not in stopword_ids:
                    original_modifications[i] = 1
        if tag in ("replace", "insert"):
            for j in range(j1, j2):
                if corrected[j] not in stopword_ids:
                    corrected_modifications[j] = 1
    return original_modifications, corrected_modifications


def _weighted_sum(logps, mask, marks, delta):
    total = 0.0
    for lp, m, k in zip(logps, mask, marks):
        if m:
            total += lp * (1.0 + k * min(math.exp(-lp), delta))
    return total


def test_bmc_matches_the_authors_weighted_sums_and_sigmoid_loss():
    g = torch.Generator().manual_seed(0)
    b, t = 5, 7
    logps = {k: -(torch.rand(b, t, generator=g) * 3 + 1e-3) for k in ("pw", "pl", "rw", "rl")}
    masks = {k: (torch.rand(b, t, generator=g) > 0.2).float() for k in ("w", "l")}
    marks = {k: (torch.rand(b, t, generator=g) > 0.5).float() for k in ("w", "l")}
    for beta, delta in ((0.01, 1.5), (0.5, 20.0), (0.1, 0.0)):
        losses = PREFERENCE.call("bmc", {
            "chosen_token_logps": logps["pw"], "rejected_token_logps": logps["pl"],
            "ref_chosen_token_logps": logps["rw"], "ref_rejected_token_logps": logps["rl"],
            "chosen_mask": masks["w"], "rejected_mask": masks["l"],
            "chosen_diff_mask": marks["w"], "rejected_diff_mask": marks["l"]}, {"beta": beta, "delta": delta})
        for i in range(b):
            def side(p, k):
                return _weighted_sum(logps[p][i].tolist(), masks[k][i].tolist(), marks[k][i].tolist(), delta)
            logits = (side("pw", "w") - side("rw", "w")) - (side("pl", "l") - side("rl", "l"))
            want = -math.log(1 / (1 + math.exp(-beta * logits)))
            assert float(losses[i]) == pytest.approx(want, rel=1e-5, abs=1e-7), (beta, delta, i)


def test_the_weights_carry_no_gradient_and_delta_zero_is_dpo():
    g = torch.Generator().manual_seed(1)
    pw, pl = ((-(torch.rand(3, 4, generator=g) + 0.1)).requires_grad_(True) for _ in range(2))
    rw, rl = (-(torch.rand(3, 4, generator=g) + 0.1) for _ in range(2))
    ones, marks = torch.ones(3, 4), torch.ones(3, 4)
    data = {"chosen_token_logps": pw, "rejected_token_logps": pl, "ref_chosen_token_logps": rw,
            "ref_rejected_token_logps": rl, "chosen_mask": ones, "rejected_mask": ones,
            "chosen_diff_mask": marks, "rejected_diff_mask": marks}
    loss = PREFERENCE.call("bmc", data, {"beta": 0.3, "delta": 100.0}).sum()
    loss.backward()
    # d/d lp of lp * (1 + sg(e^-lp)) is 1 + e^-lp (the weight is a constant): the gradient of a sigmoid DPO on the
    # weighted sums
    margin = ((pw * (1 + torch.exp(-pw))).sum(-1) - (rw * (1 + torch.exp(-rw))).sum(-1)
              - (pl * (1 + torch.exp(-pl))).sum(-1) + (rl * (1 + torch.exp(-rl))).sum(-1)).detach()
    coef = -0.3 * torch.sigmoid(-0.3 * margin)
    torch.testing.assert_close(pw.grad, coef.unsqueeze(1) * (1 + torch.exp(-pw.detach())))
    dpo = PREFERENCE.call("dpo", {"chosen_logps": pw.sum(-1), "rejected_logps": pl.sum(-1),
                                  "ref_chosen_logps": rw.sum(-1), "ref_rejected_logps": rl.sum(-1)}, {"beta": 0.3})
    torch.testing.assert_close(PREFERENCE.call("bmc", data, {"beta": 0.3, "delta": 0.0}), dpo)
    with pytest.raises(RecipeError, match="delta"):
        PREFERENCE.call("bmc", data, {"delta": -1.0})


def test_difference_masks_are_the_authors_find_modifications_on_the_real_tokens():
    from postrain.trainers.token_level import modified_tokens, pair_difference_masks

    assert modified_tokens([1, 2, 3, 4], [1, 5, 3, 4, 6], {6}) == ([0, 1, 0, 0], [0, 1, 0, 0, 0])
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 9, (6,), generator=g).tolist()
    pairs = [(prompt + [5, 6, 7, 8, 9], prompt + [5, 7, 7, 9]), (prompt + [3, 3], prompt + [4, 3, 3, 3, 8])]
    stop = {7}
    for pad_right in (True, False):  # wherever the padding sits, the real tokens are compared
        rows = [c for c, _ in pairs] + [r for _, r in pairs]
        width = max(map(len, rows)) + 2
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        attention = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            at = slice(0, len(row)) if pad_right else slice(width - len(row), width)
            ids[i, at], attention[i, at] = torch.tensor(row), 1
        masks = pair_difference_masks(ids, attention, stop)
        for i, (chosen, rejected) in enumerate(pairs):
            want_rejected, want_chosen = authors_find_modifications(rejected, chosen, stop)
            assert masks[i][attention[i].bool()].tolist() == want_chosen
            assert masks[len(pairs) + i][attention[len(pairs) + i].bool()].tolist() == want_rejected
            assert masks[i][~attention[i].bool()].sum() == 0


def test_the_trainer_loss_is_the_entry_on_plain_forwards_and_the_authors_masks():
    from postrain.trainers.token_level import stopword_ids

    trainer = make_trainer([{"name": "bmc", "stopwords": ["+", "="], "beta": 0.5, "delta": 1.5}])
    tokenizer = trainer.processing_class
    stop = stopword_ids(tokenizer, ["+", "="])
    assert stop and trainer.token_inputs is not None and trainer.token_inputs.stopword_ids == stop
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)

    with torch.no_grad():
        ref = token_logps(full_logps(trainer.ref_model, batch), batch)
    policy = token_logps(full_logps(trainer.model, batch), batch)
    mask = batch["completion_mask"][:, 1:]
    n = batch["input_ids"].size(0) // 2
    marks = torch.zeros_like(batch["input_ids"], dtype=torch.float32)
    for i in range(n):
        c_at, r_at = batch["attention_mask"][i].bool(), batch["attention_mask"][n + i].bool()
        rej, cho = authors_find_modifications(batch["input_ids"][n + i][r_at].tolist(),
                                              batch["input_ids"][i][c_at].tolist(), stop)
        marks[i, c_at], marks[n + i, r_at] = torch.tensor(cho, dtype=torch.float32), torch.tensor(rej, dtype=torch.float32)
    marks = marks[:, 1:]
    assert 0 < float((marks * mask).sum()) < float(mask.sum())  # the pairs differ on some completion tokens only
    (pw, pl), (rw, rl), (mw, ml), (kw, kl) = pair(policy), pair(ref), pair(mask), pair(marks)
    want = PREFERENCE.call("bmc", {"chosen_token_logps": pw, "rejected_token_logps": pl, "ref_chosen_token_logps": rw,
                                   "ref_rejected_token_logps": rl, "chosen_mask": mw, "rejected_mask": ml,
                                   "chosen_diff_mask": kw, "rejected_diff_mask": kl}, {"beta": 0.5, "delta": 1.5})
    assert float(loss) == pytest.approx(float(want.mean()), rel=1e-5)


@pytest.mark.parametrize("extra, message", [
    ("loss: [{name: bmc, stopwords: english}]", r"loss\[0\].stopwords must be `nltk`"),
    ("loss: [{name: bmc, stopwords: [a]}, {name: bmc, stopwords: [b]}]", "one stopword list per batch"),
])
def test_load_time_refusals(tmp_path, extra, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(dpo_recipe(tmp_path, extra))


def test_the_nltk_list_is_refused_with_the_fix_where_its_corpus_is_missing(tmp_path):
    try:
        from nltk.corpus import stopwords

        stopwords.words("english")
        pytest.skip("nltk's stopwords corpus is installed here")
    except (ImportError, LookupError):
        pass
    with pytest.raises(RecipeError, match=r"loss\[0\].stopwords: `nltk` needs nltk and its stopwords corpus"):
        load_recipe(dpo_recipe(tmp_path, "loss: [{name: bmc}]"))
