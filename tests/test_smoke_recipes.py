"""Every recipe under recipes/ runs under --smoke (tiny model, built-in data, a few steps), as torchtune
instantiates every config it ships: a recipe that drifts from the code fails here, not in a user's run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from postrain.cli import app
from postrain.recipes.catalog import list_recipes
from tests.conftest import REPO

runner = CliRunner()
RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml"))
COMMANDS = {r["path"]: r["command"] for r in list_recipes(REPO / "recipes")}


def test_recipes_were_found():
    assert "recipes/math.yaml" in RECIPES and "recipes/demo/pipeline.yaml" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_under_smoke(recipe, tmp_path):
    command = COMMANDS[recipe]
    cli_command = "run" if command == "pipeline" else command
    result = runner.invoke(app, [cli_command, recipe, "--smoke", f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run_dir = tmp_path / "run"
    if command in ("sft", "dpo", "grpo", "merge"):
        assert (run_dir / "model" / "config.json").exists()
    if command == "eval":
        assert json.loads((run_dir / "results.json").read_text())["sets"]
    if command == "pipeline":
        assert (run_dir / "lineage.json").exists() and (run_dir / "summary.md").exists()
