"""Each job end to end on the tiny model: what it writes, how it refuses, how it fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from postrain.cli import app
from tests.conftest import TINY, postrain, write_recipe

runner = CliRunner()
TINY_MODEL = "model: {name_or_path: tiny, dtype: float32, tiny: %s}\n" % json.dumps(TINY)
SMALL_TRAINER = "max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1, report_to: none"


def sft_recipe(tmp_path: Path, extra: str = "") -> Path:
    return write_recipe(tmp_path / "sft.yaml", f"""
defaults: [base/sft]
{TINY_MODEL}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
trainer: {{{SMALL_TRAINER}, max_length: 32}}
{extra}
""")


def test_sft_writes_run_directory_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "run"
    postrain("sft", str(sft_recipe(tmp_path)), f"output_dir={out}")
    header = (out / "recipe.yaml").read_text().splitlines()[0]
    env = json.loads((out / "env.json").read_text())
    assert header.endswith(env["recipe_hash"])
    assert env["seed"] == 42 and env["packages"]["trl"] and "command_line" in env
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "tokenizer.json").exists()
    assert json.loads((out / "status.json").read_text())["status"] == "done"

    again = runner.invoke(app, ["sft", str(sft_recipe(tmp_path)), f"output_dir={out}"])
    assert again.exit_code != 0 and "--overwrite" in again.output and "Traceback" not in again.output
    assert (out / "model" / "model.safetensors").exists()  # nothing lost
    postrain("sft", str(sft_recipe(tmp_path)), f"output_dir={out}", "--overwrite")


def test_sft_chat_with_lora_saves_a_plain_model_with_the_adapters_merged(tmp_path):
    from transformers import AutoModelForCausalLM

    from postrain.models.loading import resolve_model_path

    recipe = sft_recipe(tmp_path, "peft: {r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}")
    out = tmp_path / "run"
    postrain("sft", str(recipe), f"output_dir={out}", "data.train.chat=true", "trainer.learning_rate=1e-2")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in name for name, _ in model.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny", TINY)).state_dict()
    trained = model.state_dict()
    changed = {k for k in trained if not torch.equal(trained[k], base[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) and k.endswith("weight") for k in changed), changed


@pytest.mark.parametrize("mode", ["implicit", "explicit", "precomputed"])
def test_dpo_reference_model_modes(tmp_path, mode):
    """The first logged step is computed before any update: against the implicit (or precomputed) reference, a
    copy of the starting policy, the implicit rewards are exactly 0; against another model they are not."""
    extra = {
        "implicit": "",
        "explicit": "ref_model: {name_or_path: tiny, dtype: float32, tiny: %s}" % json.dumps({**TINY, "seed": 5}),
        "precomputed": "",
    }[mode]
    recipe = write_recipe(tmp_path / "dpo.yaml", f"""
defaults: [base/dpo]
{TINY_MODEL}
{extra}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 8, digits: 1}}}}}}
trainer: {{{SMALL_TRAINER}, max_length: 32, loss_type: [sigmoid, sft], loss_weights: [1.0, 0.5]}}
""")
    args = ["dpo", str(recipe), f"output_dir={tmp_path / 'run'}"]
    if mode == "precomputed":
        args.append("trainer.precompute_ref_log_probs=true")
    postrain(*args)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in logged if "rewards/chosen" in m)
    if mode == "explicit":
        assert abs(first["rewards/chosen"]) > 1e-3 and abs(first["rewards/rejected"]) > 1e-3
    else:
        assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6)
        assert first["rewards/rejected"] == pytest.approx(0, abs=1e-6)


def grpo_recipe(tmp_path: Path, rewards: str, policy: str = "fail") -> Path:
    return write_recipe(tmp_path / "grpo.yaml", f"""
defaults: [base/grpo]
{TINY_MODEL}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
rewards: {rewards}
reward_errors: {{policy: {policy}, score: 0.0}}
trainer: {{{SMALL_TRAINER}, num_generations: 4, max_completion_length: 4, use_vllm: false, activation_checkpointing: false}}
""")


def test_grpo_logs_each_reward_separately(tmp_path):
    recipe = grpo_recipe(tmp_path, '[{name: exact_match}, {name: length, weight: 0.1, args: {max_length: 2}}]')
    postrain("grpo", str(recipe), f"output_dir={tmp_path / 'run'}")
    keys = set().union(*(json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()))
    assert {"rewards/exact_match/mean", "rewards/length/mean", "rewards/exact_match/errors"} <= keys


FLAKY_REWARD = '''
def flaky(completions, bad, **kwargs):
    """Raises on every row the data marks bad: decided by the data, whatever the model writes."""
    out = []
    for is_bad in bad:
        if is_bad:
            raise ValueError("cannot score this row")
        out.append(1.0)
    return out
'''


def flaky_setup(tmp_path: Path, policy: str) -> list[str]:
    """Four prompts, two marked bad; a generation batch of 16 = 4 prompts x 4 completions holds all four rows."""
    (tmp_path / "my_rewards.py").write_text(FLAKY_REWARD)
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1), "bad": i % 2 == 1} for i in range(4)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = grpo_recipe(tmp_path, '[{fn: "my_rewards.py:flaky"}]', policy=policy)
    return ["grpo", str(recipe), f"output_dir={tmp_path / 'run'}", f"data.train.source={tmp_path / 'rows.jsonl'}",
            "trainer.per_device_train_batch_size=16"]


def test_grpo_reward_that_raises_fails_the_run_by_default(tmp_path):
    result = runner.invoke(app, flaky_setup(tmp_path, "fail"))
    assert result.exit_code == 2  # a user error: one message, no traceback
    assert "reward 'flaky' raised ValueError: cannot score this row" in result.output and "my_rewards.py" in result.output
    assert "Traceback" not in result.output
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"


def test_grpo_reward_errors_scored_and_counted_under_score_policy(tmp_path):
    postrain(*flaky_setup(tmp_path, "score"))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "rewards/flaky/mean" in m]
    assert len(steps) == 2
    for m in steps:  # 2 bad rows x 4 completions fail each step; they score 0, the good half scores 1
        assert m["rewards/flaky/errors"] == 8
        assert m["rewards/flaky/mean"] == pytest.approx(0.5)


def eval_recipe(tmp_path: Path, model: str) -> Path:
    return write_recipe(tmp_path / "eval.yaml", f"""
defaults: [base/eval]
model: {{name_or_path: "{model}"}}
sets: {{heldout: {{source: "builtin:arithmetic", split: test, task: {{n: 6, digits: 1}}}}}}
generation: {{max_new_tokens: 4, batch_size: 4}}
rewards: [{{name: exact_match, args: {{extract: full}}}}, {{name: length, weight: 0.5, args: {{max_length: 1}}}}]
""")


def test_eval_writes_samples_and_consistent_summary(tmp_path):
    postrain("sft", str(sft_recipe(tmp_path)), f"output_dir={tmp_path / 'sft'}")
    postrain("eval", str(eval_recipe(tmp_path, str(tmp_path / "sft"))), f"output_dir={tmp_path / 'ev'}",
             "generation.num_samples=2", "generation.do_sample=true")
    results = json.loads((tmp_path / "ev" / "results.json").read_text())["sets"]["heldout"]
    samples = [json.loads(line) for line in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert results["prompts"] == 6 and results["samples"] == len(samples) == 12
    assert results["accuracy"] == pytest.approx(sum(s["rewards"]["exact_match"] for s in samples) / 12)
    assert results["unparsable"] == pytest.approx(sum(s["parsed"] is None for s in samples) / 12)
    for s in samples:
        expected = s["rewards"]["exact_match"] + 0.5 * s["rewards"]["length"]
        assert s["score"] == pytest.approx(expected)
        assert s["rewards"]["exact_match"] == float(s["completion"].strip() == s["answer"])


def test_merge_of_two_checkpoints_is_evaluable(tmp_path):
    postrain("sft", str(sft_recipe(tmp_path)), f"output_dir={tmp_path / 'a'}")
    postrain("sft", str(sft_recipe(tmp_path)), f"output_dir={tmp_path / 'b'}", "seed=7", "trainer.learning_rate=1e-3")
    merge = write_recipe(tmp_path / "merge.yaml", f"""
defaults: [base/merge]
merge:
  merge_method: linear
  models: [{{model: "{tmp_path / 'a'}", parameters: {{weight: 0.5}}}}, {{model: "{tmp_path / 'b'}", parameters: {{weight: 0.5}}}}]
""")
    postrain("merge", str(merge), f"output_dir={tmp_path / 'm'}")
    from safetensors.torch import load_file

    a, b, m = (load_file(tmp_path / d / "model" / "model.safetensors") for d in "abm")
    for key in m:
        assert (m[key] - (a[key] + b[key]) / 2).abs().max() < 1e-6, key
    postrain("eval", str(eval_recipe(tmp_path, str(tmp_path / "m"))), f"output_dir={tmp_path / 'ev'}")
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["sets"]["heldout"]["samples"] == 6


def test_pipeline_passes_models_records_lineage_and_resumes(tmp_path):
    sft_recipe(tmp_path)
    eval_recipe(tmp_path, "placeholder")
    pipe = write_recipe(tmp_path / "pipe.yaml", f"""
command: pipeline
name: p
output_dir: {tmp_path / 'pipe'}
stages:
  sft: {{command: sft, recipe: sft.yaml}}
  ev: {{command: eval, recipe: eval.yaml, overrides: {{model.name_or_path: "${{stages.sft.output}}"}}}}
""")
    first = postrain("run", str(pipe))
    lineage = json.loads((tmp_path / "pipe" / "lineage.json").read_text())
    assert [s["stage"] for s in lineage] == ["sft", "ev"] and lineage[1]["inputs"] == [str(tmp_path / "pipe" / "sft")]
    assert "accuracy" in first and (tmp_path / "pipe" / "summary.md").exists()
    again = postrain("run", str(pipe))
    assert again.count("skipped") == 2
    # A changed stage recipe is not silently overwritten.
    changed = runner.invoke(app, ["run", str(pipe), "stages.sft.overrides={trainer.learning_rate: 0.01}"])
    assert changed.exit_code != 0 and "--overwrite" in changed.output
    rerun = postrain("run", str(pipe), "stages.sft.overrides={trainer.learning_rate: 0.01}", "--overwrite")
    assert rerun.count("skipped") == 0  # sft changed; eval's input model changed under it, so it reruns too


def test_sft_on_chat_messages_file(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"{i}+1="}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(8)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    postrain("sft", str(sft_recipe(tmp_path)), f"output_dir={tmp_path / 'run'}", f"data.train.source={data}",
             "trainer.assistant_only_loss=true")
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_resume_without_checkpoints_is_refused_and_resume_keeps_metrics_unique(tmp_path):
    recipe = str(sft_recipe(tmp_path))
    out = tmp_path / "run"
    postrain("sft", recipe, f"output_dir={out}", 'trainer.save_strategy="no"')
    refused = runner.invoke(app, ["sft", recipe, f"output_dir={out}", 'trainer.save_strategy="no"', "--resume"])
    assert refused.exit_code == 2 and "save_strategy: no" in refused.output and "Traceback" not in refused.output
    assert (out / "model" / "model.safetensors").exists()  # nothing lost

    saving = ["trainer.save_strategy=steps", "trainer.save_steps=1", "trainer.max_steps=3"]
    postrain("sft", recipe, f"output_dir={tmp_path / 'saved'}", *saving)
    import shutil

    shutil.rmtree(tmp_path / "saved" / "checkpoints" / "checkpoint-3")  # as if stopped after step 2
    postrain("sft", recipe, f"output_dir={tmp_path / 'saved'}", *saving, "--resume")
    steps = [json.loads(line)["step"] for line in (tmp_path / "saved" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3]  # step 3 logged once, by the resumed run

    # A finished run has nothing left to resume: refused (it used to train one step past max_steps), nothing lost.
    before = (tmp_path / "saved" / "metrics.jsonl").read_text()
    finished = runner.invoke(app, ["sft", recipe, f"output_dir={tmp_path / 'saved'}", *saving, "--resume"])
    assert finished.exit_code == 2 and "the run finished" in finished.output, finished.output
    assert (tmp_path / "saved" / "metrics.jsonl").read_text() == before


def test_a_config_trl_rejects_stops_before_the_run_directory_is_made(tmp_path):
    recipe = grpo_recipe(tmp_path, "[{name: exact_match}]")
    result = runner.invoke(app, ["grpo", str(recipe), f"output_dir={tmp_path / 'run'}",
                                 "trainer.per_device_train_batch_size=3"])
    assert result.exit_code == 2 and "divisible by num_generations" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
