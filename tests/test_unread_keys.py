"""Recipe keys set but never read, given the rest of the recipe, are reported as warnings when it loads."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from postrain.cli import app
from postrain.jobs import load_recipe
from postrain.recipes.catalog import list_recipes
from tests.conftest import REPO, write_recipe


@pytest.mark.parametrize("recipe, overrides, key", [
    ("recipes/demo/grpo.yaml", ["data.train.source=x.jsonl", "data.train.task.n=3"], "data.train.task"),
    ("recipes/demo/grpo.yaml", ["data.train.config=main"], "data.train.config"),
    ("recipes/demo/grpo.yaml", ["data.train.source=x.csv", "data.train.split=test"], "data.train.split"),
    ("recipes/demo/grpo.yaml", ["model.name_or_path=org/model", "model.tiny.seed=3"], "model.tiny"),
    ("recipes/demo/grpo.yaml", ["model.name_or_path=tiny", "model.revision=main"], "model.revision"),
    ("recipes/demo/grpo.yaml", ["reward_errors.policy=fail", "reward_errors.score=1"], "reward_errors.score"),
    ("recipes/demo/grpo.yaml", ["reward_errors.policy=fail", "reward_errors.completion_timeout=5"],
     "reward_errors.completion_timeout"),
    ("recipes/demo/sft.yaml", ["trainer.save_strategy='no'", "trainer.save_steps=10"], "trainer.save_steps"),
    ("recipes/demo/sft.yaml", ["trainer.save_strategy='no'", "trainer.save_total_limit=2"], "trainer.save_total_limit"),
    ("recipes/demo/sft.yaml", ["trainer.eval_steps=10"], "trainer.eval_steps"),
    ("recipes/demo/sft.yaml", ["trainer.logging_strategy=epoch", "trainer.logging_steps=5"], "trainer.logging_steps"),
    ("recipes/demo/sft.yaml", ["trainer.max_steps=10", "trainer.num_train_epochs=3"], "trainer.num_train_epochs"),
    ("recipes/demo/eval.yaml", ["generation.do_sample=false", "generation.temperature=0.7"], "generation.temperature"),
    ("recipes/demo/sft.yaml", ["hub.private=false"], "hub.private"),
    ("recipes/demo/sft.yaml", ["launch.main_process_ip=10.0.0.1"], "launch.main_process_ip"),
])
def test_a_key_nothing_reads_is_reported(recipe, overrides, key):
    warnings = load_recipe(str(REPO / recipe), overrides).warnings
    assert any(w.startswith(f"{key} (from command line) is set but never read") for w in warnings), warnings


def test_keys_that_are_read_are_not_reported():
    warnings = load_recipe(str(REPO / "recipes/demo/grpo.yaml"), [
        "reward_errors.policy=score", "reward_errors.score=1", "data.train.task.n=3",
        "trainer.save_strategy=steps", "trainer.save_steps=10"]).warnings
    assert warnings == []
    assert load_recipe(str(REPO / "recipes/demo/eval.yaml"),
                       ["generation.do_sample=true", "generation.temperature=0.7"]).warnings == []


def test_keys_of_inherited_base_recipes_are_not_reported(tmp_path):
    base = write_recipe(tmp_path / "base.yaml", "command: sft\ntrainer: {save_strategy: 'no', save_steps: 10}\n")
    own = write_recipe(tmp_path / "own.yaml", f"defaults: [{base}]\nname: x\n")
    assert load_recipe(str(own)).warnings == []
    mine = write_recipe(tmp_path / "mine.yaml", f"defaults: [{base}]\ntrainer: {{save_steps: 5}}\n")
    assert [w.split(" is set")[0] for w in load_recipe(str(mine)).warnings] == [f"trainer.save_steps (from {mine})"]


def test_the_command_line_prints_the_warning_and_still_runs():
    result = CliRunner().invoke(app, ["config", str(REPO / "recipes/demo/sft.yaml"), "trainer.eval_steps=10"])
    assert result.exit_code == 0
    assert "warning: trainer.eval_steps (from command line) is set but never read" in result.output


def test_no_shipped_recipe_sets_a_key_it_never_reads():
    found = {}
    for row in list_recipes(REPO / "recipes"):
        try:
            recipe = load_recipe(str(REPO / row["path"]))
        except Exception:  # base recipes that are not complete on their own (merge without a method)
            continue
        if recipe.warnings:
            found[row["path"]] = recipe.warnings
    assert found == {}
