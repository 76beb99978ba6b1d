"""The console view of a training run (postrain.jobs.live): live panel or plain lines, chosen by the terminal or
POSTRAIN_LIVE, and what each shows."""

from __future__ import annotations

import io
import json
import sys
from collections import defaultdict, deque

import pytest
from rich.console import Console
from typer.testing import CliRunner

from postrain.cli import app
from postrain.errors import PostrainError
from postrain.jobs.live import LIVE_ENV, LiveView, PlainView, grpo_samples, make_view
from tests.conftest import TINY, write_recipe

runner = CliRunner()


def buffer_console(width: int = 120) -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=width, record=True, color_system="truecolor")


def rendered(view: LiveView) -> str:
    view.console.print(view.render())
    return view.console.export_text()


@pytest.mark.parametrize("env, tty, live", [
    (None, False, False), (None, True, True), ("auto", True, True),
    ("1", False, True), ("on", False, True), ("0", True, False), ("false", True, False),
])
def test_view_follows_the_terminal_unless_the_environment_says_otherwise(monkeypatch, env, tty, live):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    if env is None:
        monkeypatch.delenv(LIVE_ENV, raising=False)
    else:
        monkeypatch.setenv(LIVE_ENV, env)
    assert isinstance(make_view("grpo", "t"), LiveView if live else PlainView)


def test_a_bad_environment_value_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(LIVE_ENV, "sometimes")
    with pytest.raises(PostrainError, match=r"POSTRAIN_LIVE='sometimes': use 1 .* 0 .* unset"):
        make_view("grpo", "t")


def test_plain_view_prints_the_compact_lines(capsys):
    view = PlainView()
    view.metrics(3, 10, {"loss": 0.5, "reward": 0.25, "learning_rate": 1e-3, "entropy": 2.0})
    view.metrics(4, 10, {"eval/heldout/accuracy": 0.125, "eval/heldout/mean_reward": 0.375,
                         "eval/heldout/mean_length_tokens": 7.0})
    view.metrics(5, 10, {"train_runtime": 1.0})  # nothing it shows: no line
    assert capsys.readouterr().out == ("  step 3/10  loss 0.5  reward 0.25  learning_rate 0.001\n"
                                       "  eval heldout at step 4/10  accuracy 0.125  mean_reward 0.375\n")


GRPO_LOG = {"loss": 0.01, "reward": 0.4125, "reward_std": 0.2, "kl": 0.0031, "entropy": 1.75,
            "clip_ratio/region_mean": 0.05, "completions/mean_length": 12.5, "frac_reward_zero_std": 0.25,
            "learning_rate": 1e-6}


def test_live_view_shows_grpo_numbers_evaluation_and_samples():
    view = LiveView("grpo", "postrain grpo · runs/x", console=buffer_console())
    view.progress.reset(view.task, description="training", total=20, completed=7)
    view.metrics(0, 20, {"eval/heldout/accuracy": 0.1, "eval/heldout/mean_reward": 0.2})
    view.metrics(5, 20, GRPO_LOG)
    view.metrics(6, 20, {"eval/heldout/accuracy": 0.35, "eval/heldout/mean_reward": 0.9})
    view.samples(5, [{"prompt": [{"role": "user", "content": "2+2="}], "completion": "4 [bold]not markup[/bold]",
                      "rewards": {"exact_match": 1.0}, "advantage": 0.71},
                     {"prompt": "3+3=", "completion": "6" * 500, "rewards": {"exact_match": 0.0}, "advantage": -0.71}])
    text = rendered(view)
    long_row = next(line for line in text.splitlines() if "666" in line)
    assert long_row.split()[-3:] == ["0", "-0.71", "│"]  # a long completion is cut, its numbers stay
    assert "postrain grpo · runs/x" in text and "training" in text and "7/20" in text
    for label, value in (("reward mean", "0.4125"), ("reward std", "0.2"), ("KL", "0.0031"), ("entropy", "1.75"),
                         ("clip fraction", "0.05"), ("completion length", "12.5"), ("zero-variance groups", "0.25")):
        assert any(label in line and value in line for line in text.splitlines()), (label, text)
    heldout = next(line for line in text.splitlines() if "heldout" in line)
    assert heldout.split()[1:] == ["heldout", "6", "0.35", "0.9", "0.1", "(0)", "│"]  # latest; first, at step 0
    assert "4 [bold]not markup[/bold]" in text and "2+2=" in text and "0.71" in text  # completions are not markup


@pytest.mark.parametrize("job, logs, shown, hidden", [
    ("dpo", {"loss": 0.69, "rewards/margins": 0.013, "rewards/accuracies": 0.625, "reward": 9.0},
     [("loss", "0.69"), ("reward margin", "0.013"), ("preference accuracy", "0.625")], ["reward mean"]),
    ("sft", {"loss": 2.5, "mean_token_accuracy": 0.375, "entropy": 9.0},
     [("loss", "2.5"), ("token accuracy", "0.375")], ["entropy"]),
])
def test_live_view_shows_the_numbers_of_each_job(job, logs, shown, hidden):
    view = LiveView(job, "t", console=buffer_console())
    view.metrics(1, 2, logs)
    text = rendered(view)
    for label, value in shown:
        assert any(label in line and value in line for line in text.splitlines()), (label, text)
    assert not any(label in text for label in hidden)
    assert "sampled completions" not in text and "evaluation during training" not in text


def test_live_view_starts_and_stops_on_a_buffer():
    console = buffer_console()
    view = LiveView("grpo", "t", console=console, refresh_per_second=20)
    view.start(0, 5)
    for step in range(1, 6):
        view.advance(step)
        view.metrics(step, 5, GRPO_LOG)
    view.phase("evaluating heldout")
    view.stop()
    view.stop()  # a second stop (the job's `finally`) is harmless
    out = console.export_text()
    assert "5/5" in out and "evaluating heldout" in out and "0.4125" in out


def test_grpo_samples_take_one_completion_per_group_from_the_latest_batch():
    logs = {"prompt": deque(f"p{i // 2}" for i in range(8)), "completion": deque(f"c{i}" for i in range(8)),
            "rewards": defaultdict(deque, {"r": deque(float(i) for i in range(8))}),
            "advantages": deque(-float(i) for i in range(8))}
    trainer = type("T", (), {"_logs": logs, "num_generations": 2})()
    rows = grpo_samples(trainer, 3)
    assert [(r["prompt"], r["completion"], r["rewards"]["r"], r["advantage"]) for r in rows] == [
        ("p0", "c0", 0.0, -0.0), ("p1", "c2", 2.0, -2.0), ("p2", "c4", 4.0, -4.0)]
    assert grpo_samples(object(), 3) == []  # sft / dpo trainers keep no completions


def grpo_recipe(tmp_path):
    return write_recipe(tmp_path / "grpo.yaml", f"""
defaults: [base/grpo]
model: {{name_or_path: tiny, dtype: float32, tiny: {json.dumps(TINY)}}}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
trainer: {{max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1, num_generations: 2,
          max_completion_length: 4, use_vllm: false, activation_checkpointing: false}}
eval_during_training:
  every_steps: 1
  sets: {{heldout: {{source: "builtin:arithmetic", split: test, task: {{n: 4}}}}}}
""")


@pytest.mark.parametrize("forced", [False, True])
def test_a_grpo_run_prints_plain_lines_off_a_terminal_and_the_panel_when_forced(tmp_path, monkeypatch, forced):
    if forced:
        monkeypatch.setenv(LIVE_ENV, "1")
    else:
        monkeypatch.delenv(LIVE_ENV, raising=False)
    result = runner.invoke(app, ["grpo", str(grpo_recipe(tmp_path)), f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    if forced:
        assert "\x1b[" in result.output and "╭" in result.output  # terminal codes and the panel
        for part in ("evaluation during training", "sampled completions (step 2)", "exact_match", "2/2"):
            assert part in result.output, part
        assert "  step 1/2" not in result.output
    else:
        assert "  step 1/2  loss" in result.output and "  eval heldout at step 0/2  accuracy" in result.output
        assert "\x1b[" not in result.output and "╭" not in result.output
