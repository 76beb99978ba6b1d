"""Liveness: each method part a recipe names is checked against the batch layout TRL will derive; inert steps are
reported with the numbers and a setting that would make them live (warning, or error with `liveness: error`);
convention mix-ups are refused; `postrain recipes --check` and `--inherited`."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from postrain.cli import app
from postrain.errors import RecipeError
from postrain.jobs import load_recipe
from postrain.jobs.liveness import check_liveness, layout_of
from tests.conftest import REPO, write_recipe

runner = CliRunner()
PAPERS = REPO / "recipes" / "papers"


def grpo(tmp_path: Path, body: str, name: str = "recipe.yaml") -> Path:
    return write_recipe(tmp_path / name, "command: grpo\nrewards: [{name: exact_match}]\n" + body)


def dpo(tmp_path: Path, body: str, name: str = "recipe.yaml") -> Path:
    return write_recipe(tmp_path / name, "command: dpo\n" + body)


def findings(path, overrides=()):
    recipe = load_recipe(path, list(overrides), liveness=False)
    return check_liveness(recipe.command, recipe.cfg, recipe.origins)


def kinds(found) -> list[tuple[str, str]]:
    return [(f.part.split("'")[1], f.kind) for f in found]


# --- the layout, against TRL's own derivation -------------------------------------------------------------------

@pytest.mark.parametrize("trainer, processes", [
    ({}, 1),
    ({"per_device_train_batch_size": 8, "gradient_accumulation_steps": 4}, 1),
    ({"per_device_train_batch_size": 4, "generation_batch_size": 32}, 1),
    ({"per_device_train_batch_size": 4, "steps_per_generation": 3}, 1),
    ({"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}, 2),
    ({"per_device_train_batch_size": 4, "generation_batch_size": 64}, 4),
])
def test_generation_batch_is_derived_as_trl_derives_it(monkeypatch, trainer, processes):
    """TRL 1.16's GRPOConfig.__post_init__ with its world size patched to the launch's processes."""
    from trl import GRPOConfig

    monkeypatch.setattr(GRPOConfig, "world_size", property(lambda self: processes))
    config = GRPOConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to="none", num_generations=4,
                        **trainer)
    cfg = {"trainer": {"num_generations": 4, **trainer}, "launch": {"num_processes": processes, "num_machines": 1}}
    layout = layout_of("grpo", cfg)
    assert (layout.generation_batch_size, layout.steps_per_generation) == (config.generation_batch_size,
                                                                           config.steps_per_generation)
    assert layout.world_size == processes


def test_off_policy_matches_a_simulation_of_trls_schedule():
    """Micro-step k trains on generation batch k // (steps_per_generation x num_iterations) and belongs to optimizer
    step k // gradient_accumulation_steps: a generation batch is trained on by a moved policy exactly when its
    micro-steps span two optimizer steps."""
    for accum in range(1, 9):
        for spg in range(1, 9):
            for iterations in (1, 2, 3):
                every = spg * iterations
                spans = any(len({k // accum for k in range(g * every, (g + 1) * every)}) > 1 for g in range(16))
                cfg = {"trainer": {"gradient_accumulation_steps": accum, "steps_per_generation": spg,
                                   "num_iterations": iterations}}
                assert layout_of("grpo", cfg).off_policy == spans, (accum, spg, iterations)


# --- the acceptance recipes: the layouts lite_ppo.yaml and minimax_m1.yaml shipped with ----------------------------

# Before issue 17 both trained on per_device_train_batch_size 8, gradient_accumulation_steps 1, no generation batch
# size or steps per generation: a generation batch of one prompt (8 completions), one optimizer step per batch.
OLD_LAYOUT = ["trainer.per_device_train_batch_size=8", "trainer.gradient_accumulation_steps=1",
              "trainer.generation_batch_size=null", "trainer.steps_per_generation=null", "trainer.num_iterations=1",
              "trainer.num_generations=8", "launch.num_processes=1"]


def _copy(name: str, tmp_path: Path) -> Path:
    """A copy of a shipped paper recipe (its `defaults:` still resolve: recipes/ is the recipes root)."""
    target = tmp_path / "papers" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(PAPERS / name, target)
    text = target.read_text().replace("defaults: [../base/grpo]", "defaults: [base/grpo]")
    target.write_text(text)
    return target


def test_the_old_lite_ppo_layout_is_flagged_with_its_numbers_and_a_fix(tmp_path):
    found = findings(_copy("lite_ppo.yaml", tmp_path), OLD_LAYOUT)
    assert kinds(found) == [("lite_ppo", "groups_per_batch")]
    message = found[0].message
    assert "the batch-level std" in message and "holds 1 group" in message
    assert "generation_batch_size 8 (per_device_train_batch_size 8 x 1 process x steps_per_generation 1)" in message
    fix = re.search(r"trainer\.generation_batch_size=(\d+)", message)
    assert fix, message
    assert not findings(_copy("lite_ppo.yaml", tmp_path), OLD_LAYOUT + [f"trainer.generation_batch_size={fix[1]}"])


def test_the_old_minimax_m1_layout_is_flagged_with_its_numbers_and_a_fix(tmp_path):
    found = findings(_copy("minimax_m1.yaml", tmp_path), OLD_LAYOUT)
    assert kinds(found) == [("cispo", "off_policy")]
    message = found[0].message
    assert "the cap of the importance weight" in message and "pi_old = pi" in message
    assert "steps_per_generation 1 x num_iterations 1" in message and "gradient_accumulation_steps 1" in message
    fix = re.search(r"e\.g\. (trainer\.steps_per_generation=\d+)", message)
    assert fix, message
    assert not findings(_copy("minimax_m1.yaml", tmp_path), OLD_LAYOUT + [fix[1]])
    assert not findings(_copy("minimax_m1.yaml", tmp_path), OLD_LAYOUT + ["trainer.num_iterations=2"])


# --- one test per kind of requirement ------------------------------------------------------------------------------

def test_every_requirement_kind_is_evaluated_and_every_requirement_has_a_known_kind():
    from postrain.jobs.liveness import EVALUATORS
    from postrain.registry import REQUIREMENT_KINDS
    from postrain.variants import all_variants

    assert set(EVALUATORS) == set(REQUIREMENT_KINDS)
    used = {r.kind for v in all_variants() for r in v.requires}
    assert used == set(REQUIREMENT_KINDS)  # each kind is declared by some entry (and tested below)


def test_off_policy(tmp_path):
    path = grpo(tmp_path, "rl: {policy_loss: {name: ppo_clip, epsilon_high: 0.28}}\n"
                          "trainer: {per_device_train_batch_size: 8, gradient_accumulation_steps: 4}\n")
    assert kinds(findings(path)) == [("ppo_clip", "off_policy")]  # steps_per_generation = 4 = accumulation
    assert not findings(path, ["trainer.steps_per_generation=8"])
    assert not findings(path, ["trainer.num_iterations=2"])
    # a loss over whole groups can only act by retraining a micro-batch that is an update of its own
    group = grpo(tmp_path, "method: gvpo\ntrainer: {num_generations: 4, per_device_train_batch_size: 4, "
                           "steps_per_generation: 1, gradient_accumulation_steps: 2}\n", "group.yaml")
    found = findings(group)
    assert kinds(found) == [("gvpo", "off_policy")] and "gradient_accumulation_steps=1" in found[0].message
    assert not findings(group, ["trainer.gradient_accumulation_steps=1", "trainer.num_iterations=2"])
    # TRL's defaults at their defaults are not reported: the clip is no method's defining step there
    assert not findings(grpo(tmp_path, "rl: {}\n", "plain.yaml"))
    assert not findings(grpo(tmp_path, "method: grpo\n", "method.yaml"))


def test_groups_per_batch_counts_every_process(tmp_path):
    path = grpo(tmp_path, "method: lite_ppo\ntrainer: {per_device_train_batch_size: 8, num_generations: 8}\n")
    found = findings(path)
    assert kinds(found) == [("lite_ppo", "groups_per_batch")]
    assert not findings(path, ["launch.num_processes=2"])  # 8 completions x 2 processes: 2 groups, gathered
    two = findings(path, ["launch.num_processes=2", "trainer.num_generations=16"])
    assert "(0.5 group(s) per process)" in two[0].message
    assert not findings(path, ["trainer.generation_batch_size=16"])
    # TRL's own option stands for the same entry
    trl = grpo(tmp_path, "trainer: {scale_rewards: batch, per_device_train_batch_size: 8, num_generations: 8}\n",
               "trl.yaml")
    assert kinds(findings(trl)) == [("lite_ppo", "groups_per_batch")]
    assert "trainer.scale_rewards=batch" in findings(trl)[0].where


def test_group_size_as_the_advantage_sees_it(tmp_path):
    path = grpo(tmp_path, "rl: {advantage: grpo, samplers: [{name: gfpo_length, k: 1}]}\n"
                          "trainer: {num_generations: 4, per_device_train_batch_size: 8}\n")
    assert ("grpo", "group_size") in kinds(findings(path))  # GFPO keeps 1 of 4: the advantage sees groups of 1
    assert ("grpo", "group_size") not in kinds(findings(path, ["rl.samplers=[{name: gfpo_length, k: 2}]"]))


def test_refill(tmp_path):
    path = grpo(tmp_path, "rl: {samplers: [{name: dynamic_sampling, max_num_gen_batches: 1}]}\n")
    assert kinds(findings(path)) == [("dynamic_sampling", "refill")]
    for rounds in (0, 2):
        assert not findings(path, [f"rl.samplers=[{{name: dynamic_sampling, max_num_gen_batches: {rounds}}}]"])
    greso = grpo(tmp_path, "rl: {samplers: [{name: greso, max_num_gen_batches: 0}]}\n", "greso.yaml")
    assert ("greso", "refill") in kinds(findings(greso))  # skipped prompts would be rolled out after all


def test_length_budget(tmp_path):
    path = grpo(tmp_path, "rl: {shaping: [{name: dapo_overlong, overlong_buffer_len: 64, "
                          "max_completion_length: 512}]}\ntrainer: {max_completion_length: 256}\n")
    found = findings(path)
    assert kinds(found) == [("dapo_overlong", "length_budget")]  # the ramp starts at 448, past the 256 generated
    assert "448" in found[0].message
    assert not findings(path, ["rl.shaping=[{name: dapo_overlong, overlong_buffer_len: 64}]"])  # the trainer's 256
    curriculum = grpo(tmp_path, "rl: {shaping: [{name: curriculum_budget_length, length_weight: 0.5, decay_interval: "
                                "10, initial_budget: 256}]}\ntrainer: {max_completion_length: 128, max_steps: 20}\n",
                      "curriculum.yaml")
    assert kinds(findings(curriculum)) == [("curriculum_budget_length", "length_budget")]  # 256 * 0.7 = 179 > 128
    assert not findings(curriculum, ["trainer.max_steps=40"])  # 256 * 0.7^3 = 88 < 128 by the last step


def test_revisits(tmp_path):
    path = grpo(tmp_path, "method: repo_replay\ntrainer: {num_generations: 8, num_train_epochs: 2}\n")
    found = findings(path)
    assert kinds(found) == [("repo_replay", "revisits")]  # a 16-sample buffer fills after 2 visits of 8
    assert "visited 3 times" in found[0].message
    assert not findings(path, ["trainer.num_train_epochs=3"])
    assert not findings(path, ["trainer.max_steps=100"])  # the dataset size decides: not judged at load time


def test_selection(tmp_path):
    path = grpo(tmp_path, "rl: {samplers: [{name: gfpo_length, k: 4}]}\ntrainer: {num_generations: 4}\n")
    assert kinds(findings(path)) == [("gfpo_length", "selection")]
    pruning = grpo(tmp_path, "rl: {samplers: [{name: cppo_prune, pruning_rate: 0.0}]}\n", "cppo.yaml")
    assert kinds(findings(pruning)) == [("cppo_prune", "selection")]
    assert not findings(pruning, ["rl.samplers=[{name: cppo_prune, pruning_rate: 0.5}]"])


def test_rows_per_batch_per_process_and_gathered(tmp_path):
    path = dpo(tmp_path, "loss: [{name: dr_dpo}]\ntrainer: {per_device_train_batch_size: 1}\n")
    found = findings(path)
    assert kinds(found) == [("dr_dpo", "rows_per_batch")]
    assert "per_device_train_batch_size 1" in found[0].message
    assert kinds(findings(path, ["launch.num_processes=2"])) == [("dr_dpo", "rows_per_batch")]  # one process' batch
    # β-DPO reads the gathered batch: rho 0.6 keeps int(0.4 N) pairs, at least one from N = 3 on
    beta = dpo(tmp_path, "loss: [{name: beta_dpo, rho: 0.6}]\ntrainer: {per_device_train_batch_size: 2}\n", "b.yaml")
    assert kinds(findings(beta)) == [("beta_dpo", "rows_per_batch")]
    assert not findings(beta, ["launch.num_processes=2"])
    aot = dpo(tmp_path, "trainer: {loss_type: [aot], per_device_train_batch_size: 1}\n", "aot.yaml")
    assert kinds(findings(aot)) == [("aot", "rows_per_batch")]  # TRL's loss_type stands for the entry


# --- reporting: a warning by default, an error on request, nothing under --smoke ----------------------------------

def test_a_finding_warns_at_load_and_refuses_with_liveness_error(tmp_path, caplog):
    path = grpo(tmp_path, "method: cispo\n")
    with caplog.at_level(logging.WARNING, logger="postrain.liveness"):
        recipe = load_recipe(path)
    assert [f.kind for f in recipe.liveness] == ["off_policy"]
    assert any("cispo" in r.getMessage() and "liveness: error" in r.getMessage() for r in caplog.records)
    with pytest.raises(RecipeError, match=r"liveness: error, from command line\):\n  policy loss 'cispo'"):
        load_recipe(path, ["liveness=error"])
    result = runner.invoke(app, ["grpo", str(path), "--dry-run", "liveness=error"])
    assert result.exit_code == 2 and "pi_old = pi" in result.output
    assert load_recipe(path).hash == load_recipe(path, ["liveness=error"], liveness=False).hash  # not hashed
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="postrain.liveness"):
        from postrain.jobs import load_smoke_recipe

        assert load_smoke_recipe(path, ["liveness=error"]).liveness == []  # the smoke layer's layout is not judged
    assert not caplog.records


# --- convention mix-ups are refused, with the convention -----------------------------------------------------------

@pytest.mark.parametrize("body, match", [
    ("method: {name: cispo, epsilon_high: 0.28}\n", r"epsilon_high=0\.28: .*absolute cap.*write epsilon_high: 1\.28"),
    ("trainer: {loss_type: cispo, epsilon_high: 0.28}\n",
     r"TRL's trainer\.loss_type=cispo.*epsilon_high=0\.28: .*absolute cap"),
    ("trainer: {loss_type: cispo}\n", r"epsilon_high=0\.2: .*absolute cap"),  # TRL's epsilon_high defaults to epsilon
    ("rl: {policy_loss: {name: ppo_clip, epsilon: 1.2}}\n", r"epsilon=1\.2: .*distance below 1.*as 0\.2"),
    ("rl: {policy_loss: {name: ppo_clip, epsilon_high: 1.28}}\n", r"epsilon_high=1\.28: .*belongs here as 0\.28"),
    ("trainer: {epsilon: 1.2}\n", r"policy loss 'ppo_clip'.*epsilon=1\.2"),
    ("method: {name: dual_clip, dual_clip_c: 0.5}\n", r"dual_clip_c=0\.5: .*absolute bound"),
    ("rl: {advantage: reinforce_pp_baseline, policy_loss: gspo}\n",
     r"one advantage per token.*'gspo'.*spread evenly.*gspo_token"),
    ("rl: {advantage: reinforce_pp_baseline, policy_loss: gmpo}\n", r"one advantage per sequence"),
])
def test_convention_mix_ups_are_refused(tmp_path, body, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(grpo(tmp_path, body), liveness=False)


def test_values_within_the_conventions_load(tmp_path):
    for body in ("method: {name: cispo, epsilon_high: 5.0}\n", "trainer: {loss_type: cispo, epsilon_high: 5.0}\n",
                 "rl: {policy_loss: {name: ppo_clip, epsilon: 0.2, epsilon_high: 0.28}}\n",
                 "rl: {advantage: reinforce_pp_baseline, policy_loss: gspo_token}\n",
                 "method: {name: dapo, overlong_buffer_len: 64}\n"):
        load_recipe(grpo(tmp_path, body), liveness=False)


# --- postrain recipes --check and --inherited -------------------------------------------------------------------

def test_recipes_check_reports_and_strict_fails(tmp_path):
    root = tmp_path / "recipes"
    write_recipe(root / "base" / "grpo.yaml", "command: grpo\nrewards: [{name: exact_match}]\n")
    write_recipe(root / "inert.yaml", "defaults: [base/grpo]\nmethod: cispo\n")
    write_recipe(root / "live.yaml", "defaults: [base/grpo]\nmethod: cispo\ntrainer: {steps_per_generation: 2}\n")
    write_recipe(root / "pipe.yaml", "command: pipeline\nstages:\n  one: {command: grpo, recipe: live.yaml, "
                                     "overrides: {trainer.steps_per_generation: 1}}\n")
    result = runner.invoke(app, ["recipes", "--check", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert "recipes/inert.yaml: policy loss 'cispo'" in result.output
    assert "recipes/pipe.yaml (stage one): policy loss 'cispo'" in result.output  # the stage's override
    assert "live.yaml:" not in result.output and "base/" not in result.output
    assert "2 inert step(s)" in result.output
    assert runner.invoke(app, ["recipes", "--check", "--strict", "--root", str(root)]).exit_code == 2
    rows = json.loads(runner.invoke(app, ["recipes", "--check", "--json", "--root", str(root)]).output)
    assert {(r["path"].split("/")[-1], r["stage"]): bool(r["findings"]) for r in rows} == \
        {("inert.yaml", None): True, ("live.yaml", None): False, ("pipe.yaml", "one"): True}


def test_inherited_lists_what_the_recipe_leaves_to_others(tmp_path):
    write_recipe(tmp_path / "base" / "grpo.yaml", "command: grpo\nrewards: [{name: exact_match}]\n"
                                                  "trainer: {learning_rate: 1.0e-6, beta: 0.0}\n")
    path = write_recipe(tmp_path / "paper.yaml", "defaults: [base/grpo]\nmethod: {name: dapo, overlong_buffer_len: 64}\n"
                                                 "rl: {policy_loss: {epsilon_high: 0.3}}\n"
                                                 "trainer: {num_generations: 4, per_device_train_batch_size: 4}\n")
    result = runner.invoke(app, ["recipes", "--inherited", str(path), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in json.loads(result.output)}
    assert rows["trainer.learning_rate"]["source"] == "base recipe"
    assert rows["trainer.learning_rate"]["from"].endswith("base/grpo.yaml")
    assert rows["rl.policy_loss.epsilon"] == {"key": "rl.policy_loss.epsilon", "value": 0.2, "source": "method",
                                              "from": "method dapo"}
    assert rows["rl.shaping[0].penalty_factor"]["source"] == "entry default"
    assert rows["trainer.weight_decay"] == {"key": "trainer.weight_decay", "value": 0.0, "source": "library default",
                                            "from": "trl GRPOConfig"}
    assert rows["seed"]["source"] == "postrain default"
    for own in ("trainer.num_generations", "trainer.per_device_train_batch_size", "rl.policy_loss.epsilon_high",
                "method.name", "trainer.output_dir"):  # the recipe's own keys, and a field the job fills in
        assert own not in rows
    text = runner.invoke(app, ["recipes", "--inherited", "dapo"]).output  # a paper recipe by name
    assert "## library default" in text and "adam_beta1=" in text  # dapo sets weight_decay itself (verl: 0.1)


# --- every shipped paper recipe passes, or says in its header why not ---------------------------------------------

def test_every_paper_recipe_is_live_or_says_why_not():
    from postrain.jobs.pipeline import stage_recipe
    from postrain.jobs.catalog import check_recipes

    rows = check_recipes(REPO / "recipes", papers=True,
                         stage_loader=lambda pipeline, name, stage: stage_recipe(pipeline, name, stage, smoke=False))
    assert len(rows) > 50
    for row in rows:
        assert row["error"] is None, row
        assert not row["findings"], (f"{row['path']}: {row['findings'][0]}\n(fix the layout, or say in the header "
                                     f"why not: '#   - liveness: <part> ...')")
    explained = {row["path"].split("/")[-1] for row in rows if row["documented"]}
    # each says why its step stays inert
    assert explained == {"bnpo.yaml", "confucius3_math.yaml", "disco.yaml", "grpo_lead.yaml", "gvpo.yaml",
                         "trpa.yaml", "tw_grpo.yaml"}


def test_a_header_note_explains_a_finding_and_strict_ignores_only_those(tmp_path):
    root = tmp_path / "recipes"
    write_recipe(root / "base" / "grpo.yaml", "command: grpo\nrewards: [{name: exact_match}]\n")
    write_recipe(root / "noted.yaml", "# A paper\n#   - liveness: cispo's cap is inert here, as in the authors' run\n"
                                      "defaults: [base/grpo]\nmethod: cispo\n")
    write_recipe(root / "other.yaml", "# liveness: ppo_clip is fine\ndefaults: [base/grpo]\nmethod: cispo\n")
    rows = {r["path"].split("/")[-1]: r for r in json.loads(
        runner.invoke(app, ["recipes", "--check", "--json", "--root", str(root)]).output)}
    assert rows["noted.yaml"]["documented"] and not rows["noted.yaml"]["findings"]
    assert rows["other.yaml"]["findings"] and not rows["other.yaml"]["documented"]  # the note names another part
    assert runner.invoke(app, ["recipes", "--check", "--strict", "--root", str(root)]).exit_code == 2
    (root / "other.yaml").unlink()
    result = runner.invoke(app, ["recipes", "--check", "--strict", "--root", str(root)])
    assert result.exit_code == 0 and "(explained in its header)" in result.output


def test_whole_group_losses_count_the_launch_processes_in_steps_per_generation(tmp_path):
    """generation_batch_size counts completions over every process: 2 processes x 4 per device = 8 is one micro-batch
    per process (steps_per_generation 1), which a loss over whole groups accepts."""
    path = grpo(tmp_path, "method: gvpo\ntrainer: {num_generations: 4, per_device_train_batch_size: 4, "
                          "generation_batch_size: 8, gradient_accumulation_steps: 1}\n")
    load_recipe(path, ["launch.num_processes=2"], liveness=False)
    with pytest.raises(RecipeError, match="steps_per_generation=2"):
        load_recipe(path, ["launch.num_processes=1"], liveness=False)
