"""PostrainDPOTrainer: registry losses computed from one log-prob pass, equal to TRL's own where TRL has them;
no reference forward for reference-free losses; load-time refusals; TRL's source pinned; a run that learns."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from postrain.cli import app
from postrain.errors import RecipeError
from postrain.jobs import load_recipe
from tests.conftest import TINY, source_digest, write_recipe

runner = CliRunner()
TINY_SPEC = {"name_or_path": "tiny", "dtype": "float32", "tiny": TINY}
TINY_MODEL = "model: {name_or_path: tiny, dtype: float32, tiny: %s}\n" % json.dumps(TINY)


def make_trainer(losses, dataset=None, ref_seed: int | None = 5, **config):
    """A PostrainDPOTrainer on the tiny model; the reference is another tiny model (seed `ref_seed`), so that
    log-ratios are not all zero, or TRL's implicit copy of the policy (ref_seed None)."""
    import datasets
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DPOConfig

    from postrain.data.tasks import arithmetic
    from postrain.models.loading import load_model
    from postrain.trainers.dpo import PostrainDPOTrainer

    model, tokenizer, _ = load_model(TINY_SPEC)
    ref = load_model({**TINY_SPEC, "tiny": {**TINY, "seed": ref_seed}})[0] if ref_seed is not None else None
    if dataset is None:
        dataset = datasets.Dataset.from_list(arithmetic(n=8, digits=1))
    config = {"output_dir": "/tmp/postrain-dpo-test", "per_device_train_batch_size": 8, "logging_steps": 1, **config}
    args = DPOConfig(report_to="none", bf16=False, max_length=32, save_strategy="no",
                     **{**config, "output_dir": str(config["output_dir"])})
    trainer = PostrainDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=dataset,
                                 processing_class=tokenizer, losses=losses)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


@pytest.fixture(scope="module")
def trainer():
    # `wpo` at construction: the fused LM head then also computes log Σπ², which TRL's use_weighting reads too
    return make_trainer([{"name": "wpo"}])


@pytest.fixture(scope="module")
def batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def terms(*entries):
    from postrain.trainers.dpo import parse_losses

    return parse_losses(list(entries))


@contextmanager
def registry_losses(trainer, *entries):
    saved = trainer.loss_terms
    trainer.loss_terms = terms(*entries)
    try:
        yield
    finally:
        trainer.loss_terms = saved


@contextmanager
def trl_options(trainer, **options):
    """TRL's own loss path (no registry losses) with these DPOTrainer attributes."""
    names = {"discopop_tau"}
    saved = {k: getattr(trainer.args if k in names else trainer, k) for k in options}
    saved_terms, trainer.loss_terms = trainer.loss_terms, []
    for k, v in options.items():
        setattr(trainer.args if k in names else trainer, k, v)
    try:
        yield
    finally:
        trainer.loss_terms = saved_terms
        for k, v in saved.items():
            setattr(trainer.args if k in names else trainer, k, v)


def loss_and_grads(trainer, batch):
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(trainer.model, batch)
    return loss.detach(), torch.autograd.grad(loss, params)


TRL = dict(loss_types=["sigmoid"], loss_weights=[1.0], beta=0.1, label_smoothing=0.0, ld_alpha=None,
           use_weighting=False, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05)
# registry entry (with its hyperparameters) -> TRL 1.16 options computing the same loss
SAME_AS_TRL = [
    ({"name": "dpo", "beta": 0.1}, {"loss_types": ["sigmoid"]}),
    ({"name": "ipo_token_mean", "beta": 0.1}, {"loss_types": ["ipo"]}),
    ({"name": "robust", "beta": 0.1, "label_smoothing": 0.1}, {"loss_types": ["robust"], "label_smoothing": 0.1}),
    ({"name": "hinge", "beta": 0.1}, {"loss_types": ["hinge"]}),
    ({"name": "sigmoid_norm", "beta": 0.5}, {"loss_types": ["sigmoid_norm"], "beta": 0.5}),
    ({"name": "exo_pair", "beta": 0.1, "label_smoothing": 0.01}, {"loss_types": ["exo_pair"], "label_smoothing": 0.01}),
    ({"name": "nca_pair", "beta": 0.1}, {"loss_types": ["nca_pair"]}),
    ({"name": "sppo_hard", "beta": 0.1}, {"loss_types": ["sppo_hard"]}),
    ({"name": "aot", "beta": 0.1}, {"loss_types": ["aot"]}),
    ({"name": "aot_unpaired", "beta": 0.1}, {"loss_types": ["aot_unpaired"]}),
    ({"name": "apo_zero", "beta": 0.1}, {"loss_types": ["apo_zero"]}),
    ({"name": "apo_down", "beta": 0.1}, {"loss_types": ["apo_down"]}),
    ({"name": "discopop", "beta": 0.1, "tau": 0.2}, {"loss_types": ["discopop"], "discopop_tau": 0.2}),
    ({"name": "fdpo_forward_kl", "beta": 0.1}, {"f_divergence_type": "forward_kl"}),
    ({"name": "fdpo_js", "beta": 0.1}, {"f_divergence_type": "js_divergence"}),
    ({"name": "fdpo_alpha", "beta": 0.1, "alpha": 0.3},
     {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.7}),
    ({"name": "ld_dpo", "beta": 0.1, "alpha": 0.5}, {"ld_alpha": 0.5}),
]


@pytest.mark.parametrize("entry,options", SAME_AS_TRL, ids=[e["name"] for e, _ in SAME_AS_TRL])
def test_registry_loss_equals_trl_loss_type_value_and_gradient(trainer, batch, entry, options):
    with registry_losses(trainer, entry):
        ours, our_grads = loss_and_grads(trainer, batch)
    with trl_options(trainer, **{**TRL, **options}):
        theirs, their_grads = loss_and_grads(trainer, batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_wpo_is_trls_use_weighting_with_the_authors_clamp(trainer, batch):
    """The WPO authors clamp the pair weight at 1; TRL 1.16's use_weighting does not. Per pair, weight ≤ 1 and
    the loss is ≥ 0, so the clamped loss is at most TRL's and at most DPO's with the same β."""
    with registry_losses(trainer, {"name": "wpo", "beta": 0.1}):
        ours = trainer.compute_loss(trainer.model, batch).item()
    with trl_options(trainer, **{**TRL, "use_weighting": True}):
        theirs = trainer.compute_loss(trainer.model, batch).item()
    with registry_losses(trainer, {"name": "dpo", "beta": 0.1}):
        dpo = trainer.compute_loss(trainer.model, batch).item()
    assert 0 < ours <= theirs + 1e-6 and ours <= dpo + 1e-6


def test_reference_free_losses_make_no_reference_forward(trainer, batch):
    calls = []
    handle = trainer.ref_model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for entry, expected in [({"name": "simpo"}, 0), ({"name": "orpo"}, 0), ({"name": "dpo"}, 1),
                                ({"name": "simpo"}, 0), ({"name": "ld_dpo"}, 1)]:
            calls.clear()
            with registry_losses(trainer, entry):
                trainer.compute_loss(trainer.model, batch)
            assert len(calls) == expected, (entry, calls)
    finally:
        handle.remove()


def test_weighted_combination_is_the_weighted_sum_of_single_loss_means(trainer, batch):
    entries = [{"name": "dpo", "weight": 0.7}, {"name": "simpo", "weight": 0.3, "beta": 2.5},
               {"name": "dpo", "weight": 2.0, "beta": 0.5}]
    single = []
    for entry in entries:
        with registry_losses(trainer, {**entry, "weight": 1.0}):
            single.append(trainer.compute_loss(trainer.model, batch).item())
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode].clear()
    with registry_losses(trainer, *entries):
        combined = trainer.compute_loss(trainer.model, batch).item()
    expected = sum(e["weight"] * v for e, v in zip(entries, single))
    assert combined == pytest.approx(expected, rel=1e-5)
    assert len(set(round(v, 5) for v in single)) == 3  # three different losses, so the weights are tested
    logged = trainer._metrics[mode]
    assert logged["loss/dpo"] == pytest.approx([single[0]]) and logged["loss/simpo"] == pytest.approx([single[1]])
    assert logged["loss/dpo_2"] == pytest.approx([single[2]])
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert len(logged[key]) == 1, key
    # the reference is another model, so log-ratios are not all zero (the equality tests above compare real values)
    assert abs(logged["rewards/margins"][0]) > 1e-3


def test_score_columns_reach_the_loss_through_the_collator():
    import datasets

    from postrain.data.tasks import arithmetic

    rows = [{**r, "score_chosen": 1.0 + i, "score_rejected": 0.25 * i} for i, r in enumerate(arithmetic(n=8, digits=1))]
    trainer = make_trainer([{"name": "odpo"}], dataset=datasets.Dataset.from_list(rows))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert sorted(batch["score_chosen"].tolist()) == [1.0 + i for i in range(8)]
    assert sorted(batch["score_rejected"].tolist()) == [0.25 * i for i in range(8)]
    loss = trainer.compute_loss(trainer.model, batch)  # the model never sees the score columns
    shifted = {**batch, "score_chosen": batch["score_chosen"] + 5.0}
    assert torch.isfinite(loss) and trainer.compute_loss(trainer.model, shifted).item() != pytest.approx(loss.item())


# --- load-time refusals -------------------------------------------------------------------------------------------


def dpo_recipe(tmp_path: Path, extra: str) -> Path:
    return write_recipe(tmp_path / "dpo.yaml", f"defaults: [base/dpo]\n{TINY_MODEL}{extra}\n")


@pytest.mark.parametrize("extra,message", [
    ("loss: [{name: simpoo}]", r"unknown preference loss 'simpoo' \(loss\[0\]\): did you mean 'simpo'"),
    ("loss: [{name: simpo, gama: 1.0}]", r"unknown parameter 'gama' for preference loss 'simpo' \(loss\[0\]\): "
                                         r"did you mean 'gamma'"),
    ("loss: [{name: simpo, weight: heavy}]", r"loss\[0\].weight must be a number"),
    ("loss: [{beta: 0.1}]", r"loss\[0\] must be a mapping with a `name:`"),
    ("loss: [{name: simpo}]\ntrainer: {loss_type: [ipo]}", r"both `loss:` and trainer.loss_type=\['ipo'\].*keep one"),
    ("loss: [{name: dpo}]\ntrainer: {ld_alpha: 0.5}", r"trainer.ld_alpha=0.5.*`ld_dpo`"),
    ("loss: [{name: dpo}]\ntrainer: {use_weighting: true}", r"trainer.use_weighting=True.*`wpo`"),
    ("loss: [{name: dpo}]\ntrainer: {f_divergence_type: js_divergence}", r"f_divergence_type.*`fdpo_js`"),
    ("loss: [{name: dpo}]\ntrainer: {beta: 0.5}", r"trainer.beta=0.5.*set `beta:` on each `loss:` entry"),
    ("loss: [{name: dpo}]\ntrainer: {loss_weights: [2.0]}", r"trainer.loss_weights.*`weight:`"),
    ("loss: [{name: dmpo}]\ntrainer: {truncation_mode: keep_end}", r"truncation_mode='keep_end' with 'dmpo'"),
    ("loss: [{name: kto}, {name: dpo}]", r"`loss:` mixes data shapes \(loss\[0\] 'kto' reads unpaired labelled "
                                         r"completions .*; loss\[1\] 'dpo' reads preference pairs"),
    ("loss: [{name: r_dpo}]", r"'r_dpo' needs 'alpha' \(its paper gives no default\)"),
    ("loss: [{name: ld_dpo}]\ntrainer: {precompute_ref_log_probs: true}", r"'ld_dpo' reads per-token reference"),
])
def test_bad_loss_sections_fail_at_load_time(tmp_path, monkeypatch, extra, message):
    import postrain.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(RecipeError, match=message):
        load_recipe(dpo_recipe(tmp_path, extra))


def test_good_loss_section_loads_with_the_base_recipes_trl_defaults(tmp_path):
    # base/dpo sets trainer.beta: 0.1 and loss_type: [sigmoid], TRL's defaults: not a conflict
    recipe = load_recipe(dpo_recipe(tmp_path, "loss: [{name: simpo, weight: 0.5, beta: 2.0, gamma: 1.0}, {name: odpo}]"))
    assert recipe.cfg["loss"][0] == {"name": "simpo", "weight": 0.5, "beta": 2.0, "gamma": 1.0}


# --- TRL source pins -------------------------------------------------------------------------------------------------

# sha256 of the source of each TRL 1.16 method postrain.trainers.dpo copies from, calls or overrides. A change
# fails here: re-read the method and re-check postrain/trainers/dpo.py before updating the digest.
TRL_DPO_SOURCE = {
    # overridden, and its policy forward (first ~17 lines) copied
    "trl.trainer.dpo_trainer:DPOTrainer._compute_loss":
        "5e58a1699e0d76cd093095fa24cfe6ca5cb950fa73ad769d4e4c483d6ff722d2",
    # called with a wrapper model: it must run the model once and read `.log_probs`
    "trl.trainer.dpo_trainer:DPOTrainer.compute_ref_log_probs":
        "90611af9cbadb8ecfe0152f237177bea34072e989937cd6341632cb787dafe0a",
    # extended (signature columns) and overridden (__init__: attributes read, collator built, fused head added)
    "trl.trainer.dpo_trainer:DPOTrainer._set_signature_columns_if_needed":
        "71225a628baed4cb39147a4d594b56a5f86c68a2397466f8a23aebcdee9414a9",
    "trl.trainer.dpo_trainer:DPOTrainer.__init__":
        "632f447c71dcb04361800303be2192d8e48b2b3ccffd415fbf639c03a5dfd84f",
    # wrapped: it drops columns other than the token ids, so the trainer adds the per-pair columns itself
    "trl.trainer.dpo_trainer:DataCollatorForPreference.torch_call":
        "0b8bb4c294bf8420e407a8ba9fa616ec301054bf317441a3ff9893b9eb143a70",
    # called again for WPO's log Σπ²: a second call must replace the head with one computing the new outputs
    "trl.trainer.utils:add_fused_lm_head": "422d009f04b66659982f9545a90d560bdcc27fde3268de203d0c5c6d1449d211",
}


@pytest.mark.parametrize("reference", list(TRL_DPO_SOURCE))
def test_trl_dpo_methods_postrain_builds_on_are_unchanged(reference):
    qualname = reference.partition(":")[2]
    digest = source_digest(reference)
    assert digest == TRL_DPO_SOURCE[reference], f"TRL's {qualname} changed: re-check postrain/trainers/dpo.py"


# --- end to end ------------------------------------------------------------------------------------------------------


def test_postrain_dpo_with_a_registry_loss_runs_and_logs_it(tmp_path):
    recipe = dpo_recipe(tmp_path, """data: {train: {source: "builtin:arithmetic", task: {n: 8, digits: 1}}}
trainer: {max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1, max_length: 32}
loss: [{name: simpo, beta: 2.0, gamma: 1.0}]""")
    result = runner.invoke(app, ["dpo", str(recipe), f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "loss/simpo" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(m["loss"] == pytest.approx(m["loss/simpo"], rel=1e-4) for m in steps)
    assert "rewards/chosen" not in steps[0] and "logps/chosen" in steps[0]  # reference-free: no implicit reward


def test_postrain_dpo_refuses_a_loss_whose_columns_the_data_lacks_before_writing(tmp_path):
    pairs = tmp_path / "pairs.jsonl"  # pairs without the scores ODPO's offset reads
    pairs.write_text("".join(json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i)}) + "\n"
                             for i in range(8)))
    recipe = dpo_recipe(tmp_path, f"""data: {{train: {{source: "{pairs}"}}}}
loss: [{{name: odpo}}]""")
    result = runner.invoke(app, ["dpo", str(recipe), f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "'odpo' (loss[0]) reads the column(s) score_chosen, score_rejected" in result.output
    assert not (tmp_path / "run").exists()


# --- learning --------------------------------------------------------------------------------------------------------

# Ten registry losses, each trained from the random tiny model on the built-in 1-digit additions (chosen = the sum,
# rejected = the sum ±1 / ±10; every wrong answer of each training problem, so 63 problems × 4 pairs).
# Calibrated with 80 steps at lr 1e-2 over seeds 0, 1, 2 with ATEN_CPU_CAPABILITY=default (and seed 0 natively):
# the loss (mean of the first vs the last 5 logged) fell by ≥ 0.3% in every run (nca_pair, whose loss
# stays near log 4; bco_pair 1.1%; most 15–40%); the
# mean log-prob margin chosen − rejected on held-out problems rose from ~0.8 by ≥ 0.6 (sigmoid_norm; dpo +4 to +9);
# the preference accuracy on the training pairs rose by ≥ 0.028 (exo_pair; 0.59–0.65 → 0.68–0.82). The accuracy on
# held-out problems moved by −0.01 to +0.13 only (a 1-layer model does not learn addition in 80 steps), so it is
# not asserted. apo_zero was left out: on seed 1 its loss barely moved and its training accuracy fell.
LEARNING_LOSSES = ["dpo", "ipo_token_mean", "robust", "hinge", "sigmoid_norm", "exo_pair", "nca_pair", "bco_pair",
                   "simpo", "orpo"]


def _all_wrong_answers(rows):
    return [{**r, "rejected": str(int(r["answer"]) + d)} for r in rows for d in (-10, -1, 1, 10)]


def _pair_logps(trainer, dataset):
    prepared = trainer._prepare_dataset(dataset, trainer.processing_class, trainer.args, "pairs")
    batch = trainer.data_collator([prepared[i] for i in range(len(prepared))])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                            fused_lm_head=True)
    return out.log_probs.sum(dim=1).chunk(2)


def _preference(trainer, dataset):
    chosen, rejected = _pair_logps(trainer, dataset)
    return (chosen > rejected).float().mean().item(), (chosen - rejected).mean().item()


@pytest.mark.slow
def test_short_runs_with_ten_registry_losses_learn_the_preference(tmp_path):
    import datasets

    from postrain.data.tasks import arithmetic

    train = datasets.Dataset.from_list(_all_wrong_answers(arithmetic(n=1000, digits=1, test_fraction=0.3)))
    held_out = datasets.Dataset.from_list(
        _all_wrong_answers(arithmetic(split="test", n=1000, digits=1, test_fraction=0.3)))
    assert not set(train["prompt"]) & set(held_out["prompt"])
    for name in LEARNING_LOSSES:
        trainer = make_trainer([{"name": name}], dataset=train, ref_seed=None, output_dir=tmp_path / name,
                               per_device_train_batch_size=16, max_steps=80, learning_rate=1e-2,
                               lr_scheduler_type="constant", seed=0)
        train_acc, _ = _preference(trainer, train)
        _, margin = _preference(trainer, held_out)
        trainer.train()
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        first, last = sum(logged[:5]) / 5, sum(logged[-5:]) / 5
        train_acc_after, _ = _preference(trainer, train)
        _, margin_after = _preference(trainer, held_out)
        assert last < first - 0.001 * abs(first), (name, first, last)
        assert margin_after > margin + 0.3, (name, margin, margin_after)
        assert train_acc_after > train_acc + 0.01, (name, train_acc, train_acc_after)
