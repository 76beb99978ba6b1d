"""GRESO's pre-rollout skipping in the GRPO trainer (`rl.samplers: [greso]`): the skip decision and the adaptation
of p_easy / p_hard against references written here from the authors' code (Infini-AI-Lab/GRESO
presampling_selector.py easy_/hard_probabilistic_skip, ray_trainer.py), a tiny run in which prompts that were
all-correct for several rollouts get skipped, and a resumed run that continues as the uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from postrain.cli import app
from postrain.rl.registry import SAMPLERS
from postrain.rl.samplers import greso_adapt, greso_streaks
from tests.conftest import TINY, write_recipe

runner = CliRunner()


def reference_skip(easy_streak: int, hard_streak: int, u: float, p_easy: float, p_hard: float) -> bool:
    """The authors' rule: skip with probability 1 - max(p^k, 0.01), k the streak of the prompt's kind."""
    if easy_streak:
        return u < 1 - max(p_easy ** easy_streak, 0.01)
    if hard_streak:
        return u < 1 - max(p_hard ** hard_streak, 0.01)
    return False  # no streak: always rolled out


CASES = [  # (easy streak, hard streak, draw)
    (0, 0, 0.999), (0, 0, 0.0), (1, 0, 0.49), (1, 0, 0.51), (2, 0, 0.74), (2, 0, 0.76),
    (0, 1, 0.69), (0, 1, 0.71), (0, 3, 0.972), (0, 3, 0.974), (10, 0, 0.985), (10, 0, 0.995), (0, 40, 0.989),
]


@pytest.mark.parametrize("p_easy, p_hard", [(0.5, 0.3), (0.9, 0.05)])
def test_skip_decision_matches_the_authors_rule(p_easy, p_hard):
    easy = torch.tensor([c[0] for c in CASES])
    hard = torch.tensor([c[1] for c in CASES])
    u = torch.tensor([c[2] for c in CASES])
    keep = SAMPLERS.call("greso", {"easy_streak": easy, "hard_streak": hard, "uniform": u},
                         {"p_easy": p_easy, "p_hard": p_hard})
    expected = [not reference_skip(e, h, x, p_easy, p_hard) for e, h, x in CASES]
    assert keep.tolist() == expected
    if (p_easy, p_hard) == (0.5, 0.3):  # the cases straddle each threshold
        assert expected == [True, True, False, True, False, True, False, True, False, True, False, True, False]


def test_streaks_count_consecutive_all_correct_or_all_wrong_rollouts():
    rewards = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0])
    easy, hard = greso_streaks(rewards, 4, torch.tensor([2, 0, 3]), torch.tensor([0, 5, 0]))
    assert easy.tolist() == [3, 0, 0] and hard.tolist() == [0, 6, 0]  # a mixed group resets its streak


@pytest.mark.parametrize("easy_ratio, hard_ratio, expected", [
    (0.0, 0.0, (0.51, 0.51)),           # fewer zero-variance groups than targeted: skip less
    (0.25 / 3, 0.5 / 3, (0.49, 0.49)),  # at the targets (1/3 and 2/3 of 0.25): skip more
    (0.5, 0.1, (0.49, 0.51)),
])
def test_adaptation_moves_each_base_toward_its_target(easy_ratio, hard_ratio, expected):
    assert greso_adapt(0.5, 0.5, easy_ratio, hard_ratio) == pytest.approx(expected)
    assert greso_adapt(0.05, 0.95, 1.0, 0.0) == pytest.approx((0.05, 0.95))  # clamped to [0.05, 0.95]


# --- tiny runs ----------------------------------------------------------------------------------------------------

REWARDS = """
def by_prompt(completions, prompts, **kwargs):  # every completion right for a third of the prompts, else 0 1 0 1
    return [1.0 if sum(map(ord, str(p))) % 3 == 1 else float(i % 2) for i, p in enumerate(prompts)]
"""


def recipe(tmp_path: Path, greso: str = "greso", max_steps: int = 8, trainer: str = "",
           data: str = '{source: "builtin:arithmetic", task: {n: 6, digits: 1}}') -> Path:
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    return write_recipe(tmp_path / "grpo.yaml", f"""
defaults: [base/grpo]
model: {{name_or_path: tiny, dtype: float32, tiny: {json.dumps(TINY)}}}
data: {{train: {data}}}
rewards: [{{fn: "my_rewards.py:by_prompt"}}]
trainer: {{max_steps: {max_steps}, per_device_train_batch_size: 8, logging_steps: 1, num_generations: 4,
          max_completion_length: 3, activation_checkpointing: false{trainer}}}
rl: {{samplers: [{greso}]}}
""")


def logged(run: Path) -> list[dict]:
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def test_prompts_all_correct_for_several_rollouts_get_skipped(tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["grpo", str(recipe(tmp_path, "{name: greso, p_easy: 0.3}", max_steps=9,
                                                    trainer=", save_strategy: steps, save_steps: 9")),
                                 f"output_dir={run}"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    steps = logged(run)
    assert [m["step"] for m in steps] == list(range(1, 10))
    skipped = [m["rl/sampler/greso/skipped_fraction"] for m in steps]
    assert skipped[0] == 0.0  # nothing has a history yet
    assert sum(skipped) > 0  # all-correct prompts were skipped later
    state = json.loads((run / "checkpoints" / "checkpoint-9" / "rl_state.json").read_text())
    streaks = state["tables"]["greso"]
    assert any(e >= 2 for e, _ in streaks.values())  # several all-correct rollouts in a row
    assert all(h == 0 for _, h in streaks.values())  # 0 1 0 1 groups are never all-wrong
    # every step trains on a full batch of 2 prompts; refills replace the skipped ones where the stream allows
    assert all(m["rl/sampler/greso/tested_prompts"] >= 2 for m in steps)
    assert all(0.0 < m["rl/sampler/greso/p_easy"] < 1.0 for m in steps)
    # the adaptation starts in the second epoch (3 steps of 2 prompts per epoch of 6): p_easy moves from 0.3
    assert steps[0]["rl/sampler/greso/p_easy"] == pytest.approx(0.3)
    assert any(abs(m["rl/sampler/greso/p_easy"] - 0.3) > 1e-9 for m in steps[3:])


def test_a_resumed_greso_run_continues_as_the_uninterrupted_one(tmp_path):
    """Within the main loop's first epoch: TRL 1.16's RepeatSampler has no set_epoch, so a run resumed in a later
    epoch replays the first epoch's prompt order (with or without GRESO). Each of 4 prompts occurs 6 times in the
    24 rows (12 steps an epoch), so prompts recur, build streaks and are skipped within the first 8 steps."""
    rows = [{"prompt": f"{d}+{d}=", "answer": str(2 * d)} for d in (1, 2, 3, 4) for _ in range(6)]
    (tmp_path / "repeats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe_path = recipe(tmp_path, "{name: greso, p_easy: 0.3}", max_steps=8,
                         trainer=", save_strategy: steps, save_steps: 1, save_total_limit: null",
                         data=f"{{source: {tmp_path / 'repeats.jsonl'}}}")
    run = tmp_path / "run"
    result = runner.invoke(app, ["grpo", str(recipe_path), f"output_dir={run}"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    checkpoints = run / "checkpoints"

    def state(step: int) -> dict:
        return json.loads((checkpoints / f"checkpoint-{step}" / "rl_state.json").read_text())

    at_4, at_8 = state(4), state(8)
    before = logged(run)
    assert at_4 != at_8 and at_8["counters"]["greso_draws"] > at_4["counters"]["greso_draws"]
    assert sum(m["rl/sampler/greso/skipped_fraction"] for m in before[4:]) > 0  # skips after the checkpoint
    for step in (5, 6, 7, 8):
        shutil.rmtree(checkpoints / f"checkpoint-{step}")
    result = runner.invoke(app, ["grpo", str(recipe_path), f"output_dir={run}", "--resume"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert state(8) == at_8
    after = logged(run)
    assert [m["step"] for m in after] == list(range(1, 9))
    for a, b in zip(before, after, strict=True):
        for key in ("reward", "rl/sampler/greso/skipped_fraction", "rl/sampler/greso/p_easy",
                    "rl/sampler/greso/refill_batches", "rl/sampler/greso/tested_prompts"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (b["step"], key)


@pytest.mark.parametrize("greso, expected", [
    ("{name: greso, p_easy: 1.5}", "rl.samplers[0].p_easy (1.5, rl.samplers[0], from"),
    ("{name: greso, max_num_gen_batches: -1}", "must be an integer >= 0"),
    ("{name: greso, min_p: 0.5, max_p: 0.4}", "max_p (0.4, rl.samplers[0]"),
])
def test_load_time_errors_name_the_key(tmp_path, greso, expected):
    result = runner.invoke(app, ["config", str(recipe(tmp_path, greso))])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert expected in " ".join(result.output.split())
