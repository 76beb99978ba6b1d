"""The command line as a user meets it: help, config, errors without tracebacks, dry runs, the recipe list."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from postrain.cli import app
from tests.conftest import REPO, write_recipe

runner = CliRunner()
JOBS = ["sft", "dpo", "grpo", "eval", "merge"]


def test_help_lists_the_five_subcommands():
    out = runner.invoke(app, ["--help"]).output
    for cmd in JOBS:
        assert f" {cmd} " in out


@pytest.mark.parametrize("cmd", [*JOBS, "run", "config", "recipes"])
def test_each_subcommand_help_shows_an_example(cmd):
    result = runner.invoke(app, [cmd, "--help"])
    assert result.exit_code == 0
    assert "Example: postrain" in result.output


def test_config_shows_override_applied():
    result = runner.invoke(app, ["config", "recipes/demo/sft.yaml", "trainer.learning_rate=1.25e-4", "name=zzz"])
    assert result.exit_code == 0, result.output
    assert "learning_rate: 0.000125" in result.output
    assert "output_dir: runs/zzz" in result.output


def test_misspelt_key_exits_nonzero_with_suggestion_and_no_traceback(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "defaults: [base/sft]\ntrainer: {lerning_rate: 1.0e-5}\n")
    result = runner.invoke(app, ["config", str(path)])
    assert result.exit_code != 0
    assert "lerning_rate" in result.output and "did you mean 'learning_rate'" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["sft", "recipes/demo/sft.yaml", "trainer.per_device_train_bach_size=4"])
    assert result.exit_code != 0 and "per_device_train_batch_size" in result.output
    assert "Traceback" not in result.output


def test_dry_run_prints_batch_arithmetic():
    result = runner.invoke(app, ["grpo", "recipes/demo/grpo.yaml", "--dry-run", "trainer.per_device_train_batch_size=16",
                                 "trainer.num_generations=4", "trainer.gradient_accumulation_steps=2"])
    assert result.exit_code == 0, result.output
    assert "recipe is valid" in result.output
    from postrain.jobs.plan import plan
    from postrain.jobs import load_recipe

    planned = plan(load_recipe("recipes/demo/grpo.yaml", ["trainer.per_device_train_batch_size=16",
                                                          "trainer.num_generations=4", "trainer.gradient_accumulation_steps=2"]))
    assert planned["completions per optimizer step"].endswith("16 per device x 2 accumulation x 1 processes = 32")
    assert planned["prompts per optimizer step"].startswith("8 (groups of 4")
    assert planned["generation batch"].startswith("32 completions = 8 prompts x 4")
    # TRL regenerates every steps_per_generation x num_iterations micro-steps (GRPOTrainer._prepare_inputs)
    reused = plan(load_recipe("recipes/demo/grpo.yaml", ["trainer.per_device_train_batch_size=16",
                                                         "trainer.num_generations=4", "trainer.gradient_accumulation_steps=2",
                                                         "trainer.num_iterations=3"]))
    assert "generated every 6 micro-steps (steps_per_generation 2 x num_iterations 3)" in reused["generation batch"]


def test_dry_run_catches_impossible_grpo_batch_before_loading(monkeypatch):
    import postrain.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("dry run loaded a model"))
    result = runner.invoke(app, ["grpo", "recipes/demo/grpo.yaml", "--dry-run", "trainer.per_device_train_batch_size=12",
                                 "trainer.num_generations=8"])
    assert result.exit_code != 0
    assert "generation_batch_size (12) must be divisible by num_generations (8)" in result.output  # TRL's own check


def test_dry_run_builds_the_trl_config_so_valid_means_valid(tmp_path):
    """The README's example once passed --dry-run and then failed in TRL: loss_weights did not match loss_type."""
    result = runner.invoke(app, ["dpo", "recipes/demo/dpo.yaml", "--dry-run", "trainer.loss_type=[ipo]"])
    assert result.exit_code == 2 and "loss_weights" in result.output and "recipe is valid" not in result.output
    result = runner.invoke(app, ["dpo", "recipes/demo/dpo.yaml", "--dry-run", "trainer.loss_type=[ipo]",
                                 "trainer.loss_weights=[1.0]", "model.name_or_path=tiny"])
    assert result.exit_code == 0 and "recipe is valid" in result.output, result.output


def test_dry_run_checks_reward_columns_and_model_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    data = tmp_path / "q.jsonl"
    data.write_text('{"prompt": "1+1=", "gold": "2"}\n')
    args = ["grpo", str(REPO / "recipes/demo/grpo.yaml"), "--dry-run", f"data.train.source={data}"]
    result = runner.invoke(app, args + ["model.name_or_path=tiny"])
    assert result.exit_code == 2 and "needs the dataset column 'answer'" in result.output
    assert "data.train" in result.output and "columns present: gold, prompt" in result.output
    result = runner.invoke(app, args + ["rewards[0].args.answer_column=gold"])
    assert result.exit_code == 2 and "a list is replaced whole" in result.output
    result = runner.invoke(app, args + ["model.name_or_path=runs/nonexistent",
                                        "rewards=[{name: exact_match, args: {answer_column: gold}}]"])
    assert result.exit_code == 2 and "model.name_or_path" in result.output
    assert "does not exist locally" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs" / "demo-grpo").exists()


def test_wrong_command_for_recipe_is_refused():
    result = runner.invoke(app, ["dpo", "recipes/demo/sft.yaml", "--dry-run"])
    assert result.exit_code != 0 and "postrain sft" in result.output


def test_recipes_lists_commands_as_json():
    result = runner.invoke(app, ["recipes", "--json"])
    rows = json.loads(result.output)
    by_path = {r["path"]: r for r in rows}
    assert by_path["recipes/math.yaml"]["command"] == "grpo"
    assert by_path["recipes/demo/pipeline.yaml"]["command"] == "pipeline"


def test_trl_outside_tested_range_is_refused_with_a_clear_message(monkeypatch):
    import trl

    from postrain.errors import PostrainError
    from postrain.jobs.common import check_trl_version

    monkeypatch.delenv("POSTRAIN_SKIP_VERSION_CHECK", raising=False)
    monkeypatch.setattr(trl, "__version__", "0.9.6")
    with pytest.raises(PostrainError, match=r"tested with trl >=1\.16,<1\.17 but trl 0\.9\.6"):
        check_trl_version()
    monkeypatch.setenv("POSTRAIN_SKIP_VERSION_CHECK", "1")
    check_trl_version()


def test_pyproject_declares_the_same_trl_range():
    import tomllib

    from postrain.jobs.common import TRL_TESTED
    from tests.conftest import REPO

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (lo, hi) = TRL_TESTED
    assert f"trl>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}" in deps


def test_recipes_shows_paper_title_and_arxiv_id(tmp_path):
    root = tmp_path / "recipes"
    write_recipe(root / "base" / "dpo.yaml", "command: dpo\n")
    write_recipe(root / "papers" / "p.yaml", "defaults: [../base/dpo]\npaper: {title: A Paper, arxiv: '2401.00001'}\n")
    rows = json.loads(runner.invoke(app, ["recipes", "--json", "--root", str(root)]).output)
    paper = next(r for r in rows if r["path"].endswith("papers/p.yaml"))
    assert paper["command"] == "dpo" and paper["paper"] == "A Paper" and paper["arxiv"] == "2401.00001"
    table = runner.invoke(app, ["recipes", "--root", str(root)]).output
    assert "A Paper" in table and "2401.00001" in table


def test_error_messages_keep_square_brackets(tmp_path):
    """Errors quote recipe values and paths like `loss[0]` or `[lo, hi]`; rich markup must not eat them."""
    from typer.testing import CliRunner

    from postrain.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text("defaults: [base/dpo]\ndata: {train: {source: \"builtin:arithmetic\"}}\nloss: [{name: nosuchloss}]\n")
    result = CliRunner().invoke(app, ["dpo", str(recipe), "--dry-run"])
    assert result.exit_code == 2
    assert "loss[0]" in result.output, result.output


def test_shell_completion_installs_through_typer():
    from typer.testing import CliRunner

    from postrain.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert "--install-completion" in result.output and "--show-completion" in result.output
    shown = CliRunner().invoke(app, ["--show-completion", "bash"])
    assert shown.exit_code == 0 and "complete" in shown.output, shown.output
