"""GDPO (preference row 75): the entry and the DPO trainer's loss against GDPOTrainer.loss of the authors'
ggoggam/gdpo (src/algo/offline/gdpo.py, with mixin/utilities.py compute_token_logps), written out below as they
wrote it and run on the same logits. Their code squares and sums a residual at every position of its shifted mask;
postrain keeps the completion's transitions and leaves out the two terms their tensor layout adds (the residual
before the prompt's last token that their slid mask brings in, and the one past the completion's EOS on rows
shorter than the batch's longest): the tests check that these are exactly the positions that differ."""

from __future__ import annotations

import pytest
import torch

from postrain.errors import RecipeError
from postrain.preference.registry import PREFERENCE
from postrain.jobs import load_recipe
from tests.test_dpo_token_level import dpo_recipe, first_batch, make_trainer

V, EOS = 11, 10


def authors_compute_token_logps(logits, labels, slide_mask=False, temperature=1.0):
    """ComputeMixin.compute_token_logps, as the authors wrote it."""
    shifted_logps = (logits / temperature).log_softmax(dim=-1)[:, :-1, :]
    shifted_labels = labels[:, 1:].clone()
    mask = shifted_labels.not_equal(-100)
    shifted_labels[~mask] = 0
    logps = shifted_logps.gather(dim=-1, index=shifted_labels.unsqueeze(dim=-1)).squeeze(dim=-1)
    if slide_mask:
        first_unmasked = torch.nonzero(mask.cumsum(dim=1) == 1)
        first_unmasked[:, -1] -= 1
        mask[first_unmasked[:, 0], first_unmasked[:, 1]] = True
    return logps * mask, mask


def authors_detailed_balance(policy_logits, ref_logits, labels, eos_token_id, alpha, gamma, temperature=1.0):
    """GDPOTrainer.loss (chosen rows first, then rejected) up to `detailed_balance * mask[:, :-1]`, the residuals it
    squares, sums per row and averages; returned with its (slid) mask."""
    policy_logps, mask = authors_compute_token_logps(policy_logits, labels, True, temperature)
    with torch.no_grad():
        ref_logps, _ = authors_compute_token_logps(ref_logits, labels, True, temperature)
        log_rewards = ref_logps + (ref_logits / gamma).log_softmax(dim=-1)[:, :-1, eos_token_id]
        half = log_rewards.shape[0] // 2
        scores = torch.cat((log_rewards.new_full((half, 1), fill_value=0),
                            log_rewards.new_full((half, 1), fill_value=-8))) * alpha
        for i in range(len(log_rewards)):
            last_index = mask[i].nonzero()[-1]
            log_rewards[i, last_index] += scores[i]
    eos_logps = policy_logits.log_softmax(dim=-1)[:, :-1, eos_token_id]
    log_flows = log_rewards - eos_logps
    detailed_balance = log_flows[:, :-1] - log_flows[:, 1:] + policy_logps[:, :-1]
    return detailed_balance * mask[:, :-1], mask


def completion_transitions(shift_mask):
    """(N, L-2): the shifted positions t whose completion token has a next one, the transitions postrain keeps."""
    return shift_mask[:, :-1].bool() & shift_mask[:, 1:].bool()


def assert_left_out_terms_are_the_layout_artefacts(authors_mask, shift_mask):
    """Per row, the authors' residual positions are postrain's transitions plus the one before the prompt's last
    token (their slide) and, unless the row fills the tensor, the one at the completion's EOS."""
    width = shift_mask.size(1)  # L - 1
    for row in range(shift_mask.size(0)):
        at = shift_mask[row].nonzero().squeeze(-1)
        first, last = int(at[0]), int(at[-1])
        kept = set(range(first, last))
        assert set(completion_transitions(shift_mask)[row].nonzero().squeeze(-1).tolist()) == kept
        extra = {first - 1} | ({last} if last <= width - 2 else set())
        assert set(authors_mask[row, :-1].nonzero().squeeze(-1).tolist()) == kept | extra, row


def random_batch(seed=0):
    """Rows [chosen..., rejected...] as both the authors' collator and TRL lay them: prompt from position 0, then the
    completion ending with EOS, right padding (id 0); labels -100 off the completion."""
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [3, 5, 2, 4, 3, 6], [4, 2, 5, 3, 6, 2]  # row 4 fills the tensor (3 + 6 = 9 tokens)
    width = max(p + c for p, c in zip(prompts, completions))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :p + c] = torch.randint(1, EOS, (p + c,), generator=g)
        ids[i, p + c - 1] = EOS
        labels[i, p:p + c] = ids[i, p:p + c]
    policy = torch.randn(len(prompts), width, V, generator=g) * 2
    ref = torch.randn(len(prompts), width, V, generator=g) * 2
    return ids, labels, policy, ref


def entry_inputs(policy_logits, ref_logits, ids, shift_mask, gamma):
    """The data the trainer gives the entry, from logits: per-token log-probs and EOS log-probs at y_<t."""
    def tokens(logits):
        return logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * shift_mask

    pc, pr = tokens(policy_logits).chunk(2)
    rc, rr = tokens(ref_logits).chunk(2)
    ec, er = (policy_logits.log_softmax(-1)[:, :-1, EOS] * shift_mask).chunk(2)
    fc, fr = ((ref_logits / gamma).log_softmax(-1)[:, :-1, EOS] * shift_mask).chunk(2)
    mc, mr = shift_mask.chunk(2)
    return {"chosen_token_logps": pc, "rejected_token_logps": pr, "ref_chosen_token_logps": rc,
            "ref_rejected_token_logps": rr, "chosen_mask": mc, "rejected_mask": mr, "chosen_token_eos_logps": ec,
            "rejected_token_eos_logps": er, "ref_chosen_token_eos_logps": fc, "ref_rejected_token_eos_logps": fr}


@pytest.mark.parametrize("alpha, gamma", [(0.1, 0.1), (0.5, 1.0), (0.0, 0.3)])
def test_gdpo_is_the_authors_detailed_balance_on_the_completion_transitions(alpha, gamma):
    ids, labels, policy_logits, ref_logits = random_batch()
    policy_logits.requires_grad_(True)
    residuals, authors_mask = authors_detailed_balance(policy_logits, ref_logits, labels, EOS, alpha, gamma)
    shift_mask = (labels[:, 1:] != -100).float()
    assert_left_out_terms_are_the_layout_artefacts(authors_mask, shift_mask)
    per_row = (residuals.pow(2) * completion_transitions(shift_mask)).sum(-1)
    chosen_rows, rejected_rows = per_row.chunk(2)

    losses = PREFERENCE.call("gdpo", entry_inputs(policy_logits, ref_logits, ids, shift_mask, gamma),
                             {"alpha": alpha})
    torch.testing.assert_close(losses, (chosen_rows + rejected_rows) / 2, rtol=1e-5, atol=1e-5)
    # Their loss is the mean over the 2B rows; the registry's is the mean over pairs of the entry: the same gradient
    # (through π's token and EOS log-probs only: their log-reward is computed without one).
    got = torch.autograd.grad(losses.mean(), policy_logits, retain_graph=True)[0]
    want = torch.autograd.grad(per_row.mean(), policy_logits)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_left_out_residual_past_the_eos_moves_only_the_eos_probability_after_it():
    """Why the residual at the completion's EOS is left out: there log π(EOS | y_<EOS) enters log F and the transition
    alike and cancels, so its only gradient is through the policy's EOS log-prob one position past the EOS, a
    distribution generation never samples from."""
    ids, labels, policy_logits, ref_logits = random_batch()
    policy_logits.requires_grad_(True)
    residuals, _ = authors_detailed_balance(policy_logits, ref_logits, labels, EOS, 0.1, 0.1)
    shift_mask = labels[:, 1:] != -100
    row = 0
    last = int(shift_mask[row].nonzero()[-1])  # the shifted position predicting the EOS token
    assert last <= shift_mask.size(1) - 2  # a padded row: the authors' code squares this residual
    grad = torch.autograd.grad(residuals[row, last], policy_logits)[0]
    touched = (grad.abs().sum(-1) > 1e-6).nonzero().tolist()  # the two EOS terms cancel to rounding
    assert touched == [[row, last + 1]]  # logits at the EOS token itself: the state after the completion


def test_the_preference_score_enters_at_the_last_token_of_the_rejected_only():
    ids, labels, policy_logits, ref_logits = random_batch(seed=1)
    shift_mask = (labels[:, 1:] != -100).float()
    data = entry_inputs(policy_logits, ref_logits, ids, shift_mask, 0.1)
    base = PREFERENCE.call("gdpo", data, {"alpha": 0.0})
    scored = PREFERENCE.call("gdpo", data, {"alpha": 0.1})
    # alpha·(−8) lowers log F at the rejected's last token, which enters only the residual before it (by +0.8):
    # the difference is ½[(δ + 0.8)² − δ²] per pair, δ that residual without the score.
    residuals, _ = authors_detailed_balance(policy_logits, ref_logits, labels, EOS, 0.0, 0.1)
    last = shift_mask.size(1) - 1 - shift_mask.flip(1).argmax(1)  # each row's EOS position
    delta = residuals[torch.arange(len(last)), last - 1].chunk(2)[1]
    # float32 differences of losses in the hundreds: a tolerance relative to the losses themselves
    torch.testing.assert_close(scored - base, 0.5 * ((delta + 0.8) ** 2 - delta ** 2), rtol=1e-5,
                               atol=1e-5 * float(base.abs().max()))
    assert ((scored - base).abs() > 0.1).all()  # the score moves every pair's loss


def test_the_trainer_loss_is_the_authors_on_plain_forwards_of_the_tiny_models():
    trainer = make_trainer([{"name": "gdpo", "alpha": 0.5, "gamma": 0.3}])
    assert trainer.token_inputs is not None and trainer.token_inputs.full_vocab
    eos = trainer.processing_class.eos_token_id
    assert trainer.token_inputs.eos == {"token_id": eos, "gamma": 0.3}
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    params = [trainer.model.lm_head.weight, trainer.model.model.norm.weight]
    trainer_grads = torch.autograd.grad(loss, params)

    ids, completion = batch["input_ids"], batch["completion_mask"]
    shift_mask = completion[:, 1:]
    ends = completion.size(1) - 1 - completion.flip(1).argmax(1)
    assert (ids[torch.arange(len(ends)), ends] == eos).all()  # TRL ends each completion with EOS, as their template
    assert (completion.argmax(1) >= 2).all()  # prompts of 2+ tokens: their slid mask stays in the row
    labels = ids.masked_fill(completion == 0, -100)
    inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        ref_logits = trainer.ref_model(**inputs).logits.float()
    policy_logits = trainer.model(**inputs).logits.float()
    residuals, authors_mask = authors_detailed_balance(policy_logits, ref_logits, labels, eos, 0.5, 0.3)
    assert_left_out_terms_are_the_layout_artefacts(authors_mask, shift_mask)
    expected = (residuals.pow(2) * completion_transitions(shift_mask)).sum(-1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(trainer_grads, torch.autograd.grad(expected, params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_gdpo_trains_beside_ra_dpo_on_the_same_full_distributions():
    trainer = make_trainer([{"name": "gdpo"}, {"name": "ra_dpo", "weight": 0.5}], max_steps=2, logging_steps=1,
                           learning_rate=1e-3)
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.model.lm_head.weight.detach())
    logged = [h for h in trainer.state.log_history if "loss/gdpo" in h and "loss/ra_dpo" in h]
    assert logged and all(torch.isfinite(torch.tensor(h["loss/gdpo"])) for h in logged)
    assert trainer.token_inputs._policy_full is None and trainer.token_inputs._reference_eos is None


@pytest.mark.parametrize("extra, message", [
    ("loss: [{name: gdpo, gamma: 0}]", r"loss\[0\].gamma must be a positive number"),
    ("loss: [{name: gdpo, gamma: warm}]", r"loss\[0\].gamma must be a positive number"),
    ("loss: [{name: gdpo, alpha: -1.0}]", r"alpha"),
    ("loss: [{name: gdpo}, {name: gdpo, gamma: 0.5}]", "one reference EOS temperature per batch"),
    ("loss: [{name: gdpo}]\ntrainer: {precompute_ref_log_probs: true}",
     "per-token reference log-probs, which trainer.precompute_ref_log_probs does not keep"),
])
def test_load_time_refusals(tmp_path, extra, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(dpo_recipe(tmp_path, extra))


def test_gamma_is_a_trainer_input_not_a_loss_hyperparameter(tmp_path):
    from postrain.trainers.dpo import parse_losses

    recipe = load_recipe(dpo_recipe(tmp_path, "loss: [{name: gdpo, alpha: 0.2, gamma: 0.5}]"))
    (term,) = parse_losses(recipe.cfg["loss"], recipe.cfg["trainer"])
    assert term.params == {"alpha": 0.2} and term.inputs == {"gamma": 0.5}
