"""A recipe's `loss:` / `rl:` sections are parsed once (postrain.recipes.sections): the job's check parses them, and
liveness, the dry-run plan (batch unit, memory estimate), the run and the trainer read that parse. A kept parse is
never stale: a Recipe with another cfg, a cfg changed in place, a pipeline stage, the --smoke layer and a
command-line override each get the parse of their own settings."""

from __future__ import annotations

import dataclasses

import pytest

from postrain.preference import section as loss_section
from postrain.rl import section as rl_section
from postrain.trainers import dpo as dpo_trainer, grpo as grpo_trainer
from postrain.errors import RecipeError
from postrain.jobs import load_recipe, load_smoke_recipe
from postrain.jobs.pipeline import stage_recipe
from postrain.jobs.plan import plan
from postrain.recipes import Recipe
from postrain.recipes.sections import loss_terms, rl_parts
from tests.conftest import REPO, postrain, write_recipe

DPO_RECIPE = "recipes/papers/mrpo.yaml"  # loss: read by the checks of loss: and logp_models:, liveness, batch unit
GRPO_RECIPE = "recipes/papers/kl_regularized_pg.yaml"  # rl: read by its check, liveness, the memory plan (KL)
# The shipped recipes' hub models, replaced by a local one so that the dry run's memory plan reads its size.
LOCAL_MODEL = ["model.name_or_path=tiny", "model.dtype=float32", "trainer.bf16=false"]


@pytest.fixture
def parses(monkeypatch):
    """How many times each section's parser ran, counted wherever it is looked up: in its own module (what
    postrain.recipes.sections and the checks call) and where the trainers bound it at import."""
    counts = {"loss": 0, "rl": 0}

    def counting(name, real):
        def parse(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return parse

    loss = counting("loss", loss_section.parse_losses)
    rl = counting("rl", rl_section.parse_rl_section)
    monkeypatch.setattr(loss_section, "parse_losses", loss)
    monkeypatch.setattr(dpo_trainer, "parse_losses", loss)
    monkeypatch.setattr(rl_section, "parse_rl_section", rl)
    monkeypatch.setattr(grpo_trainer, "parse_rl_section", rl)
    return counts


def test_load_and_dry_run_parse_the_loss_section_once(parses):
    rows = plan(load_recipe(DPO_RECIPE, LOCAL_MODEL))  # what `postrain dpo ... --dry-run` does
    assert "global batch (preference pairs per optimizer step)" in rows  # the batch unit, from the parsed terms
    assert parses == {"loss": 1, "rl": 0}


def test_load_and_dry_run_parse_the_rl_section_once(parses):
    rows = plan(load_recipe(GRPO_RECIPE, LOCAL_MODEL))
    assert "reference model" in rows["memory per device (training state)"]  # the memory plan read the KL term
    assert parses == {"loss": 0, "rl": 1}


def record_init(monkeypatch, trainer_cls, attribute: str) -> list:
    """What each `trainer_cls` built in the test holds as `attribute` once constructed."""
    seen = []
    real = trainer_cls.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(getattr(self, attribute))

    monkeypatch.setattr(trainer_cls, "__init__", init)
    return seen


def test_a_dpo_run_parses_once_and_its_trainer_gets_the_command_lines_loss(parses, monkeypatch, tmp_path):
    """The weight and beta come from a command-line override of the shipped recipe's `loss:`: the trainer trains
    with them (a parse of the recipe as written would give weight 1.0, beta 0.1)."""
    seen = record_init(monkeypatch, dpo_trainer.PostrainDPOTrainer, "loss_terms")
    postrain("dpo", "recipes/papers/cdpo.yaml", "--smoke", f"output_dir={tmp_path / 'run'}",
             "loss=[{name: cdpo, weight: 0.25, beta: 0.3, label_smoothing: 0.1}]", "trainer.max_steps=1")
    assert [[(t.name, t.weight, t.params) for t in terms] for terms in seen] == [
        [("cdpo", 0.25, {"beta": 0.3, "label_smoothing": 0.1})]]
    assert parses == {"loss": 1, "rl": 0}


def test_a_grpo_run_parses_once_and_its_trainer_gets_those_parts(parses, monkeypatch, tmp_path):
    seen = record_init(monkeypatch, grpo_trainer.PostrainGRPOTrainer, "rl_parts")
    postrain("grpo", GRPO_RECIPE, "--smoke", f"output_dir={tmp_path / 'run'}", "trainer.max_steps=1",
             "rl.regularizers=[{name: kl_k2, beta: 0.02}]")
    assert [[(p.name, p.params) for p in parts.regularizers] for parts in seen] == [[("kl_k2", {"beta": 0.02})]]
    assert parses == {"loss": 0, "rl": 1}


def cdpo(tmp_path, weight: float = 1.0) -> Recipe:
    path = write_recipe(tmp_path / "cdpo.yaml", f"""
defaults: [{REPO / 'recipes/papers/cdpo.yaml'}]
loss: [{{name: cdpo, weight: {weight}, beta: 0.1, label_smoothing: 0.1}}]
""")
    return load_recipe(path, liveness=False)


def test_a_recipe_with_another_cfg_never_reads_the_parse_of_the_first(tmp_path, parses):
    recipe = cdpo(tmp_path)
    assert loss_terms(recipe.cfg, recipe.origins)[0].weight == 1.0
    replaced = dataclasses.replace(recipe, cfg={**recipe.cfg, "loss": [{"name": "cdpo", "weight": 0.5}]})
    built = Recipe(command="dpo", cfg={**recipe.cfg, "loss": [{"name": "ipo"}]}, origins=recipe.origins)
    assert loss_terms(replaced.cfg, replaced.origins)[0].weight == 0.5
    assert loss_terms(built.cfg, built.origins)[0].name == "ipo"
    assert loss_terms(recipe.cfg, recipe.origins)[0].weight == 1.0  # the first recipe's own parse, kept
    assert parses["loss"] == 3


def test_a_cfg_changed_in_place_is_parsed_again(tmp_path, parses):
    recipe = cdpo(tmp_path)
    assert loss_terms(recipe.cfg, recipe.origins)[0].weight == 1.0
    assert loss_terms(recipe.cfg, recipe.origins)[0].weight == 1.0
    assert parses["loss"] == 1  # kept
    recipe.cfg["loss"][0]["weight"] = 0.5
    assert loss_terms(recipe.cfg, recipe.origins)[0].weight == 0.5
    recipe.cfg["trainer"]["loss_type"] = "ipo"  # a trainer option parse_losses refuses beside `loss:`
    with pytest.raises(RecipeError, match="sets both `loss:` and trainer.loss_type='ipo'"):
        loss_terms(recipe.cfg, recipe.origins)
    assert parses["loss"] == 3


def test_the_parts_where_follows_the_origins_it_is_asked_with(parses):
    recipe = load_recipe(REPO / GRPO_RECIPE, liveness=False)
    where = rl_parts(recipe.cfg, recipe.origins).policy_loss.where
    assert where.startswith("rl.policy_loss, from ")
    assert rl_parts(recipe.cfg).policy_loss.where == where  # no origins: any kept parse does
    assert rl_parts(recipe.cfg, {}).policy_loss.where == "rl.policy_loss, from built-in defaults"
    assert parses["rl"] == 2


def test_a_cfg_no_recipe_holds_is_parsed_on_every_call(parses):
    cfg = {"loss": [{"name": "ipo"}], "trainer": {}}
    assert [t.name for t in loss_terms(cfg)] == [t.name for t in loss_terms(cfg)] == ["ipo"]
    assert parses["loss"] == 2


def test_pipeline_stages_parse_their_own_loss(tmp_path):
    pipeline = write_recipe(tmp_path / "pipe.yaml", f"""
command: pipeline
name: two
output_dir: {tmp_path / 'runs'}
stages:
  light: {{command: dpo, recipe: {REPO / 'recipes/papers/cdpo.yaml'}, output: {tmp_path / 'light'},
           overrides: {{loss: [{{name: cdpo, weight: 0.25, label_smoothing: 0.1}}]}}}}
  heavy: {{command: dpo, recipe: {REPO / 'recipes/papers/cdpo.yaml'}, output: {tmp_path / 'heavy'},
           overrides: {{loss: [{{name: cdpo, weight: 4.0, label_smoothing: 0.1}}]}}}}
""")
    recipe = load_recipe(pipeline, command="pipeline")
    stages = {name: stage_recipe(recipe, name, stage, smoke=False) for name, stage in recipe.cfg["stages"].items()}
    assert {name: loss_terms(s.cfg, s.origins)[0].weight for name, s in stages.items()} == {"light": 0.25,
                                                                                          "heavy": 4.0}


def test_the_smoke_layers_loss_is_the_one_parsed(parses):
    """--smoke replaces TGDPO's token reward model on its loss entry: the terms carry the smoke layer's model."""
    smoked = load_smoke_recipe(REPO / "recipes/papers/tgdpo.yaml")
    model = loss_terms(smoked.cfg, smoked.origins)[0].inputs["token_reward_model"]
    assert model == smoked.cfg["loss"][0]["token_reward_model"] and model["name_or_path"] == "tiny"
    assert parses["loss"] == 1
