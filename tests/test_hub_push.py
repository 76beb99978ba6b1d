"""`hub:` (postrain.jobs.hub): the finished model folder, card included, uploaded to the Hugging Face hub after a
successful run, by the main process; a failed push keeps the run `done` and says how to push again.

huggingface_hub.HfApi is replaced by tests/fake_hub.FakeHfApi (no network, no token), which records the calls and
the files of the uploaded folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
from typer.testing import CliRunner

from postrain.cli import app
from tests.conftest import REPO, TINY, postrain, write_recipe
from tests.fake_hub import FakeHfApi, calls_named

runner = CliRunner()


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHfApi.reset()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    yield FakeHfApi
    FakeHfApi.reset()


def sft_recipe(tmp_path: Path, extra: str = "") -> Path:
    return write_recipe(tmp_path / "sft.yaml", f"""
defaults: [base/sft]
name: pushed
model: {{name_or_path: tiny, dtype: float32, tiny: {json.dumps(TINY)}}}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
trainer: {{max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1, report_to: none, max_length: 32}}
{extra}
""")


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def test_a_training_run_uploads_its_model_folder_with_the_card_after_it_is_done(tmp_path, fake_hub):
    out = tmp_path / "run"
    postrain("sft", str(sft_recipe(tmp_path, "hub: {repo_id: me/pushed-sft, revision: v1}")), f"output_dir={out}")
    (create,) = calls_named("create_repo")
    assert create == {"repo_id": "me/pushed-sft", "private": True, "repo_type": "model", "exist_ok": True}
    assert calls_named("create_branch") == [{"repo_id": "me/pushed-sft", "branch": "v1", "repo_type": "model",
                                             "exist_ok": True}]
    (upload,) = calls_named("upload_folder")
    env = json.loads((out / "env.json").read_text())
    assert Path(upload["folder_path"]) == out / "model" and upload["repo_id"] == "me/pushed-sft"
    assert upload["revision"] == "v1" and env["recipe_hash"] in upload["commit_message"]
    assert set(upload["files"]) == {p.name for p in (out / "model").iterdir()}
    assert {"README.md", "model.safetensors", "tokenizer.json", "config.json"} <= set(upload["files"])
    assert upload["files"]["README.md"] == (out / "model" / "README.md").read_bytes()  # the card went up
    final = status(out)
    assert final["status"] == "done" and final["pushed"]["repo_id"] == "me/pushed-sft"
    assert final["pushed"]["commit"] == "0123abc" and "push_error" not in final


def test_only_the_main_process_pushes(tmp_path, fake_hub):
    from postrain.jobs.hub import push_after_run
    from postrain.jobs import load_recipe

    recipe = load_recipe(sft_recipe(tmp_path), {"hub": {"repo_id": "me/x"}})
    push_after_run(recipe, tmp_path / "not-a-run", main_process=False)
    assert FakeHfApi.calls == []


def merge_smoke(tmp_path: Path, *overrides: str):
    return runner.invoke(app, ["merge", str(REPO / "recipes" / "base" / "merge.yaml"), "--smoke",
                               f"output_dir={tmp_path / 'merged'}", *overrides])


def test_a_failed_push_keeps_the_run_done_exits_2_and_postrain_push_retries_it(tmp_path, fake_hub):
    FakeHfApi.fail_upload = OSError("connection reset")
    result = merge_smoke(tmp_path, "hub.repo_id=me/merged")
    out = tmp_path / "merged"
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"its model is saved in {out / 'model'}" in result.output.replace("\n", "")
    assert "connection reset" in result.output and f"postrain push {out}" in result.output.replace("\n", "")
    failed = status(out)
    assert failed["status"] == "done" and "connection reset" in failed["push_error"] and "pushed" not in failed
    assert (out / "model" / "README.md").is_file() and (out / "model" / "model.safetensors").is_file()

    FakeHfApi.fail_upload = None
    FakeHfApi.calls = []
    postrain("push", str(out), "--revision", "retry")
    (upload,) = calls_named("upload_folder")
    assert Path(upload["folder_path"]) == out / "model" and upload["repo_id"] == "me/merged"
    assert upload["revision"] == "retry" and "README.md" in upload["files"]
    pushed = status(out)
    assert "push_error" not in pushed and pushed["pushed"]["revision"] == "retry" and pushed["status"] == "done"


def test_postrain_push_names_the_repository_from_the_command_line_and_refuses_what_it_cannot_push(tmp_path, fake_hub):
    result = merge_smoke(tmp_path)  # no hub.repo_id: nothing pushed
    out = tmp_path / "merged"
    assert result.exit_code == 0 and FakeHfApi.calls == [], result.output
    refused = runner.invoke(app, ["push", str(out)])
    assert refused.exit_code == 2 and "--repo-id" in refused.output and FakeHfApi.calls == []
    bad = runner.invoke(app, ["push", str(out), "--repo-id", "a--b"])
    assert bad.exit_code == 2 and "not a hub repository id" in bad.output and FakeHfApi.calls == []
    postrain("push", str(out), "--repo-id", "short-name")
    assert calls_named("upload_folder")[0]["repo_id"] == f"{FakeHfApi.namespace}/short-name"  # the user's namespace
    assert status(out)["pushed"]["repo_id"] == f"{FakeHfApi.namespace}/short-name"

    (out / "status.json").write_text(json.dumps({**status(out), "status": "running"}))
    unfinished = runner.invoke(app, ["push", str(out), "--repo-id", "me/x"])
    assert unfinished.exit_code == 2 and "has not finished" in unfinished.output


def test_private_weights_are_not_pushed_into_an_existing_public_repository(tmp_path, fake_hub):
    FakeHfApi.existing_public = {"me/public"}
    result = merge_smoke(tmp_path, "hub.repo_id=me/public")
    assert result.exit_code == 2 and "exists and is public" in result.output and "hub.private" in result.output
    assert calls_named("upload_folder") == [] and "is public" in status(tmp_path / "merged")["push_error"]
    FakeHfApi.calls = []
    postrain("merge", str(REPO / "recipes" / "base" / "merge.yaml"), "--smoke", f"output_dir={tmp_path / 'again'}",
             "hub.repo_id=me/public", "hub.private=false")
    assert calls_named("create_repo")[0]["private"] is False and len(calls_named("upload_folder")) == 1


def test_dry_run_shows_the_push_target(tmp_path):
    recipe = str(sft_recipe(tmp_path))
    shown = postrain("sft", recipe, "--dry-run", "hub.repo_id=me/planned", "hub.revision=v2",
                     f"output_dir={tmp_path / 'run'}").replace("\n", " ").replace("│", " ")
    assert "me/planned" in " ".join(shown.split()) and "private, branch v2" in " ".join(shown.split())
    assert not (tmp_path / "run").exists()
    off = postrain("sft", recipe, "--dry-run").replace("│", " ")
    assert "hub.repo_id is null" in " ".join(off.split())
    pipe = write_recipe(tmp_path / "pipe.yaml", f"""
command: pipeline
name: p
output_dir: {tmp_path / 'pipe'}
stages:
  sft: {{command: sft, recipe: sft.yaml, overrides: {{hub.repo_id: me/stage}}}}
""")
    assert "pushed to me/stage" in " ".join(postrain("run", str(pipe), "--dry-run").replace("│", " ").split())


def test_trl_push_to_hub_and_a_bad_repo_id_are_refused_at_load_time(tmp_path):
    recipe = str(sft_recipe(tmp_path))
    trl_push = runner.invoke(app, ["sft", recipe, "trainer.push_to_hub=true", f"output_dir={tmp_path / 'run'}"])
    assert trl_push.exit_code == 2 and "trainer.push_to_hub" in trl_push.output and "hub.repo_id" in trl_push.output
    bad = runner.invoke(app, ["sft", recipe, "hub.repo_id=datasets/x/y", f"output_dir={tmp_path / 'run'}"])
    assert bad.exit_code == 2 and "hub.repo_id 'datasets/x/y'" in bad.output, bad.output
    unknown = runner.invoke(app, ["sft", recipe, "hub.repo=me/x", "--dry-run"])
    assert unknown.exit_code == 2 and "did you mean 'repo_id'" in unknown.output, unknown.output
    evaluation = runner.invoke(app, ["eval", str(REPO / "recipes" / "base" / "eval.yaml"), "hub.repo_id=me/x", "--dry-run"])
    assert evaluation.exit_code == 2 and "unknown key 'hub'" in evaluation.output  # an eval writes no model
    assert not (tmp_path / "run").exists()


def test_smoke_runs_never_push_unless_told_and_the_push_target_is_not_in_the_recipe_hash(tmp_path):
    from postrain.jobs import load_recipe, load_smoke_recipe

    recipe = sft_recipe(tmp_path, "hub: {repo_id: me/real}")
    assert load_smoke_recipe(recipe).cfg["hub"]["repo_id"] is None
    assert load_smoke_recipe(recipe, ["hub.repo_id=me/smoke"]).cfg["hub"]["repo_id"] == "me/smoke"
    pushed, elsewhere = load_recipe(recipe), load_recipe(recipe, ["hub.repo_id=me/other", "hub.private=false"])
    assert pushed.hash == elsewhere.hash == load_recipe(recipe, ["hub.repo_id=null"]).hash
    assert pushed.hash != load_recipe(recipe, ["seed=1"]).hash
