"""`postrain plot`: curves of several runs overlaid in one PNG, the plotted points beside it as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from postrain.cli import app
from tests.conftest import TINY, write_recipe

runner = CliRunner()


def write_run(run_dir: Path, lines: list[dict], command: str = "grpo") -> Path:
    """A run directory as a training job leaves it (the files the plot reads, with made-up numbers)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(f"# postrain resolved recipe, hash 0\ncommand: {command}\n"
                                         f"name: {run_dir.name}\n")
    (run_dir / "status.json").write_text('{"status": "done"}\n')
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


def grpo_lines(scale: float, with_kl: bool = True) -> list[dict]:
    """Steps 1-4 of a GRPO log: reward = scale * step, loss = 1 / step; KL missing at step 2 (an interrupted log
    line), the held-out evaluation on lines of its own at steps 0 and 4, and TRL's closing summary line."""
    lines = [{"step": 0, "eval/heldout/accuracy": 0.1 * scale}]
    for step in range(1, 5):
        line = {"step": step, "reward": scale * step, "loss": 1 / step, "entropy": 2.0, "completions/mean_length": 8,
                "clip_ratio/region_mean": 0.0}
        if with_kl and step != 2:
            line["kl"] = 0.01 * step
        lines.append(line)
    lines.append({"step": 4, "eval/heldout/accuracy": 0.5 * scale, "eval/heldout/mean_reward": scale})
    lines.append({"step": 4, "train_runtime": 1.0, "train_loss": 0.5})
    return lines


def plot(*args: str):
    return runner.invoke(app, ["plot", *map(str, args)])


def curves_by(data: dict) -> dict[tuple[str, str], dict]:
    return {(c["run"], c["key"]): c for c in data["curves"]}


def test_two_grpo_runs_share_every_panel_and_the_data_holds_each_runs_points(tmp_path):
    a = write_run(tmp_path / "grpo-a", grpo_lines(1.0))
    b = write_run(tmp_path / "grpo-b", grpo_lines(2.0, with_kl=False))
    out = tmp_path / "figs" / "cmp.png"
    result = plot(a, b, "-o", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["runs"] == {"grpo-a": str(a), "grpo-b": str(b)}
    curves = curves_by(data)
    for run, scale in (("grpo-a", 1.0), ("grpo-b", 2.0)):
        assert curves[run, "reward"]["steps"] == [1, 2, 3, 4]
        assert curves[run, "reward"]["values"] == [scale * s for s in (1, 2, 3, 4)]
        assert curves[run, "loss"]["values"] == [1.0, 0.5, 1 / 3, 0.25]
        # The task metric: the eval lines only, at their own steps (0 and 4), one line per set.
        task = curves[run, "eval/heldout/accuracy"]
        assert (task["panel"], task["steps"], task["values"]) == ("task metric", [0, 4], [0.1 * scale, 0.5 * scale])
        assert task["label"] == f"{run}: heldout"
        assert curves[run, "eval/heldout/mean_reward"]["steps"] == [4]
    # A line without the key is a missing point, not a zero.
    assert curves["grpo-a", "kl"]["steps"] == [1, 3, 4] and curves["grpo-a", "kl"]["values"] == [0.01, 0.03, 0.04]
    # The run that logged no KL is left out of that panel, with a note naming it.
    assert ("grpo-b", "kl") not in curves
    assert "grpo-b: no KL (kl) in metrics.jsonl; left out of that panel" in result.output
    assert "logged by no run, so not plotted: preference accuracy (rewards/accuracies)" in result.output


def test_same_named_runs_get_distinct_legend_names_and_a_pipeline_stands_for_its_training_stages(tmp_path):
    a = write_run(tmp_path / "x" / "grpo", grpo_lines(1.0))
    b = write_run(tmp_path / "y" / "grpo", grpo_lines(2.0))
    assert plot(a, b, "-o", tmp_path / "same.png").exit_code == 0
    assert set(json.loads((tmp_path / "same.json").read_text())["runs"]) == {"x/grpo", "y/grpo"}

    pipe = tmp_path / "pipe"
    write_run(pipe / "sft", [{"step": s, "loss": 3.0 - s, "mean_token_accuracy": 0.1 * s} for s in (1, 2)], "sft")
    write_run(pipe / "grpo", grpo_lines(1.0))
    (pipe / "ev").mkdir()
    (pipe / "ev" / "results.json").write_text('{"sets": {}}')
    (pipe / "recipe.yaml").write_text("command: pipeline\nname: pipe\nstages: {sft: {command: sft}, "
                                      "ev: {command: eval}, grpo: {command: grpo}}\n")
    result = plot(pipe, "-o", tmp_path / "pipe.png")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "pipe.json").read_text())
    assert list(data["runs"]) == ["sft", "grpo"]  # the pipeline's order; the eval stage has no curves
    assert curves_by(data)["sft", "mean_token_accuracy"]["values"] == [0.1, 0.2]


def test_a_path_that_is_not_a_run_directory_is_named_with_what_a_run_directory_holds(tmp_path):
    good = write_run(tmp_path / "good", grpo_lines(1.0))
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        result = plot(good, bad, "-o", tmp_path / "c.png")
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert str(bad) in result.output and "metrics.jsonl" in result.output and "recipe.yaml" in result.output
    assert not (tmp_path / "c.png").exists()
    assert "path ending in .png" in plot(good, "-o", tmp_path / "c.pdf").output


def test_an_existing_figure_is_replaced_only_with_overwrite(tmp_path):
    run = write_run(tmp_path / "run", grpo_lines(1.0))
    out = tmp_path / "c.png"
    assert plot(run, "-o", out).exit_code == 0
    before = out.read_bytes()
    write_run(tmp_path / "run", grpo_lines(3.0))
    again = plot(run, "-o", out)
    assert again.exit_code == 2 and "--overwrite" in again.output and out.read_bytes() == before
    assert plot(run, "-o", out, "--overwrite").exit_code == 0
    assert curves_by(json.loads(out.with_suffix(".json").read_text()))["run", "reward"]["values"][0] == 3.0


def test_an_eval_run_has_nothing_to_plot_and_a_damaged_metrics_line_is_named(tmp_path):
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "results.json").write_text('{"sets": {}}')
    result = plot(ev, "-o", tmp_path / "c.png")
    assert result.exit_code == 2 and "nothing to plot" in result.output and "an eval run" in result.output

    run = write_run(tmp_path / "run", grpo_lines(1.0))
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + '{"step": 5, "rew')  # a line a running job is still writing
    assert plot(run, "-o", tmp_path / "ok.png").exit_code == 0
    (run / "metrics.jsonl").write_text('{"step": 1, "reward": 1}\nnot json\n{"step": 2, "reward": 2}\n')
    damaged = plot(run, "-o", tmp_path / "bad.png")
    assert damaged.exit_code == 2 and "metrics.jsonl, line 2, is not JSON" in damaged.output


def test_a_real_grpo_run_is_plotted_with_the_points_it_logged(tmp_path):
    recipe = write_recipe(tmp_path / "grpo.yaml", f"""
defaults: [base/grpo]
model: {{name_or_path: tiny, dtype: float32, tiny: {json.dumps(TINY)}}}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
rewards: [{{name: exact_match}}]
trainer: {{max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1, num_generations: 4,
           max_completion_length: 4, use_vllm: false, activation_checkpointing: false}}
""")
    trained = runner.invoke(app, ["grpo", str(recipe), f"output_dir={tmp_path / 'real'}"])
    assert trained.exit_code == 0, trained.output
    other = write_run(tmp_path / "synthetic", grpo_lines(1.0))
    assert plot(tmp_path / "real", other, "-o", tmp_path / "c.png").exit_code == 0
    curves = curves_by(json.loads((tmp_path / "c.json").read_text()))
    logged = [json.loads(line) for line in (tmp_path / "real" / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward", "loss", "entropy", "completions/mean_length", "clip_ratio/region_mean"):
        expected = [(m["step"], m[key]) for m in logged if key in m]
        assert len(expected) == 2, key
        assert list(zip(curves["real", key]["steps"], curves["real", key]["values"])) == expected
        assert ("synthetic", key) in curves


def test_two_grpo_runs_with_evaluation_during_training_are_plotted_together(tmp_path):
    """Issue #9's end-to-end check: GRPO runs on the embedded model log the task metric at the configured interval,
    and `postrain plot` of the two writes one PNG whose data holds both runs' task-metric points."""
    runs = []
    for name, lr in (("lr-low", 1e-4), ("lr-high", 5e-2)):
        recipe = write_recipe(tmp_path / f"{name}.yaml", f"""
defaults: [base/grpo]
model: {{name_or_path: tiny, dtype: float32, tiny: {json.dumps(TINY)}}}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
rewards: [{{name: exact_match}}]
trainer: {{max_steps: 4, per_device_train_batch_size: 4, logging_steps: 1, num_generations: 4, learning_rate: {lr},
           max_completion_length: 4, use_vllm: false, activation_checkpointing: false}}
eval_during_training:
  every_steps: 2
  sets: {{heldout: {{source: "builtin:arithmetic", split: test, task: {{n: 8, digits: 1}}}}}}
""")
        trained = runner.invoke(app, ["grpo", str(recipe), f"output_dir={tmp_path / name}"])
        assert trained.exit_code == 0, trained.output
        runs.append(tmp_path / name)
    out = tmp_path / "both.png"
    assert plot(*runs, "-o", out).exit_code == 0
    assert out.stat().st_size > 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = curves_by(json.loads(out.with_suffix(".json").read_text()))
    key = "eval/heldout/accuracy"
    for run in runs:
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        expected = [(m["step"], m[key]) for m in logged if key in m]
        assert [step for step, _ in expected] == [0, 2, 4], expected  # at the start, every 2 steps, at the end
        curve = curves[run.name, key]
        assert list(zip(curve["steps"], curve["values"])) == expected
