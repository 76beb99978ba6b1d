"""Trackers (`trainer.report_to`): the run config postrain logs to each (postrain.jobs.trackers), through
transformers' own integration callbacks, and the load-time refusal of a tracker that is not installed.

TensorBoard is the real library (the `dev` extra installs it) and its event file is read back. wandb, mlflow and
trackio are FAKE modules put in sys.modules for these tests only (no network, no tracker server): each records
what transformers' integration callback and postrain called on it. The fakes are given exactly the attributes the
installed transformers' callbacks use, so the integrations themselves run unchanged.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from postrain.cli import app
from tests.conftest import TINY, postrain, source_digest, write_recipe

runner = CliRunner()
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
FAKE_MLFLOW_PARAM_LIMIT = 40  # smaller than some recipe values (paths), so that truncation shows


def sft_recipe(tmp_path: Path, report_to: list[str]) -> Path:
    return write_recipe(tmp_path / "sft.yaml", f"""
defaults: [base/sft]
name: tracked
model: {{name_or_path: tiny, dtype: float32, tiny: {json.dumps(TINY)}}}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
trainer: {{max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1, max_length: 32,
          report_to: {json.dumps(report_to)}}}
""")


# --- the fake tracker modules -------------------------------------------------------------------------------------

class FakeConfig(dict):
    """wandb.config / trackio.config: a mapping with update(..., allow_val_change=...)."""

    def update(self, values, allow_val_change=False):  # noqa: D401 - the trackers' own signature
        super().update(values)


def fake_module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec reads it
    module.__dict__.update(attributes)
    return module


def fake_wandb() -> types.ModuleType:
    wandb = fake_module("wandb", run=None, config=FakeConfig(), logged=[], __version__="0.fake")

    def init(**kwargs):
        wandb.run = SimpleNamespace(_label=lambda **kw: None, summary={}, id="fake", name="fake", url="")
        wandb.init_kwargs = kwargs

    wandb.init = init
    wandb.log = lambda values, **kw: wandb.logged.append(values)
    wandb.define_metric = lambda *a, **kw: None
    wandb.termwarn = lambda *a, **kw: None
    wandb.finish = lambda: None
    return wandb


def fake_mlflow() -> types.ModuleType:
    mlflow = fake_module("mlflow", __version__="2.20.0", params={}, dicts={}, tags={}, metrics=[], run=None)
    mlflow.utils = SimpleNamespace(validation=SimpleNamespace(MAX_PARAM_VAL_LENGTH=FAKE_MLFLOW_PARAM_LIMIT,
                                                              MAX_PARAMS_TAGS_PER_BATCH=100))
    mlflow.is_tracking_uri_set = lambda: True
    mlflow.get_tracking_uri = lambda: "fake://"
    mlflow.active_run = lambda: mlflow.run
    mlflow.set_experiment = lambda name: None

    def start_run(**kwargs):
        mlflow.run = SimpleNamespace(info=SimpleNamespace(run_id="fake"))

    def end_run():
        mlflow.run = None

    def log_params(params, synchronous=True):
        clash = {k for k in params if k in mlflow.params and mlflow.params[k] != params[k]}
        assert not clash, f"mlflow params cannot change: {clash}"  # as the real mlflow refuses
        mlflow.params.update(params)

    mlflow.start_run, mlflow.end_run, mlflow.log_params = start_run, end_run, log_params
    mlflow.log_metrics = lambda metrics, step=None, synchronous=True: mlflow.metrics.append((step, metrics))
    mlflow.log_dict = lambda data, path: mlflow.dicts.__setitem__(path, data)
    mlflow.set_tags = lambda tags: mlflow.tags.update(tags)
    return mlflow


def fake_trackio() -> types.ModuleType:
    trackio = fake_module("trackio", __version__="0.fake", config=FakeConfig(), logged=[], init_kwargs=None)
    # current_run: TRL's model card, written with each checkpoint, asks trackio for the run's Space URL
    trackio.context_vars = SimpleNamespace(current_space_id=SimpleNamespace(get=lambda: None),
                                           current_project=SimpleNamespace(get=lambda: None),
                                           current_run=SimpleNamespace(get=lambda: None))
    trackio.init = lambda **kwargs: setattr(trackio, "init_kwargs", kwargs)
    trackio.log = lambda values: trackio.logged.append(values)
    trackio.finish = lambda: None
    return trackio


def install_fakes(monkeypatch) -> dict[str, types.ModuleType]:
    fakes = {"wandb": fake_wandb(), "mlflow": fake_mlflow(), "trackio": fake_trackio()}
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    config_util = fake_module("wandb.sdk.lib.config_util", ConfigError=type("ConfigError", (Exception,), {}))
    for name, module in (("wandb.sdk", fake_module("wandb.sdk")), ("wandb.sdk.lib", fake_module("wandb.sdk.lib")),
                         ("wandb.sdk.lib.config_util", config_util)):
        monkeypatch.setitem(sys.modules, name, module)
    # Library modules imported before the fakes existed (by earlier tests in this process) import a tracker at their
    # top only when it was installed then, and reach for the name later (TRL's model card: `wandb.run`): give them
    # the fakes too, so the outcome does not depend on which tests ran first.
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith(("trl.", "transformers.")):
            for name, fake in fakes.items():
                if hasattr(module, f"is_{name}_available") and not hasattr(module, name):
                    monkeypatch.setattr(module, name, fake, raising=False)
    return fakes


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One 2-step SFT run on the tiny model logging to every tracker: TensorBoard (when installed) and the fakes."""
    tmp_path = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as monkeypatch:
        fakes = install_fakes(monkeypatch)
        report_to = ["wandb", "mlflow", "trackio"] + (["tensorboard"] if HAS_TENSORBOARD else [])
        out = tmp_path / "run"
        postrain("sft", str(sft_recipe(tmp_path, report_to)), f"output_dir={out}")
        from postrain.jobs import load_recipe

        recipe = load_recipe(out / "recipe.yaml")  # its trackers must be installed to load it
    return SimpleNamespace(out=out, fakes=fakes, recipe=recipe)


def expected_config(run) -> dict:
    env = json.loads((run.out / "env.json").read_text())
    return {"command": "sft", "recipe_hash": env["recipe_hash"], "command_line": env["command_line"],
            "postrain_version": env["packages"]["postrain"], "lineage": {"inputs": ["tiny"]},
            "recipe": run.recipe.cfg}


def test_wandb_and_trackio_get_the_recipe_and_lineage_as_run_config(tracked_run):
    expected = expected_config(tracked_run)
    assert tracked_run.recipe.hash == expected["recipe_hash"]  # the saved recipe reloads to the run's hash
    for name in ("wandb", "trackio"):
        fake = tracked_run.fakes[name]
        assert fake.config["postrain"] == expected, name
        assert "learning_rate" in fake.config  # the integration's own config (TrainingArguments) is still there
        assert any("train/loss" in values for values in fake.logged), name  # and it logged the training metrics


def test_mlflow_gets_flattened_params_cut_to_its_limit_and_the_recipe_as_artifacts(tracked_run):
    from postrain.jobs.trackers import flatten

    mlflow = tracked_run.fakes["mlflow"]
    expected = expected_config(tracked_run)
    full = {f"postrain.{k}": str(v) for k, v in flatten({k: v for k, v in expected.items()
                                                         if k != "command_line"}).items()}
    ours = {k: v for k, v in mlflow.params.items() if k.startswith("postrain.")}
    assert set(ours) == set(full)
    assert all(ours[k] == full[k][:FAKE_MLFLOW_PARAM_LIMIT] for k in full)
    assert any(len(v) > FAKE_MLFLOW_PARAM_LIMIT for v in full.values())  # some value was cut
    assert ours["postrain.recipe.trainer.max_steps"] == "2" and ours["postrain.recipe_hash"] == expected["recipe_hash"]
    assert mlflow.dicts["postrain/recipe.yaml"] == expected["recipe"]
    assert mlflow.dicts["postrain/lineage.json"] == expected["lineage"]
    assert mlflow.tags["postrain.command_line"] == expected["command_line"][:FAKE_MLFLOW_PARAM_LIMIT]
    assert "learning_rate" in mlflow.params and any("loss" in m for _, m in mlflow.metrics)


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (the dev extra installs it)")
def test_tensorboard_event_file_holds_the_recipe_text_hparams_and_the_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tracked_run.out / "tensorboard"
    assert list(logdir.glob("events.out.tfevents.*")), "events are written to <output_dir>/tensorboard"
    events = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("postrain/recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    expected = expected_config(tracked_run)
    fenced = text.split("```yaml\n", 1)[1].rsplit("```", 1)[0]
    assert yaml.safe_load(fenced) == expected["recipe"] and expected["recipe_hash"] in text
    lineage = events.Tensors("postrain/lineage/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(lineage.split("```json\n", 1)[1].rsplit("```", 1)[0]) == expected["lineage"]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]  # the integration's own writer, same file
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = events.summary_metadata  # the hparams plugin's session start, with the recipe's scalars
    starts = [plugin_data_pb2.HParamsPluginData.FromString(m.plugin_data.content).session_start_info
              for m in hparams.values() if m.plugin_data.plugin_name == "hparams"]
    logged = {k: v for s in starts for k, v in s.hparams.items()}
    assert logged["recipe.trainer.max_steps"].number_value == 2
    assert logged["recipe.model.name_or_path"].string_value == "tiny"


def test_only_the_main_process_logs_the_run_config(monkeypatch):
    from transformers.integrations import WandbCallback

    from postrain.jobs.trackers import run_config_callback

    wandb = install_fakes(monkeypatch)["wandb"]
    wandb.init()  # a run exists, as on the main process after the integration's setup
    integration = WandbCallback()
    handler = SimpleNamespace(callbacks=[integration])
    callback = run_config_callback({"command": "sft"}, handler)
    callback.on_train_begin(None, SimpleNamespace(is_world_process_zero=False), None)
    assert "postrain" not in wandb.config and callback.logged == []
    callback.on_train_begin(None, SimpleNamespace(is_world_process_zero=True), None)
    assert wandb.config["postrain"] == {"command": "sft"} and callback.logged == ["WandbCallback"]


def test_a_tracker_that_is_not_installed_fails_at_load_naming_the_key_and_the_pip_command(tmp_path, monkeypatch):
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: False)  # whatever this machine has
    recipe = sft_recipe(tmp_path, ["wandb"])
    for extra in ([], ["--dry-run"]):
        result = runner.invoke(app, ["sft", str(recipe), f"output_dir={tmp_path / 'run'}", *extra])
        assert result.exit_code == 2, result.output
        assert "trainer.report_to" in result.output and "pip install wandb" in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "run").exists()
    misspelt = runner.invoke(app, ["sft", str(recipe), "trainer.report_to=[tensorbord]", "--dry-run"])
    assert misspelt.exit_code == 2 and "did you mean 'tensorboard'" in misspelt.output, misspelt.output


def test_a_pipeline_with_a_missing_tracker_in_its_last_stage_runs_no_stage(tmp_path, monkeypatch):
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "is_mlflow_available", lambda: False)
    sft_recipe(tmp_path, ["none"])
    pipe = write_recipe(tmp_path / "pipe.yaml", f"""
command: pipeline
name: p
output_dir: {tmp_path / 'pipe'}
stages:
  first: {{command: sft, recipe: sft.yaml}}
  second: {{command: sft, recipe: sft.yaml, overrides: {{model.name_or_path: "${{stages.first.output}}",
                                                        trainer.report_to: [mlflow]}}}}
""")
    result = runner.invoke(app, ["run", str(pipe)])
    assert result.exit_code == 2 and "pip install mlflow" in result.output, result.output
    assert not (tmp_path / "pipe" / "first").exists()


def test_the_lineage_of_a_pipeline_stage_names_the_stage_and_its_upstream_stages(tmp_path):
    """What the trackers log at train start, before the pipeline records the stage in lineage.json."""
    from postrain.jobs.pipeline import stage_recipe
    from postrain.jobs.trackers import run_config
    from postrain.jobs import load_recipe

    sft_recipe(tmp_path, ["none"])
    pipe = load_recipe(write_recipe(tmp_path / "pipe.yaml", f"""
command: pipeline
name: p
output_dir: {tmp_path / 'pipe'}
stages:
  first: {{command: sft, recipe: sft.yaml}}
  second: {{command: sft, recipe: sft.yaml, overrides: {{model.name_or_path: "${{stages.first.output}}"}}}}
"""))
    pipe.save(_mkdir(tmp_path / "pipe"))  # as pipeline.run does before its first stage
    second = stage_recipe(pipe, "second", pipe.cfg["stages"]["second"], smoke=False)
    config = run_config(second, Path(second.cfg["output_dir"]), "postrain run pipe.yaml [stage second]")
    assert config["lineage"] == {"inputs": [str(tmp_path / "pipe" / "first")], "pipeline": {
        "dir": str((tmp_path / "pipe").resolve()), "name": "p", "stage": "second", "command": "sft",
        "upstream": ["first"]}}
    first = stage_recipe(pipe, "first", pipe.cfg["stages"]["first"], smoke=False)
    assert run_config(first, Path(first.cfg["output_dir"]), "")["lineage"]["pipeline"]["upstream"] == []
    alone = load_recipe(tmp_path / "sft.yaml", {"output_dir": str(tmp_path / "alone")})
    assert run_config(alone, tmp_path / "alone", "")["lineage"] == {"inputs": ["tiny"]}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# transformers' integration code postrain's tracker logging relies on (the attributes it reads: _wandb, _ml_flow
# and its limits, _trackio and _initialized, tb_writer and logging_dir; and that each starts its run in
# on_train_begin). A transformers upgrade that changes one fails here: re-check postrain/jobs/trackers.py.
INTEGRATION_DIGESTS = {
    "transformers.integrations.integration_utils:WandbCallback.setup":
        "868dc3723712fb3e6be1b34560773da57a7fbb736d59d7a5511d90666cf5073a",
    "transformers.integrations.integration_utils:MLflowCallback.__init__":
        "dec9a422954450c93f32db222a756e64bb834ac708d2712ec67fd196fa9189dd",
    "transformers.integrations.integration_utils:MLflowCallback.setup":
        "0a3f8ac72eb4b559e402ffe97c4150d2286cc97fa51c5a40a0b5af134e8b9826",
    "transformers.integrations.integration_utils:TrackioCallback.setup":
        "26c52bccf034e10eaa2ece6df8d69bf53760ce92f67aca784dbadb07ac9c2237",
    "transformers.integrations.integration_utils:TensorBoardCallback.on_train_begin":
        "3b065c0943024bfc439e7a6bed6d8e109685b31885bc9466b7ba0cc139daa39e",
}


@pytest.mark.parametrize("reference", sorted(INTEGRATION_DIGESTS))
def test_the_transformers_integration_code_postrain_reads_is_unchanged(reference):
    assert source_digest(reference) == INTEGRATION_DIGESTS[reference], reference
