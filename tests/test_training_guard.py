"""A run that produced NaN is a failure, a run that learns nothing says so, a signal leaves a resumable run
(issue #18; postrain.jobs.guard and postrain.jobs.signals). Tiny models, in-process: the signals are real ones,
sent by the test process to itself from inside a training step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from postrain.cli import app
from postrain.jobs.guard import StallWatch
from postrain.jobs.rundir import checkpoint_problem, complete_checkpoints
from tests.conftest import REPO, TINY, at_step, read_jsonl, source_digest, write_recipe

runner = CliRunner()
TINY_MODEL = "model: {name_or_path: tiny, dtype: float32, tiny: %s}" % json.dumps(TINY)
SAVING = ["trainer.save_strategy=steps", "trainer.save_steps=1", "trainer.save_total_limit=10"]


def sft_recipe(tmp_path: Path, data: str = '{source: "builtin:arithmetic", task: {n: 48, digits: 1}}') -> Path:
    return write_recipe(tmp_path / "sft.yaml", f"""
defaults: [base/sft]
{TINY_MODEL}
data: {{train: {data}}}
trainer: {{max_steps: 6, per_device_train_batch_size: 4, logging_steps: 1, max_length: 32, learning_rate: 1.0e-3}}
""")


def sft(tmp_path: Path, out: Path, *args: str, recipe: Path | None = None):
    return runner.invoke(app, ["sft", str(recipe or sft_recipe(tmp_path)), f"output_dir={out}", *args])


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def nan(loss):
    return loss * float("nan")


# --- non-finite steps -------------------------------------------------------------------------------------------

def test_a_nan_at_step_k_stops_the_run_there_and_keeps_the_checkpoint_before_it(tmp_path, monkeypatch):
    from trl import SFTTrainer

    out = tmp_path / "run"
    at_step(monkeypatch, SFTTrainer, 4, nan)
    result = sft(tmp_path, out, *SAVING)
    assert result.exit_code == 1 and "Traceback" not in result.output
    said = " ".join(result.output.split())
    assert "step 4: the loss is nan and the gradient norm is nan (health.nonfinite: stop)" in said
    assert f"the last checkpoint, {out / 'checkpoints' / 'checkpoint-3'}, is intact" in said
    recorded = status(out)
    assert recorded["status"] == "failed" and recorded["step"] == 4 and "step 4: the loss is nan" in recorded["error"]
    assert [p.name for p in complete_checkpoints(out)[0]] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert all(torch.isfinite(t).all() for t in weights(out / "checkpoints" / "checkpoint-3").values())
    assert not (out / "model").exists()  # nothing is shipped as the run's model
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl") if "loss" in m] == [1, 2, 3]  # no NaN logged
    batch = read_jsonl(out / "nonfinite_step_4.jsonl")  # the step's batch, decoded
    assert len(batch) == 4 and all(row["prompt"] and row["text"].startswith(row["prompt"]) for row in batch)
    assert all("+" in row["prompt"] for row in batch)  # arithmetic prompts: "3+4="

    # health: is not in the recipe hash, so the run resumes with the step skipped instead
    resumed = sft(tmp_path, out, *SAVING, "--resume", "health.nonfinite=skip")
    assert resumed.exit_code == 0, resumed.output
    assert "step 4: the loss is nan and the gradient norm is nan; the step's update is dropped" in \
        " ".join(resumed.output.split())
    assert status(out)["status"] == "done" and status(out)["skipped_steps"] == 1
    logged = [m for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
    assert [m["health/skipped_steps"] for m in logged if m["step"] >= 4] == [1, 1, 1]
    before, skipped = (weights(out / "checkpoints" / f"checkpoint-{k}") for k in (3, 4))
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # step 4 changed no weight
    after = weights(out / "checkpoints" / "checkpoint-5")
    assert any(not torch.equal(skipped[k], after[k]) for k in skipped)  # step 5 trained again


def test_skipped_steps_are_bounded(tmp_path, monkeypatch):
    from trl import SFTTrainer

    out = tmp_path / "run"
    for step in (2, 3):
        at_step(monkeypatch, SFTTrainer, step, nan)
    result = sft(tmp_path, out, "health.nonfinite=skip", "health.max_skipped_steps=1")
    assert result.exit_code == 1
    said = " ".join(result.output.split())
    assert "step 3: the loss is nan" in said and "1 steps were skipped already (health.max_skipped_steps: 1)" in said
    assert status(out)["status"] == "failed"


def test_sft_at_learning_rate_1e30_fails_instead_of_saving_nan_weights(tmp_path):
    """The issue's reproduction: the grad norm was NaN from step 2, the loss shown as 0.0, the status done and
    every saved tensor NaN or inf, exit 0."""
    out = tmp_path / "run"
    result = sft(tmp_path, out, "trainer.learning_rate=1e30")
    assert result.exit_code == 1 and "Traceback" not in result.output
    recorded = status(out)
    assert recorded["status"] == "failed" and recorded["step"] >= 2
    assert "health.nonfinite: stop" in recorded["error"] and not (out / "model").exists()
    assert all(isinstance(loss, float) and loss == loss for loss in losses(out).values())  # no NaN in the log


def test_weights_that_are_not_finite_are_not_saved():
    from postrain.jobs.guard import NonFiniteError, check_finite_weights

    check_finite_weights({"a": torch.ones(3), "step": torch.tensor(3)})
    with pytest.raises(NonFiniteError, match=r"hold NaN or inf \(1 of 2 tensors: b\)"):
        check_finite_weights({"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")])})


# --- learning that stalled ----------------------------------------------------------------------------------------

def test_stall_watch_counts_the_steps_each_log_stands_for():
    watch = StallWatch("sft", stall_steps=30)
    assert watch.observe(10, {"loss": 2.0, "grad_norm": 1.0}) == []
    assert watch.observe(20, {"loss": 1.5, "grad_norm": 1.0}) == []
    assert watch.observe(30, {"loss": 1.5, "grad_norm": 1.0}) == []  # steps 11-30: 20 steps
    assert watch.observe(40, {"eval/heldout/accuracy": 0.5}) == []  # not a training log
    [warning] = watch.observe(40, {"loss": 1.5, "grad_norm": 1.0})  # steps 11-40: 30
    assert warning.startswith("the loss was exactly 1.5 at every log of steps 11-40")
    assert watch.observe(50, {"loss": 1.5, "grad_norm": 1.0}) == []  # once per streak
    assert watch.observe(60, {"loss": 1.4, "grad_norm": 0.0}) == []
    assert watch.observe(90, {"loss": 1.3, "grad_norm": 0.0})[0].startswith("the gradient norm was exactly 0 for "
                                                                           "steps 51-90")
    grpo = StallWatch("grpo", stall_steps=2)
    assert grpo.observe(1, {"loss": 0.0, "frac_reward_zero_std": 1.0}) == []  # GRPO's loss is near 0 anyway
    [warning] = grpo.observe(2, {"loss": 0.0, "frac_reward_zero_std": 1.0})
    assert warning.startswith("every group of every GRPO batch had the same reward") and grpo.warnings == [warning]
    assert StallWatch("sft", stall_steps=0).observe(100, {"loss": 1.0}) == []  # 0: off


def test_a_constant_loss_is_warned_about(tmp_path):
    """Every row the same and a learning rate of 0: the loss cannot move."""
    rows = tmp_path / "same.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n" for _ in range(32)))
    out = tmp_path / "run"
    result = sft(tmp_path, out, "trainer.learning_rate=0.0", "health.stall_steps=4",
                 recipe=sft_recipe(tmp_path, f'{{source: "{rows}"}}'))
    assert result.exit_code == 0, result.output
    assert "warning: the loss was exactly" in result.output and "steps 1-4" in result.output
    assert len(status(out)["warnings"]) == 1 and status(out)["status"] == "done"


def test_grpo_without_reward_variance_is_warned_about(tmp_path):
    (tmp_path / "constant.py").write_text("def one(completions, **kwargs):\n    return [1.0 for _ in completions]\n")
    recipe = write_recipe(tmp_path / "grpo.yaml", f"""
defaults: [base/grpo]
{TINY_MODEL}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
rewards: [{{fn: "constant.py:one"}}]
trainer: {{max_steps: 3, per_device_train_batch_size: 4, num_generations: 4, max_completion_length: 4,
          logging_steps: 1}}
health: {{stall_steps: 3}}
""")
    out = tmp_path / "run"
    result = runner.invoke(app, ["grpo", str(recipe), f"output_dir={out}"])
    assert result.exit_code == 0, result.output
    warnings = status(out)["warnings"]
    assert any(w.startswith("every group of every GRPO batch had the same reward for all its completions for steps "
                            "1-3") for w in warnings), warnings
    assert any(w.startswith("the gradient norm was exactly 0 for steps 1-3") for w in warnings), warnings


def test_health_values_are_checked_at_load_time(tmp_path):
    from postrain.errors import RecipeError
    from postrain.jobs import load_recipe

    with pytest.raises(RecipeError, match=r"health.max_skipped_steps \(from command line\) must be 0 or more"):
        load_recipe(sft_recipe(tmp_path), ["health.max_skipped_steps=-1"])
    with pytest.raises(RecipeError, match="health.nonfinite"):
        load_recipe(sft_recipe(tmp_path), ["health.nonfinite=ignore"])
    with pytest.raises(RecipeError, match="launch.config zero3 cannot do: DeepSpeed's engine applies the update"):
        load_recipe(sft_recipe(tmp_path), ["health.nonfinite=skip", "launch.config=zero3"])
    plain = load_recipe(sft_recipe(tmp_path))
    assert load_recipe(sft_recipe(tmp_path), ["health.nonfinite=skip"]).hash == plain.hash


# --- signals ------------------------------------------------------------------------------------------------------

def test_sigterm_saves_a_checkpoint_marks_the_run_interrupted_and_resume_gives_the_same_losses(tmp_path,
                                                                                                 monkeypatch):
    from trl import SFTTrainer

    full, out = tmp_path / "full", tmp_path / "run"
    no_saves = ['trainer.save_strategy="no"']  # the signal saves a checkpoint all the same
    assert sft(tmp_path, full, *no_saves).exit_code == 0

    at_step(monkeypatch, SFTTrainer, 3, lambda loss: os.kill(os.getpid(), signal.SIGTERM) or loss)
    stopped = sft(tmp_path, out, *no_saves)
    assert stopped.exit_code == 143 and "Traceback" not in stopped.output
    said = " ".join(stopped.output.split())
    assert "SIGTERM received: finishing this step, saving a checkpoint, then stopping" in said
    assert f"stopped: interrupted by SIGTERM at step 3: {out} is marked interrupted; continue it from checkpoint-3 " \
           f"with --resume" in said
    recorded = status(out)
    assert (recorded["status"], recorded["signal"], recorded["step"], recorded["checkpoint"]) == \
        ("interrupted", "SIGTERM", 3, "checkpoint-3")
    assert checkpoint_problem(out / "checkpoints" / "checkpoint-3") is None and not (out / "model").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are given back

    monkeypatch.undo()
    resumed = sft(tmp_path, out, *no_saves, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert losses(out) == losses(full) and status(out)["status"] == "done"
    a, b = weights(full / "model"), weights(out / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_signal_stops_at_once_and_ctrl_c_exits_130(monkeypatch):
    from postrain.jobs import signals

    before = signal.getsignal(signal.SIGINT)  # not always Python's default: an earlier test may have left another
    with signals.handled():
        assert signal.getsignal(signal.SIGINT) is not before
        with signals.training():
            os.kill(os.getpid(), signal.SIGINT)
            assert signals.stop_requested() == signal.SIGINT  # the first waits for the step's end
            os.kill(os.getpid(), signal.SIGINT)  # at once again: the same request (a launcher forwarding it)
            monkeypatch.setattr(signals, "SAME_REQUEST_S", 0.0)
            with pytest.raises(signals.Interrupted) as stopped:
                os.kill(os.getpid(), signal.SIGINT)
    assert stopped.value.exit_code == 130 and str(stopped.value) == "interrupted by SIGINT"
    assert signals.Interrupted(signal.SIGTERM).exit_code == 143
    assert signal.getsignal(signal.SIGINT) is before  # handled() puts back the handler it found


@pytest.mark.parametrize("how", ["SIGTERM", "KeyboardInterrupt"])
def test_a_signal_outside_training_marks_an_eval_interrupted(tmp_path, monkeypatch, how):
    import postrain.jobs.evaluate as evaluate

    def evaluate_model(*args, **kwargs):
        if how == "KeyboardInterrupt":  # Ctrl-C as Python's own handler reports it
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal did not stop the run")

    monkeypatch.setattr(evaluate, "evaluate_model", evaluate_model)
    recipe = write_recipe(tmp_path / "eval.yaml", f"""
defaults: [base/eval]
{TINY_MODEL}
sets: {{heldout: {{source: "builtin:arithmetic", split: test, task: {{n: 4, digits: 1}}}}}}
""")
    result = runner.invoke(app, ["eval", str(recipe), f"output_dir={tmp_path / 'ev'}"])
    signal_name = "SIGTERM" if how == "SIGTERM" else "SIGINT"
    assert result.exit_code == (143 if how == "SIGTERM" else 130)
    recorded = status(tmp_path / "ev")
    assert (recorded["status"], recorded["signal"], recorded["checkpoint"]) == ("interrupted", signal_name, None)
    assert "with no checkpoint to continue from: start over with --overwrite" in " ".join(result.output.split())


SIGTERM_ONCE = '''import os, signal
from pathlib import Path


def stop_once(completions, **kwargs):
    """A reward that sends the training process SIGTERM the third time it is called, once (a marker file)."""
    calls = Path(os.environ["CALLS_FILE"])
    count = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(count))
    if count == 3 and not Path(os.environ["MARKER"]).exists():
        Path(os.environ["MARKER"]).write_text("sent")
        # a reward runs in its own worker process (postrain.rewards.worker): the training process is its parent
        os.kill(os.getppid(), signal.SIGTERM)
    return [float(len(c if isinstance(c, str) else c[-1]["content"]) % 3) for c in completions]
'''


@pytest.mark.slow
def test_sigterm_to_a_grpo_process_exits_143_and_the_run_resumes(tmp_path):
    """A real process: the exit code, the message and status.json after SIGTERM (the issue: exit 143, no message,
    status "running" forever), then --resume to the end."""
    (tmp_path / "stop.py").write_text(SIGTERM_ONCE)
    recipe = write_recipe(tmp_path / "grpo.yaml", f"""
defaults: [base/grpo]
{TINY_MODEL}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 32, digits: 1}}}}}}
rewards: [{{fn: "stop.py:stop_once"}}]
trainer: {{max_steps: 5, per_device_train_batch_size: 4, num_generations: 4, max_completion_length: 4,
          logging_steps: 1, learning_rate: 1.0e-3}}
""")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MARKER": str(tmp_path / "sent"),
           "CALLS_FILE": str(tmp_path / "calls")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "POSTRAIN_LAUNCHED"):
        env.pop(key, None)
    command = [sys.executable, "-m", "postrain.cli", "grpo", str(recipe), f"output_dir={tmp_path / 'run'}"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 143, first.stdout[-2000:] + first.stderr[-2000:]
    said = " ".join(first.stderr.split())
    assert "stopped: interrupted by SIGTERM at step 3" in said and "continue it from checkpoint-3 with --resume" in said
    recorded = status(tmp_path / "run")
    assert (recorded["status"], recorded["step"], recorded["checkpoint"]) == ("interrupted", 3, "checkpoint-3")
    second = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert status(tmp_path / "run")["status"] == "done"
    assert [m["step"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in m] == [1, 2, 3, 4, 5]


# --- the library code the guard relies on -------------------------------------------------------------------------

GUARDED_SOURCE = {
    # _get_grad_norm runs once per optimizer step, after every micro-batch's training_step and before
    # optimizer.step(); _maybe_log_save_evaluate saves when on_step_end asked for it (the stop on a signal)
    "transformers.trainer:Trainer._inner_training_loop":
        "20ec4276e99fe7aee4db57e6d2dbe9455982362f051a96c9a1be3e6190d7a90a",
    "transformers.trainer:Trainer._get_grad_norm": "913ba6f52f074d10a4981ffcaac608e99d1b9caaa21666d86f3ea0ad91f05753",
    "transformers.trainer:Trainer._maybe_log_save_evaluate":
        "af101534f0f7b2d7fa6984044242e6f125c51092b05c755566c14823f2b43696",
    # a checkpoint's folder is <_get_output_dir()>/checkpoint-N, rotated inside; best_model_checkpoint named there
    "transformers.trainer:Trainer._save_checkpoint": "a9111e30faa9933986e022e56b5af81fd990356db64d727b4c320c852283bf3b",
    "transformers.trainer:Trainer._get_output_dir": "97172085342ac46c33cb3d63ab5160c33eb66d24e3a0e5c339c5bbb8b3862980",
    "trl.trainer.grpo_trainer:GRPOTrainer._save_checkpoint":
        "ec91bde1236491119dc68afed1d02f087b62b17f910521f8e4ba1360cc0b0e20",
}


@pytest.mark.parametrize("reference", list(GUARDED_SOURCE))
def test_library_code_the_guard_relies_on_is_unchanged(reference):
    assert source_digest(reference) == GUARDED_SOURCE[reference], \
        f"{reference} changed: re-check postrain/jobs/guard.py (TrainingGuard)"
