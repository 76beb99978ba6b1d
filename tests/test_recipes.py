"""Recipe layering, overrides, interpolation and load-time validation."""

from __future__ import annotations

import importlib
import inspect

import pytest

from postrain.errors import RecipeError
from postrain.jobs import JOB_MODULES, job_module, load_recipe, load_smoke_recipe
from postrain.recipes import read_recipe
from postrain.trainers import config_class
from tests.conftest import REPO, write_recipe


def test_two_level_defaults_resolve_in_documented_order(tmp_path):
    # grandparent < parent < recipe < command line; built-in defaults below all.
    write_recipe(tmp_path / "base" / "grand.yaml", """
command: sft
seed: 1
trainer: {learning_rate: 1.0e-3, num_train_epochs: 1, logging_steps: 7}
model: {dtype: float32}
""")
    write_recipe(tmp_path / "base" / "parent.yaml", """
defaults: [grand]
seed: 2
trainer: {learning_rate: 2.0e-3, num_train_epochs: 2}
""")
    recipe_path = write_recipe(tmp_path / "child.yaml", """
defaults: [base/parent]
trainer: {learning_rate: 3.0e-3}
name: child
""")
    r = load_recipe(recipe_path, ["trainer.num_train_epochs=5"], "sft")
    t = r.cfg["trainer"]
    assert t["learning_rate"] == 3.0e-3  # recipe beats parent and grandparent
    assert t["num_train_epochs"] == 5  # command line beats parent
    assert t["logging_steps"] == 7  # only the grandparent sets it
    assert r.cfg["seed"] == 2  # parent beats grandparent
    assert r.cfg["model"]["dtype"] == "float32"
    assert r.cfg["model"]["name_or_path"] == "tiny"  # built-in default
    assert r.cfg["output_dir"] == "runs/child"  # ${name} interpolation
    assert r.origins["trainer.learning_rate"].endswith("child.yaml")
    assert r.origins["trainer.logging_steps"].endswith("grand.yaml")
    assert r.origins["trainer.num_train_epochs"] == "command line"


def test_defaults_found_relative_to_recipes_root(tmp_path, monkeypatch):
    root = tmp_path / "recipes"
    write_recipe(root / "base" / "sft.yaml", "command: sft\ntrainer: {logging_steps: 3}\n")
    path = write_recipe(tmp_path / "elsewhere" / "r.yaml", "defaults: [base/sft]\n")
    monkeypatch.setenv("POSTRAIN_RECIPES", str(root))
    assert load_recipe(path).cfg["trainer"]["logging_steps"] == 3


def test_interpolation_and_override_applied(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "command: sft\nname: a\noutput_dir: /tmp/x/${name}\n")
    r = load_recipe(path, ["name=b"])
    assert r.cfg["output_dir"] == "/tmp/x/b"


def test_unknown_trainer_key_names_file_and_suggestion(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "command: sft\ntrainer: {lerning_rate: 1.0e-5}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "trainer.lerning_rate" in msg and str(path) in msg and "learning_rate" in msg


def test_unknown_override_key_names_command_line(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "command: grpo\n")
    with pytest.raises(RecipeError, match=r"trainer\.num_generation'.*command line.*num_generations"):
        load_recipe(path, ["trainer.num_generation=4"])


def test_unknown_key_in_our_own_sections(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "command: sft\ndata: {train: {source: builtin:arithmetic, colums: {}}}\n")
    with pytest.raises(RecipeError, match=r"data\.train\.colums.*did you mean 'columns'"):
        load_recipe(path)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "command: sft\n")
    with pytest.raises(RecipeError, match=r"trainer\.num_train_epochs.*expected float"):
        load_recipe(path, ["trainer.num_train_epochs=many"])
    with pytest.raises(RecipeError, match=r"model\.dtype.*one of"):
        load_recipe(path, ["model.dtype=float8"])


def test_scientific_notation_is_a_float(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "command: sft\ntrainer: {learning_rate: 1e-6}\n")
    assert load_recipe(path).cfg["trainer"]["learning_rate"] == 1e-6


def test_recipe_refused_under_another_command(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "command: dpo\n")
    with pytest.raises(RecipeError, match="postrain dpo"):
        load_recipe(path, [], "sft")


def test_defaults_cycle_is_reported(tmp_path):
    write_recipe(tmp_path / "a.yaml", "defaults: [b]\ncommand: sft\n")
    write_recipe(tmp_path / "b.yaml", "defaults: [a]\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_unknown_dpo_loss_type_fails_at_load_time(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "command: dpo\n")
    with pytest.raises(RecipeError, match="did you mean 'ipo'"):
        load_recipe(path, ["trainer.loss_type=[ipp]"])


# TRL 1.16's DPO loss types, written out from trl/trainer/dpo_trainer.py (the branches of `_compute_loss`), not
# read from the validator: a change in either TRL or the validator's parsing makes this test fail.
TRL_1_16_DPO_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                           "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


def test_every_trl_dpo_loss_type_is_accepted(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "command: dpo\n")
    for lt in TRL_1_16_DPO_LOSS_TYPES:
        assert load_recipe(path, [f"trainer.loss_type=[{lt}]"]).cfg["trainer"]["loss_type"] == [lt]
    source = inspect.getsource(importlib.import_module("trl.trainer.dpo_trainer").DPOTrainer._compute_loss)
    for lt in TRL_1_16_DPO_LOSS_TYPES:  # each is a branch of TRL's loss computation
        assert f'"{lt}"' in source, lt
    with pytest.raises(RecipeError, match="unknown trainer.loss_type 'sigmoid_normm'"):
        load_recipe(path, ["trainer.loss_type=[sigmoid_normm]"])


def test_hash_changes_with_content_and_saved_in_header(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "command: sft\n")
    a, b = load_recipe(path), load_recipe(path, ["seed=7"])
    assert a.hash != b.hash and a.hash == load_recipe(path).hash
    out = a.save(tmp_path)
    assert out.read_text().splitlines()[0].endswith(a.hash)


def test_pipeline_stage_output_interpolates(tmp_path):
    path = write_recipe(tmp_path / "p.yaml", """
command: pipeline
name: p
output_dir: /tmp/pipe
stages:
  sft: {command: sft, recipe: x.yaml}
  ev: {command: eval, recipe: y.yaml, overrides: {model.name_or_path: "${stages.sft.output}"}}
""")
    r = load_recipe(path, [], "pipeline")
    assert r.cfg["stages"]["ev"]["overrides"]["model.name_or_path"] == "/tmp/pipe/sft"


def test_merge_section_checked_against_mergekit(tmp_path):
    path = write_recipe(tmp_path / "m.yaml", "command: merge\nmerge: {merge_method: lineer, models: [{model: a/b}]}\n")
    with pytest.raises(RecipeError, match="linear"):
        load_recipe(path)


@pytest.mark.parametrize("command", ["sft", "dpo", "grpo", "eval", "merge", "pipeline"])
def test_a_commands_checks_are_reached_through_its_job(command, monkeypatch):
    """load_recipe runs the `check` of the command's job module (postrain.jobs.JOB_MODULES), once, on the resolved
    recipe; what that check refuses, the load refuses."""
    path = REPO / "recipes" / "demo" / f"{command}.yaml"
    assert job_module(command).__name__ == JOB_MODULES[command]
    seen = []
    monkeypatch.setattr(job_module(command), "check", lambda cfg, origins: seen.append((cfg, origins)))
    recipe = load_recipe(path, [], command)
    assert len(seen) == 1 and seen[0][0] is recipe.cfg and seen[0][1] is recipe.origins

    def refuse(cfg, origins):
        raise RecipeError(f"refused by the {command} job's check")

    monkeypatch.setattr(job_module(command), "check", refuse)
    with pytest.raises(RecipeError, match=f"refused by the {command} job's check"):
        load_recipe(path, [], command)


@pytest.mark.parametrize("command", ["sft", "dpo", "grpo", "eval", "merge", "pipeline"])
def test_a_commands_smoke_layer_is_its_jobs(command, monkeypatch):
    """--smoke's layer is the `smoke_layer` of the command's job module (postrain.jobs.JOB_MODULES)."""
    monkeypatch.setattr(job_module(command), "smoke_layer", lambda cfg: {"seed": 12345})
    assert load_smoke_recipe(REPO / "recipes" / "demo" / f"{command}.yaml", [], command).cfg["seed"] == 12345


def test_reading_a_recipe_runs_no_jobs_check(tmp_path):
    """read_recipe is the vocabulary (layers, overrides, the schema, the trainer: section against TRL's config
    class); a value only the DPO job's check refuses passes it."""
    path = write_recipe(tmp_path / "r.yaml", "command: dpo\n")
    read = read_recipe(path, ["trainer.loss_type=[ipp]"], config_class=config_class)
    assert read.cfg["trainer"]["loss_type"] == ["ipp"]
    with pytest.raises(RecipeError, match="did you mean 'ipo'"):
        load_recipe(path, ["trainer.loss_type=[ipp]"])
    with pytest.raises(RecipeError, match="unknown key 'trainer.loss_typ'"):
        read_recipe(path, ["trainer.loss_typ=ipo"], config_class=config_class)
