"""`logp_models:` (postrain.trainers.logp_models): further models' log-probs computed once before training, exactly
as the policy's (a copy of the policy gives the policy's step-0 log-probs), read by INPO (`prev`) and MRPO
(`references:`); load-time refusals; TRL's source pinned; an INPO pipeline of two rounds end to end."""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from postrain.cli import app
from postrain.errors import RecipeError
from postrain.jobs import load_recipe
from tests.conftest import REPO, TINY, write_recipe

runner = CliRunner()
TINY_SPEC = {"name_or_path": "tiny", "dtype": "float32", "tiny": TINY}
TINY_MODEL = "model: {name_or_path: tiny, dtype: float32, tiny: %s}\n" % json.dumps(TINY)


def make_trainer(losses, logp_models, ref_seed: int | None = None, n: int = 8):
    """A PostrainDPOTrainer on the tiny model that records the data each loss term is called with."""
    import datasets
    from trl import DPOConfig

    from postrain.data.tasks import arithmetic
    from postrain.models.loading import load_model
    from postrain.trainers.dpo import PostrainDPOTrainer

    class Recording(PostrainDPOTrainer):
        seen: dict = {}

        def _term_data(self, mode, key, term, data):
            out = super()._term_data(mode, key, term, data)
            self.seen = {k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()}
            return out

    model, tokenizer, _ = load_model(TINY_SPEC)
    ref = load_model({**TINY_SPEC, "tiny": {**TINY, "seed": ref_seed}})[0] if ref_seed is not None else None
    rows = datasets.Dataset.from_list(arithmetic(n=n, digits=1))
    args = DPOConfig(output_dir="/tmp/postrain-logp-test", report_to="none", bf16=False, max_length=32,
                     save_strategy="no", per_device_train_batch_size=4, per_device_eval_batch_size=3)
    return Recording(model=model, ref_model=ref, args=args, train_dataset=rows, eval_dataset=rows,
                     processing_class=tokenizer, losses=losses, logp_models=logp_models)


def step_zero_data(trainer, loader) -> list[dict]:
    """The data the loss saw on every batch of `loader`, from the untrained policy."""
    seen = []
    with torch.no_grad():
        for batch in loader:
            trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
            seen.append(trainer.seen)
    return seen


def test_a_copy_of_the_policy_scores_the_pairs_as_the_policy_does_at_step_zero():
    trainer = make_trainer([{"name": "inpo"}], {"prev": dict(TINY_SPEC), "other": {**TINY_SPEC, "tiny": {**TINY, "seed": 3}}})
    for split, dataset in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
        assert {"prev_chosen_logps", "prev_rejected_logps", "other_chosen_logps"} <= set(dataset.column_names), split
    # Training batches (shuffled, batch 4, their own padding) against the precompute (in order, batch 4 / 3).
    for data in step_zero_data(trainer, trainer.get_train_dataloader()) + step_zero_data(
            trainer, trainer.get_eval_dataloader()):
        torch.testing.assert_close(data["prev_chosen_logps"], data["chosen_logps"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(data["prev_rejected_logps"], data["rejected_logps"], rtol=1e-5, atol=1e-5)
    other = torch.tensor(trainer.train_dataset["other_chosen_logps"])
    assert (other - torch.tensor(trainer.train_dataset["prev_chosen_logps"])).abs().max() > 0.1  # another model
    # prev = ref = policy at step 0: INPO's loss is (1/(2η))² on every pair.
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader()))))
    assert loss.item() == pytest.approx((1 / (2 * 0.0075)) ** 2, rel=1e-3)


def test_mrpo_reads_its_further_reference_as_the_reference_forward_would_give_it():
    from postrain.preference import preference_loss

    # The main reference (ref_model, run on each batch) and the further one (precomputed) are the same model here.
    seven = {**TINY_SPEC, "tiny": {**TINY, "seed": 7}}
    trainer = make_trainer([{"name": "mrpo", "references": ["hermes"], "alpha": 0.5}], {"hermes": seven},
                           ref_seed=7)
    for data in step_zero_data(trainer, trainer.get_train_dataloader()):
        assert data["extra_ref_chosen_logps"].shape == (4, 1)
        torch.testing.assert_close(data["extra_ref_chosen_logps"][:, 0], data["ref_chosen_logps"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(data["extra_ref_rejected_logps"][:, 0], data["ref_rejected_logps"], rtol=1e-5,
                                   atol=1e-5)
        assert (data["ref_chosen_logps"] - data["chosen_logps"]).abs().max() > 0.1  # not the policy's
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)
    expected = preference_loss("mrpo", **trainer.seen, references=["hermes"], alpha=0.5).mean()
    torch.testing.assert_close(loss.detach(), expected.float(), rtol=1e-5, atol=1e-5)


def test_a_model_with_another_tokenizer_is_refused():
    from postrain.trainers.logp_models import _check_same_tokenizer

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

        def __len__(self):
            return len(self.vocab)

    class Trainer:
        processing_class = Tok({"a": 0, "b": 1})

    _check_same_tokenizer(Trainer(), "prev", Tok({"a": 0, "b": 1}))
    with pytest.raises(RecipeError, match="logp_models.prev: its tokenizer differs from the policy's"):
        _check_same_tokenizer(Trainer(), "prev", Tok({"a": 0, "c": 1}))


# --- load time ---------------------------------------------------------------------------------------------------

def dpo_recipe(tmp_path: Path, extra: str) -> Path:
    return write_recipe(tmp_path / "dpo.yaml", f"""
defaults: [base/dpo]
{TINY_MODEL}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 8, digits: 1}}}}}}
trainer: {{max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1, max_length: 32}}
{extra}
""")


PREV = "logp_models: {prev: {name_or_path: tiny}}"


@pytest.mark.parametrize("extra, message", [
    ("logp_models: {Prev: {name_or_path: tiny}}\nloss: [{name: inpo}]", "lower-case letters"),
    ("logp_models: {ref: {name_or_path: tiny}}\nloss: [{name: inpo}]", "the name 'ref' is taken"),
    (PREV, "only postrain's preference losses (`loss:`) read"),
    (PREV + "\nloss: [{name: dpo}]", "no `loss:` entry reads this model's log-probs (prev_chosen_logps"),
    ("logp_models: {prev: {name_or_path: tiny, dtyp: float32}}\nloss: [{name: inpo}]", "unknown key 'logp_models.prev.dtyp'"),
    ("loss: [{name: mrpo, references: [hermes]}]", "names 'hermes', which `logp_models:` does not define"),
    ("logp_models: {a: {name_or_path: tiny}, b: {name_or_path: tiny}}\nloss: [{name: mrpo, references: [a, b]}]",
     "exactly one further reference"),
    ("loss: [{name: mrpo}]", "needs 'references'"),
    ("logp_models: {prev: {name_or_path: tiny}}\nloss: [{name: kto}]", "computed for preference pairs"),
])
def test_bad_logp_models_fail_at_load_time(tmp_path, extra, message):
    with pytest.raises(RecipeError, match=None) as info:
        load_recipe(dpo_recipe(tmp_path, extra))
    assert message in str(info.value)


def test_good_logp_models_load(tmp_path):
    cfg = load_recipe(dpo_recipe(tmp_path, PREV + "\nloss: [{name: inpo}]")).cfg
    assert cfg["logp_models"] == {"prev": {"name_or_path": "tiny"}}
    load_recipe(dpo_recipe(tmp_path, "logp_models: {hermes: {name_or_path: tiny}}\n"
                                     "loss: [{name: mrpo, references: [hermes]}]"))


# --- end to end --------------------------------------------------------------------------------------------------

def test_postrain_dpo_with_inpo_reads_prev_from_logp_models(tmp_path):
    # Without logp_models the data lacks INPO's prev columns: refused before anything is written.
    recipe = dpo_recipe(tmp_path, "loss: [{name: inpo}]")
    refused = runner.invoke(app, ["dpo", str(recipe), f"output_dir={tmp_path / 'refused'}"])
    assert refused.exit_code != 0 and "prev_chosen_logps" in refused.output and not (tmp_path / "refused").exists()
    recipe = dpo_recipe(tmp_path, "logp_models: {prev: {name_or_path: tiny, dtype: float32, tiny: %s}}\n"
                                  "loss: [{name: inpo}]" % json.dumps(TINY))
    result = runner.invoke(app, ["dpo", str(recipe), f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "loss/inpo" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert steps[0]["loss/inpo"] == pytest.approx((1 / (2 * 0.0075)) ** 2, rel=1e-3)  # prev = ref = policy


def test_inpo_pipeline_runs_two_rounds_end_to_end(tmp_path):
    """recipes/papers/inpo.yaml's stages on the tiny model: round 2 trains the round-1 model against the SFT model
    (ref_model) and the round-1 model (prev)."""
    out = tmp_path / "inpo"
    inpo, demo = REPO / "recipes" / "papers" / "inpo", REPO / "recipes" / "demo"
    tiny = json.dumps(TINY)
    small_sft = (f'{{model.tiny: {tiny}, data.train.task: {{digits: 1, n: 64}}, trainer.max_steps: 10, '
                 f'trainer.per_device_train_batch_size: 16, trainer.learning_rate: 1.0e-2}}')
    rewards = "[{name: exact_match, args: {extract: full}}, {name: length, weight: 0.1, args: {target: 2}}]"

    def sample(model: str, seed: int) -> str:
        return (f'{{model: {{name_or_path: "{model}", dtype: float32}}, sets.prompts: {{source: "builtin:arithmetic", '
                f'config: null, split: train, columns: {{prompt: prompt, answer: answer}}, chat: false, system_prompt: null, '
                f'task: {{digits: 1, n: 16, seed: {seed}}}}}, generation: {{max_new_tokens: 8, batch_size: 32, '
                f'num_samples: 4}}, rewards: {rewards}}}')

    def train(model: str, samples: str) -> str:
        spec = lambda path: f'{{name_or_path: "{path}", dtype: float32}}'
        return (f'{{model: {spec(model)}, ref_model: {spec("${stages.sft.output}")}, '
                f'logp_models: {{prev: {spec(model)}}}, data.train: {{source: "{samples}/samples.jsonl", chat: false, '
                # these samples are scored by exact_match and length, not by the recipe's judge
                f'pairing: {{score: score}}}}, '
                f'trainer: {{max_steps: 3, per_device_train_batch_size: 8, gradient_accumulation_steps: 1, '
                f'logging_steps: 1, max_length: 32, bf16: false}}}}')

    pipe = write_recipe(tmp_path / "pipeline.yaml", f"""
command: pipeline
name: inpo
output_dir: {out}
stages:
  sft: {{command: sft, recipe: {demo / 'sft.yaml'}, overrides: {small_sft}}}
  sample_r1: {{command: eval, recipe: {inpo / 'sample.yaml'}, report: false, overrides: {sample('${stages.sft.output}', 11)}}}
  train_r1: {{command: dpo, recipe: {inpo / 'train.yaml'}, overrides: {train('${stages.sft.output}', '${stages.sample_r1.output}')}}}
  sample_r2: {{command: eval, recipe: {inpo / 'sample.yaml'}, report: false, overrides: {sample('${stages.train_r1.output}', 12)}}}
  train_r2: {{command: dpo, recipe: {inpo / 'train.yaml'}, overrides: {train('${stages.train_r1.output}', '${stages.sample_r2.output}')}}}
""")
    result = runner.invoke(app, ["run", str(pipe)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    import yaml

    for stage, start in (("train_r1", "sft"), ("train_r2", "train_r1")):
        cfg = yaml.safe_load((out / stage / "recipe.yaml").read_text())
        assert cfg["loss"][0]["name"] == "inpo"
        assert cfg["model"]["name_or_path"] == cfg["logp_models"]["prev"]["name_or_path"] == str(out / start)
        assert cfg["ref_model"]["name_or_path"] == str(out / "sft")  # pi_ref stays the SFT model
        logged = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss/inpo"] for m in logged if "loss/inpo" in m]
        assert len(losses) == 3 and all(v == v and v < float("inf") for v in losses)
    lineage = {s["stage"]: s for s in json.loads((out / "lineage.json").read_text())}
    assert set(lineage["train_r2"]["upstream"]) == {"sft", "train_r1", "sample_r2"}


# --- TRL source pins -----------------------------------------------------------------------------------------------

# sha256 of the TRL 1.16 methods postrain.trainers.logp_models builds on. A change fails here: re-read the method
# and re-check logp_models.py (and the step-zero identity test above) before updating the digest.
TRL_SOURCE = {
    # the reference forward the columns must agree with (no grad, autocast, the collator's non-model keys left out,
    # summed over the completion mask): logp_models.pair_logps does the same with postrain.models.generation
    "compute_ref_log_probs": "90611af9cbadb8ecfe0152f237177bea34072e989937cd6341632cb787dafe0a",
    # its batching is mirrored (in order, the trainer's collator, gather_for_metrics) without its disk cache
    "_precompute_ref_logps": "f2c098c7da6ca701978f476021fbb9482837dee4b83cc04b98ca2a214e856e4d",
}


@pytest.mark.parametrize("method", list(TRL_SOURCE))
def test_trl_methods_logp_models_builds_on_are_unchanged(method):
    from trl.trainer.dpo_trainer import DPOTrainer

    digest = hashlib.sha256(inspect.getsource(getattr(DPOTrainer, method)).encode()).hexdigest()
    assert digest == TRL_SOURCE[method], f"TRL's DPOTrainer.{method} changed: re-check postrain/trainers/logp_models.py"
