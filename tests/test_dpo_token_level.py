"""Token-level inputs of the DPO trainer (postrain.trainers.token_level): TGDPO's token rewards from a token reward
model, Ra-DPO's per-token risk ratios from full-vocabulary distributions. The trainer's loss on a batch equals the
registry entry called on inputs computed here independently (plain forwards of the tiny models, log-softmax,
gather); load-time refusals; TRL's source pinned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from postrain.errors import RecipeError
from postrain.jobs import load_recipe
from tests.conftest import TINY, source_digest, write_recipe

TINY_SPEC = {"name_or_path": "tiny", "dtype": "float32", "tiny": TINY}
TINY_MODEL = "model: {name_or_path: tiny, dtype: float32, tiny: %s}\n" % json.dumps(TINY)


def tiny(seed: int) -> dict:
    return {**TINY_SPEC, "tiny": {**TINY, "seed": seed}}


def make_trainer(losses, ref_seed: int = 1, **config):
    """A PostrainDPOTrainer on the tiny model (seed 0) with an explicit reference (another seed)."""
    import datasets
    from trl import DPOConfig

    from postrain.data.tasks import arithmetic
    from postrain.models.loading import load_model
    from postrain.trainers.dpo import PostrainDPOTrainer

    model, tokenizer, _ = load_model(TINY_SPEC)
    ref = load_model(tiny(ref_seed))[0]
    rows = datasets.Dataset.from_list(arithmetic(n=8, digits=1))
    args = DPOConfig(output_dir="/tmp/postrain-token-level-test", report_to="none", bf16=False, max_length=32,
                     save_strategy="no", per_device_train_batch_size=4, **config)
    return PostrainDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=rows, processing_class=tokenizer,
                              losses=losses)


def first_batch(trainer) -> dict:
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def full_logps(model, batch) -> torch.Tensor:
    """log π(· | y_<t) at every position predicting token t >= 1: a plain forward of the model, (N, L-1, V)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1].float().log_softmax(-1)


def token_logps(full: torch.Tensor, batch) -> torch.Tensor:
    mask = batch["completion_mask"][:, 1:]
    return full.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1) * mask


def pair(tensor):
    return tensor.chunk(2, dim=0)


# --- TGDPO -----------------------------------------------------------------------------------------------------------

def test_tgdpo_loss_equals_the_entry_on_independently_computed_token_rewards():
    from postrain.preference.pairwise_variants import tgdpo
    from postrain.models.loading import load_model

    trainer = make_trainer([{"name": "tgdpo", "token_reward_model": tiny(2), "alpha": 2.0}])
    assert trainer.token_inputs is not None and trainer.token_inputs.reward_model is not None
    assert not trainer.token_inputs.full_vocab  # TGDPO keeps TRL's fused head
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)

    reward_model = load_model(tiny(2))[0].eval()
    with torch.no_grad():
        ref = token_logps(full_logps(trainer.ref_model, batch), batch)
        rm = token_logps(full_logps(reward_model, batch), batch)
    policy = token_logps(full_logps(trainer.model, batch), batch)
    mask = batch["completion_mask"][:, 1:]
    (pc, pr), (rc, rr), (mc, mr) = pair(policy), pair(ref), pair(mask)
    wc, wr = pair(rm - ref)  # r̂_t = log π_rm − log π_ref
    expected = tgdpo(pc, pr, rc, rr, wc, wr, mc, mr, beta=0.1, alpha=2.0).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # The token rewards matter (another π_rm gives another loss) and carry no gradient.
    other = tgdpo(pc, pr, rc, rr, torch.zeros_like(wc), torch.zeros_like(wr), mc, mr, beta=0.1, alpha=2.0).mean()
    assert abs(other.item() - loss.item()) > 1e-4
    loss.backward()
    assert all(p.grad is None for p in trainer.token_inputs.reward_model.parameters())
    assert trainer.model.lm_head.weight.grad is not None or trainer.model.model.embed_tokens.weight.grad is not None


def test_tgdpo_trains_a_step(tmp_path):
    trainer = make_trainer([{"name": "tgdpo", "token_reward_model": tiny(2)}], max_steps=2, logging_steps=1,
                           learning_rate=1e-3)
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.model.lm_head.weight.detach())
    logged = [h for h in trainer.state.log_history if "loss/tgdpo" in h]
    assert logged and all(torch.isfinite(torch.tensor(h["loss/tgdpo"])) for h in logged)


# --- Ra-DPO ----------------------------------------------------------------------------------------------------------

def authors_calculate_cvar(reference_logps, policy_logps, reference_probs, confidence_level, split):
    """zlj123-max/Ra-DPO Ra_DPOTrainer.calculate_cvar (is_split_risk_ratio), written out here with torch.quantile."""
    distribution = reference_logps - policy_logps
    halves = [(0, distribution.size(2) // 2), (distribution.size(2) // 2, distribution.size(2))] if split \
        else [(0, distribution.size(2))]
    parts = []
    for start, end in halves:
        d, p = distribution[:, :, start:end], reference_probs[:, :, start:end]
        var = torch.quantile(d, 1 - confidence_level, dim=2).unsqueeze(-1)
        parts.append(p * d * (d > var).float())
    return torch.cat(parts, dim=2).sum(-1)


@pytest.mark.parametrize("settings", [{}, {"confidence_level": 0.7, "split_vocab": False, "ra_dpo2": True}])
def test_ra_dpo_loss_and_gradient_equal_the_entry_on_independent_full_distributions(settings):
    from postrain.preference.pairwise_variants import ra_dpo

    trainer = make_trainer([{"name": "ra_dpo", **settings}])
    assert trainer.token_inputs.full_vocab
    level, split = settings.get("confidence_level", 0.95), settings.get("split_vocab", True)
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    trainer_grads = torch.autograd.grad(loss, [trainer.model.lm_head.weight, trainer.model.model.norm.weight])

    with torch.no_grad():
        ref_full = full_logps(trainer.ref_model, batch)
    policy_full = full_logps(trainer.model, batch)
    mask = batch["completion_mask"][:, 1:]
    risk = authors_calculate_cvar(ref_full, policy_full, ref_full.exp(), level, split)
    policy, ref = token_logps(policy_full, batch), token_logps(ref_full, batch)
    (pc, pr), (rc, rr), (kc, kr), (mc, mr) = pair(policy.sum(1)), pair(ref.sum(1)), pair(risk), pair(mask)
    hyper = {k: v for k, v in settings.items() if k == "ra_dpo2"}
    expected = ra_dpo(pc, pr, rc, rr, kc, kr, mc, mr, **hyper).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    expected_grads = torch.autograd.grad(expected, [trainer.model.lm_head.weight, trainer.model.model.norm.weight])
    for got, want in zip(trainer_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # The risk term is not zero here (else the comparison would be DPO's).
    assert (kc * mc).sum().abs() > 1e-4
    # The logged per-token policy log-probs from the unfused forward are those of TRL's fused head.
    fused = trainer.model(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                          labels=batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
                          fused_lm_head=True).log_probs
    torch.testing.assert_close(fused * mask, policy, rtol=1e-5, atol=1e-5)


def test_the_quantile_is_torch_quantile():
    from postrain.trainers.token_level import _lower_tail_quantile

    x = torch.randn(3, 5, 259, generator=torch.Generator().manual_seed(0))
    for q in (0.05, 0.3, 0.5, 0.99, 0.0, 1.0):
        torch.testing.assert_close(_lower_tail_quantile(x, q), torch.quantile(x, q, dim=-1, keepdim=True))


def test_ra_dpo_trains_a_step():
    trainer = make_trainer([{"name": "ra_dpo"}, {"name": "dpo", "weight": 0.5}], max_steps=2, logging_steps=1,
                           learning_rate=1e-3)
    trainer.train()
    assert [h for h in trainer.state.log_history if "loss/ra_dpo" in h and "loss/dpo" in h]
    assert trainer.token_inputs._policy_full is None  # the (N, T, V) tensors are dropped after each batch


# --- load time -------------------------------------------------------------------------------------------------------

def dpo_recipe(tmp_path: Path, extra: str) -> Path:
    return write_recipe(tmp_path / "dpo.yaml", f"""command: dpo
defaults: [base/dpo]
{TINY_MODEL}data: {{train: {{source: "builtin:arithmetic", task: {{n: 8, digits: 1}}}}}}
{extra}""")


@pytest.mark.parametrize("extra, message", [
    ("loss: [{name: tgdpo}]", r"loss\[0\]: preference loss 'tgdpo' needs `token_reward_model:`"),
    ("loss: [{name: tgdpo, token_reward_model: runs/dpo}]", r"loss\[0\].token_reward_model must be a model"),
    ("loss: [{name: tgdpo, token_reward_model: {name_or_path: tiny, dtpye: float32}}]",
     r"unknown key 'loss\[0\].token_reward_model.dtpye'"),
    ("loss: [{name: tgdpo, token_reward_model: {name_or_path: a}}, {name: tgdpo, token_reward_model: {name_or_path: b}}]",
     "one token reward model per batch"),
    ("loss: [{name: ra_dpo, confidence_level: 95}]", r"loss\[0\].confidence_level must be a number in \(0, 1\)"),
    ("loss: [{name: ra_dpo, split_vocab: 1}]", r"loss\[0\].split_vocab must be true"),
    ("loss: [{name: ra_dpo}]\ntrainer: {precompute_ref_log_probs: true}",
     "risk ratios .* trainer.precompute_ref_log_probs"),
    ("loss: [{name: dpo, token_reward_model: {name_or_path: tiny}}]", "unknown parameter 'token_reward_model'"),
])
def test_load_time_refusals(tmp_path, extra, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(dpo_recipe(tmp_path, extra))


def test_the_inputs_are_split_off_the_loss_hyperparameters(tmp_path):
    from postrain.trainers.dpo import parse_losses

    recipe = load_recipe(dpo_recipe(tmp_path, "loss: [{name: tgdpo, alpha: 0.3, token_reward_model: "
                                              "{name_or_path: tiny}}, {name: ra_dpo, ra_dpo2: true}]"))
    tg, ra = parse_losses(recipe.cfg["loss"], recipe.cfg["trainer"])
    assert tg.params == {"alpha": 0.3} and tg.inputs == {"token_reward_model": {"name_or_path": "tiny"}}
    assert ra.params == {"ra_dpo2": True} and ra.inputs == {"confidence_level": 0.95, "split_vocab": True}


def test_a_missing_token_reward_model_path_fails_before_the_run_directory(tmp_path):
    from typer.testing import CliRunner

    from postrain.cli import app

    missing = tmp_path / "runs" / "nowhere"  # a local path (absolute): not looked up on the hub
    recipe = dpo_recipe(tmp_path, f"loss: [{{name: tgdpo, token_reward_model: {{name_or_path: {missing}}}}}]")
    result = CliRunner().invoke(app, ["dpo", str(recipe), f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code != 0
    assert "loss[0].token_reward_model.name_or_path" in result.output + str(result.exception)
    assert not (tmp_path / "run").exists()


# --- TRL source pins -------------------------------------------------------------------------------------------------

# sha256 of the TRL 1.16 methods postrain.trainers.token_level builds on. A change fails here: re-read the method and
# re-check token_level.py before updating the digest.
TRL_SOURCE = {
    # TokenLevelInputs.policy_forward copies its model keyword arguments (_non_model_keys, use_cache, router logits)
    "trl.trainer.dpo_trainer:DPOTrainer._compute_loss":
        "5e58a1699e0d76cd093095fa24cfe6ca5cb950fa73ad769d4e4c483d6ff722d2",
    # called with wrapper models (π_rm; the unfused reference): it must call the model once, keyword arguments
    # labels= and fused_lm_head=, and read `.log_probs`
    "trl.trainer.dpo_trainer:DPOTrainer.compute_ref_log_probs":
        "90611af9cbadb8ecfe0152f237177bea34072e989937cd6341632cb787dafe0a",
}


@pytest.mark.parametrize("reference", list(TRL_SOURCE))
def test_trl_methods_token_level_builds_on_are_unchanged(reference):
    qualname = reference.partition(":")[2]
    digest = source_digest(reference)
    assert digest == TRL_SOURCE[reference], f"TRL's {qualname} changed: re-check postrain/trainers/token_level.py"
