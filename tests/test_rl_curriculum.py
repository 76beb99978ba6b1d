"""Train Long, Think Short's shrinking-budget length reward (`curriculum_budget_length`): the entry against a
reference written here from the paper's schedule B(t) = max(1, B0 * gamma^floor(t / T)) and the efficiency term,
the load-time checks, and a tiny GRPO run whose logged budget shrinks step by step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from postrain.cli import app
from postrain.rl.registry import SHAPING
from postrain.rl.shaping import curriculum_budget
from tests.conftest import TINY, write_recipe

runner = CliRunner()


def reference_budget(step: int, b0: float, gamma: float, interval: int, floor: float = 1.0) -> float:
    budget = b0
    for _ in range(step // interval):  # one multiplication per completed interval
        budget *= gamma
    return max(floor, budget)


def reference_shaped(reward: float, length: int, budget: float, weight: float) -> float:
    if length <= budget:
        efficiency = 1.0
    elif length >= 2 * budget:
        efficiency = 0.0
    else:
        efficiency = 1.0 - (length - budget) / budget
    return reward + weight * efficiency


@pytest.mark.parametrize("step, expected", [
    (0, 256.0),                  # the first step: the initial budget
    (9, 256.0),                  # still in the first interval
    (10, 256.0 * 0.7),           # one decay
    (35, 256.0 * 0.7 ** 3),
    (99, 256.0 * 0.7 ** 9),      # the last step of a 100-step run
    (10_000, 1.0),               # the floor
])
def test_budget_follows_the_papers_schedule(step, expected):
    got = curriculum_budget(step, initial_budget=256, decay_factor=0.7, decay_interval=10)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx(reference_budget(step, 256, 0.7, 10), rel=1e-12)


@pytest.mark.parametrize("step", [0, 1, 2, 5, 7])  # 7: the last step of an 8-step run
def test_shaped_reward_matches_the_reference(step):
    lengths = [0, 3, 8, 9, 12, 16, 17, 40]        # an empty completion, under, at, just over, 2B, beyond
    rewards = [1.0, 0.0, 1.0, 1.0, 0.5, 1.0, 0.0, 1.0]
    width = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    params = {"length_weight": 0.5, "initial_budget": 8, "decay_factor": 0.5, "decay_interval": 2}
    out = SHAPING.call("curriculum_budget_length",
                       {"rewards": torch.tensor(rewards), "group_size": 4, "mask": mask, "step": step}, params)
    budget = reference_budget(step, 8, 0.5, 2)
    expected = [reference_shaped(r, n, budget, 0.5) for r, n in zip(rewards, lengths)]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor(expected))
    assert out[0].item() == pytest.approx(rewards[0] + 0.5)  # an empty completion is within any budget


def test_a_tighter_budget_lowers_the_reward_of_the_same_completion():
    mask = torch.ones(4, 20)
    early, late = (SHAPING.call("curriculum_budget_length", {"rewards": torch.ones(4), "group_size": 4,
                                                             "mask": mask, "step": s},
                                {"length_weight": 1.0, "initial_budget": 32, "decay_interval": 1})
                   for s in (0, 2))
    assert early.tolist() == [2.0] * 4  # 20 tokens within 32
    assert late.tolist() == pytest.approx([1.0 + max(0.0, 1 - (20 - 32 * 0.49) / (32 * 0.49))] * 4)
    assert (late < early).all()


def test_entry_metadata():
    variant = SHAPING.get("curriculum_budget_length")
    assert variant.arxiv == "2508.08940"
    assert variant.params["initial_budget"] == 256.0 and variant.params["decay_factor"] == 0.7
    assert variant.data == {"rewards": True, "group_size": True, "mask": True, "step": True}


# --- recipes: load-time checks and a run --------------------------------------------------------------------------


def recipe(tmp_path: Path, shaping: str, max_steps: int = 4) -> Path:
    return write_recipe(tmp_path / "grpo.yaml", f"""
defaults: [base/grpo]
model: {{name_or_path: tiny, dtype: float32, tiny: {json.dumps(TINY)}}}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
trainer: {{max_steps: {max_steps}, per_device_train_batch_size: 8, logging_steps: 1, num_generations: 4,
          max_completion_length: 6, activation_checkpointing: false}}
rl: {{shaping: [{shaping}]}}
""")


@pytest.mark.parametrize("shaping, expected", [
    ("{name: curriculum_budget_length, length_weight: 0.5}", "has no default for decay_interval"),
    ("{name: curriculum_budget_length, length_weight: 0.5, decay_interval: 0}",
     "rl.shaping[0].decay_interval (0, rl.shaping[0], from"),
    ("{name: curriculum_budget_length, length_weight: 0.5, decay_interval: 2, decay_factor: 1.5}",
     "decay_factor (1.5, rl.shaping[0]"),
    ("{name: curriculum_budget_length, length_weight: 0.5, decay_interval: 2, initial_budget: 0}",
     "must be > 0 tokens"),
])
def test_load_time_errors_name_the_key(tmp_path, shaping, expected):
    result = runner.invoke(app, ["config", str(recipe(tmp_path, shaping))])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert expected in " ".join(result.output.split())


def test_a_runs_logged_budget_shrinks_every_decay_interval(tmp_path):
    shaping = "{name: curriculum_budget_length, length_weight: 0.5, initial_budget: 4, decay_factor: 0.5, " \
              "decay_interval: 1}"
    run = tmp_path / "run"
    result = runner.invoke(app, ["grpo", str(recipe(tmp_path, shaping)), f"output_dir={run}"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    # logged step k was generated at global step k - 1: 4, 2, 1, then the floor of 1 token
    assert [m["rl/shaping/budget"] for m in steps] == pytest.approx([4.0, 2.0, 1.0, 1.0])
    assert all(math.isfinite(m["rl/shaped_reward/mean"]) for m in steps)
