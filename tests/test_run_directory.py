"""Nothing already written is lost (issue #18): --overwrite keeps the previous run until the new one finished,
model / checkpoint / status writes are atomic, --resume takes the last complete checkpoint and survives a torn
metrics line, one run per directory. Tiny models, in-process unless a second process is the point."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from postrain.cli import app
from postrain.jobs.rundir import RunLock, checkpoint_problem, complete_checkpoints, lock_path
from tests.conftest import REPO, TINY, at_step, read_jsonl, write_recipe

runner = CliRunner()


def sft_recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "sft.yaml", f"""
defaults: [base/sft]
model: {{name_or_path: tiny, dtype: float32, tiny: {json.dumps(TINY)}}}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 32, digits: 1}}}}}}
trainer: {{max_steps: 4, per_device_train_batch_size: 4, logging_steps: 1, max_length: 32, learning_rate: 1.0e-3}}
""")


def sft(tmp_path: Path, out: Path, *args: str):
    return runner.invoke(app, ["sft", str(sft_recipe(tmp_path)), f"output_dir={out}", *args])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m}


def test_an_overwrite_that_fails_at_save_leaves_the_previous_run_intact(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert sft(tmp_path, out).exit_code == 0
    before = snapshot(out)
    assert json.loads(before["status.json"])["status"] == "done" and "model/model.safetensors" in before

    from transformers import PreTrainedModel

    def disk_full(self, save_directory, *args, **kwargs):  # a model write that runs out of space midway
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        (Path(save_directory) / "config.json").write_text("{}")
        (Path(save_directory) / "model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    failed = sft(tmp_path, out, "--overwrite", "trainer.learning_rate=0.002")
    assert failed.exit_code != 0
    assert snapshot(out) == before  # the previous run, byte for byte
    attempt = tmp_path / "run.new"
    assert json.loads((attempt / "status.json").read_text())["status"] == "failed"
    assert "No space left on device" in json.loads((attempt / "status.json").read_text())["error"]
    assert not (attempt / "model").exists()  # the torn model stayed in model.partial, which no reader takes
    assert str(attempt) in " ".join(failed.output.split())  # the user is told where the failed run is
    assert not lock_path(out).exists()

    monkeypatch.undo()
    again = sft(tmp_path, out, "--overwrite", "trainer.learning_rate=0.002")
    assert again.exit_code == 0, again.output
    assert not attempt.exists() and not list(tmp_path.glob(".run.replaced-*"))
    assert json.loads((out / "status.json").read_text())["status"] == "done"
    assert "learning_rate: 0.002" in (out / "recipe.yaml").read_text()
    assert (out / "model" / "model.safetensors").read_bytes() != before["model/model.safetensors"]


def test_resume_skips_a_torn_checkpoint_and_a_torn_metrics_line(tmp_path):
    """As a run killed on a full disk while saving step 3 leaves it: checkpoint-3 half-written, the metrics line
    being appended cut short. --resume continues from checkpoint-2 and trains as the run did."""
    import shutil

    from safetensors.torch import load_file

    out = tmp_path / "run"
    saving = ["trainer.save_strategy=steps", "trainer.save_steps=1", "trainer.save_total_limit=10"]
    assert sft(tmp_path, out, *saving).exit_code == 0
    uninterrupted, final_weights = losses(out), load_file(out / "model" / "model.safetensors")

    shutil.rmtree(out / "model")
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    weights = out / "checkpoints" / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    (out / "status.json").write_text(json.dumps({**json.loads((out / "status.json").read_text()),
                                                 "status": "running"}))
    kept = [line for line in (out / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 3]
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in kept) + '{"step": 4, "loss": 0.1')
    assert [p.name for p in complete_checkpoints(out)[0]] == ["checkpoint-1", "checkpoint-2"]

    resumed = sft(tmp_path, out, *saving, "--resume")
    assert resumed.exit_code == 0, resumed.output
    said = " ".join(resumed.output.split())
    assert "checkpoint-3 is incomplete (model.safetensors is truncated" in said and "resuming from checkpoint-2" in said
    assert "its last line is cut short" in said
    assert losses(out) == uninterrupted  # steps 3 and 4 trained again from checkpoint-2, as the first time
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl") if "loss" in m] == [1, 2, 3, 4]
    assert [p.name for p in complete_checkpoints(out)[0]] == [f"checkpoint-{i}" for i in range(1, 5)]
    resumed_weights = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(resumed_weights[k], final_weights[k]) for k in final_weights)


def test_a_checkpoint_is_complete_only_with_every_file_whole(tmp_path):
    """checkpoint_problem against files cut as a full disk cuts them (each check seen to fail, then to pass)."""
    from safetensors.torch import save_file

    ckpt = tmp_path / "checkpoint-5"
    ckpt.mkdir()
    assert "trainer_state.json is missing" in checkpoint_problem(ckpt)
    (ckpt / "trainer_state.json").write_text('{"global_step": 5, "log_hist')
    assert "trainer_state.json does not parse" in checkpoint_problem(ckpt)
    (ckpt / "trainer_state.json").write_text('{"global_step": 5}')
    assert checkpoint_problem(ckpt) == "it holds no weights"
    save_file({"w": torch.ones(64, 64)}, ckpt / "model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.ones(64, 64)}}}, ckpt / "optimizer.pt")
    assert checkpoint_problem(ckpt) is None
    whole = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(whole[: len(whole) - 200])  # the zip's central directory is written last
    assert checkpoint_problem(ckpt) == "optimizer.pt is not a whole torch archive"
    (ckpt / "optimizer.pt").write_bytes(whole)
    weights = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(weights[:-1])
    assert checkpoint_problem(ckpt).startswith("model.safetensors is truncated")
    (ckpt / "model.safetensors").write_bytes(weights[:4])
    assert checkpoint_problem(ckpt) == "model.safetensors has no readable safetensors header"


def test_checkpoints_are_written_aside_and_renamed_into_place(tmp_path, monkeypatch):
    """A save that dies midway leaves no checkpoint-N folder, so nothing can resume from half a checkpoint."""
    import transformers

    out = tmp_path / "run"
    real = transformers.Trainer._save_rng_state
    seen = []

    def dies_at_step_2(self, output_dir):
        seen.append(Path(output_dir))
        if self.state.global_step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", dies_at_step_2)
    result = sft(tmp_path, out, "trainer.save_strategy=steps", "trainer.save_steps=1")
    assert result.exit_code != 0
    assert seen[0] == out / "checkpoints" / ".checkpoint-1.partial" / "checkpoint-1"  # written aside
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1"]
    assert checkpoint_problem(out / "checkpoints" / "checkpoint-1") is None
    assert json.loads((out / "status.json").read_text())["status"] == "failed"


def test_one_run_per_directory_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from postrain.jobs.rundir import RunLock; "
         f"RunLock.acquire(Path({str(out)!r})); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = sft(tmp_path, out)
        assert refused.exit_code == 2 and "Traceback" not in refused.output
        said = " ".join(refused.output.split())
        assert f"run directory {out} is in use by another run (pid {holder.pid}" in said
        assert not out.exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock file stays, and the next run takes it over
    assert json.loads(lock_path(out).read_text())["pid"] == holder.pid
    ran = sft(tmp_path, out)
    assert ran.exit_code == 0, ran.output
    assert f"took over the lock of {out} left by a run that is no longer running (pid {holder.pid}" in \
        " ".join(ran.output.split())
    assert not lock_path(out).exists()  # released when the run ended


def test_a_launched_worker_does_not_lock_against_its_launcher(tmp_path, monkeypatch):
    from postrain.jobs.rundir import LOCK_HELD_ENV

    held = RunLock.acquire(tmp_path / "run")
    try:
        monkeypatch.setenv(LOCK_HELD_ENV, str(held.path.resolve()))
        assert RunLock.acquire(tmp_path / "run") is None  # the worker's launcher holds it for the launch
        monkeypatch.delenv(LOCK_HELD_ENV)
        with pytest.raises(Exception, match="in use by another run"):
            RunLock.acquire(tmp_path / "run")
    finally:
        held.release()


def test_an_interrupted_overwrite_is_continued_by_resume_and_then_replaces_the_previous_run(tmp_path, monkeypatch):
    import signal

    from trl import SFTTrainer

    out, full = tmp_path / "run", tmp_path / "full"
    assert sft(tmp_path, out).exit_code == 0
    before = snapshot(out)
    changed = ["trainer.learning_rate=0.002"]
    assert sft(tmp_path, full, *changed).exit_code == 0

    at_step(monkeypatch, SFTTrainer, 2, lambda loss: os.kill(os.getpid(), signal.SIGTERM) or loss)
    stopped = sft(tmp_path, out, *changed, "--overwrite")
    assert stopped.exit_code == 143, stopped.output
    assert snapshot(out) == before  # the previous run is untouched
    attempt = tmp_path / "run.new"
    status = json.loads((attempt / "status.json").read_text())
    assert (status["status"], status["step"], status["checkpoint"]) == ("interrupted", 2, "checkpoint-2")

    monkeypatch.undo()
    resumed = sft(tmp_path, out, *changed, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"--resume continues the --overwrite run in {attempt}" in " ".join(resumed.output.split())
    assert not attempt.exists() and losses(out) == losses(full)
    assert json.loads((out / "status.json").read_text())["status"] == "done"


def test_status_json_is_replaced_whole(tmp_path):
    from postrain.jobs.common import write_json

    write_json(tmp_path / "status.json", {"status": "running"})
    write_json(tmp_path / "status.json", {"status": "done", "wall_time_s": 1.0})
    assert json.loads((tmp_path / "status.json").read_text()) == {"status": "done", "wall_time_s": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary file left beside it


def test_tests_run_in_a_directory_without_runs():
    """Issue #18: `make demo` then `make test` failed because the tests ran where the demo left runs/."""
    assert Path.cwd().resolve() != REPO and not Path("runs").exists()
    assert Path("recipes/demo/grpo.yaml").is_file()  # relative recipe paths resolve as at the repository root


def test_a_lock_that_cannot_be_written_is_one_error(tmp_path, monkeypatch):
    """A read-only or full filesystem under output_dir: a RunDirError (exit 2, one line), not a traceback."""
    from postrain.errors import RunDirError

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(RunDirError, match=r"cannot write beside the run directory .*run \(its lock file .*\.run\.lock\): "
                                          r"Read-only file system; choose another output_dir"):
        RunLock.acquire(tmp_path / "run")


def test_publishing_a_run_flushes_what_was_not_published_already(tmp_path, monkeypatch):
    """replace_with_attempt flushes the run's own files (metrics, status) but not the final model and checkpoints,
    each fsynced when it was published; the directories holding them are flushed, so the renames are durable."""
    from postrain.jobs import rundir

    attempt, final = tmp_path / "run.new", tmp_path / "run"
    for rel in ("metrics.jsonl", "model/model.safetensors", "checkpoints/checkpoint-2/trainer_state.json",
                "samples/step-2.jsonl"):
        (attempt / rel).parent.mkdir(parents=True, exist_ok=True)
        (attempt / rel).write_text("{}\n")
    flushed = []
    monkeypatch.setattr(rundir, "fsync_path", lambda path: flushed.append(Path(path)))
    rundir.replace_with_attempt(attempt, final)
    files = {str(p.relative_to(attempt)) for p in flushed if p.is_relative_to(attempt) and p != attempt and p.suffix}
    assert files == {"metrics.jsonl", "samples/step-2.jsonl"}
    assert {attempt, attempt / "checkpoints", attempt / "samples", tmp_path} <= set(flushed)
    assert attempt / "model" not in flushed and (final / "model" / "model.safetensors").is_file()
