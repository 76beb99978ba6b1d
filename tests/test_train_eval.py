"""Evaluation during training (`eval_during_training:`, postrain.jobs.train_eval): when it runs, what it logs, that
it scores the model as it is at that step, that it leaves training untouched, and what is refused at load time."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from postrain.cli import app
from postrain.errors import RecipeError
from postrain.jobs import load_recipe
from tests.conftest import TINY, write_recipe

runner = CliRunner()
TINY_MODEL = "model: {name_or_path: tiny, dtype: float32, tiny: %s}" % json.dumps(TINY)
GRPO_TRAINER = ("max_steps: 5, per_device_train_batch_size: 8, logging_steps: 1, report_to: none, num_generations: 4, "
                "max_completion_length: 4, use_vllm: false, activation_checkpointing: false, learning_rate: 0.05")

# Rewards whose values vary with what a random tiny model writes, greedy or sampled (exact match: 0 everywhere).
REWARDS_PY = '''
def text(c):
    return c if isinstance(c, str) else c[0]["content"]

def ascii_fraction(completions, **kwargs):
    return [sum(ord(ch) < 128 for ch in text(c)) / len(text(c)) if text(c) else 0.0 for c in completions]

def distinct_fraction(completions, **kwargs):
    return [len(set(text(c))) / len(text(c)) if text(c) else 0.0 for c in completions]
'''
REWARDS = '[{fn: "shape.py:ascii_fraction"}, {fn: "shape.py:distinct_fraction", weight: 0.5}]'
HELDOUT = '{source: "builtin:arithmetic", split: test, task: {n: 6, digits: 1}}'


def grpo_recipe(tmp_path: Path, eval_section: str | None, **trainer) -> Path:
    (tmp_path / "shape.py").write_text(REWARDS_PY)
    # a key given twice in one YAML mapping is refused: the test's own settings replace the defaults' ones
    defaults = [item for item in GRPO_TRAINER.split(", ") if item.split(":")[0] not in trainer]
    trainer_text = ", ".join(defaults + [f"{k}: {v}" for k, v in trainer.items()])
    section = f"eval_during_training: {eval_section}" if eval_section else ""
    return write_recipe(tmp_path / "grpo.yaml", f"""
defaults: [base/grpo]
{TINY_MODEL}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
rewards: {REWARDS}
trainer: {{{trainer_text}}}
{section}
""")


def run(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_steps(run_dir: Path, key: str) -> list[int]:
    return [m["step"] for m in metrics(run_dir) if key in m]


def reference_scores(model_dir: str | Path, prompts: list[str], max_new_tokens: int) -> tuple[float, float]:
    """(mean ASCII fraction, mean of ASCII fraction + 0.5 * distinct-character fraction) of the model's greedy
    completions, written from the reward formulas: one prompt at a time, transformers' generate, no postrain code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fractions, totals = [], []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        fraction = sum(ord(ch) < 128 for ch in text) / len(text) if text else 0.0
        fractions.append(fraction)
        totals.append(fraction + 0.5 * (len(set(text)) / len(text) if text else 0.0))
    return sum(fractions) / len(fractions), sum(totals) / len(totals)


def test_grpo_logs_task_metric_at_start_every_n_steps_and_end_scoring_the_model_of_that_step(tmp_path):
    from postrain.data.sources import load_source
    from postrain.models.loading import resolve_model_path

    section = f"{{every_steps: 2, sets: {{heldout: {HELDOUT}, again: {HELDOUT}}}}}"
    out = tmp_path / "run"
    console = run("grpo", str(grpo_recipe(tmp_path, section)), f"output_dir={out}")
    for name in ("heldout", "again"):
        for key in ("accuracy", "mean_reward"):
            assert eval_steps(out, f"eval/{name}/{key}") == [0, 2, 4, 5]  # start, every 2 steps, the last step
    assert "eval heldout at step 2/5" in console  # plain lines: stdout is not a terminal here

    logged = {m["step"]: m for m in metrics(out) if "eval/heldout/accuracy" in m}
    prompts = [row["prompt"] for row in load_source(
        {"source": "builtin:arithmetic", "split": "test", "task": {"n": 6, "digits": 1}}, "eval")]
    # generation.max_new_tokens left null: the trainer's max_completion_length, 4
    references = {0: reference_scores(resolve_model_path("tiny", TINY), prompts, max_new_tokens=4),
                  5: reference_scores(out / "model", prompts, max_new_tokens=4)}
    assert references[0] != references[5]  # training moved the model: the two points can tell models apart
    for step, (accuracy, mean_reward) in references.items():
        assert logged[step]["eval/heldout/accuracy"] == pytest.approx(accuracy, abs=1e-9)
        assert logged[step]["eval/heldout/mean_reward"] == pytest.approx(mean_reward, abs=1e-9)
        assert logged[step]["eval/again/mean_reward"] == logged[step]["eval/heldout/mean_reward"]


def test_no_start_point_when_at_start_is_off(tmp_path):
    section = f"{{every_steps: 3, at_start: false, sets: {{heldout: {HELDOUT}}}}}"
    out = tmp_path / "run"
    run("grpo", str(grpo_recipe(tmp_path, section)), f"output_dir={out}", "trainer.max_steps=3")
    assert eval_steps(out, "eval/heldout/accuracy") == [3]  # the last step is a multiple: evaluated once


def test_sampled_evaluation_leaves_the_training_run_bit_identical(tmp_path):
    """Training draws completions from the global torch RNG; a sampled evaluation between steps draws from it
    too, unless its state is restored. Same recipe with and without evaluation: same logs, same weights."""
    from safetensors.torch import load_file

    section = (f"{{every_steps: 1, sets: {{heldout: {HELDOUT}}}, "
               f"generation: {{do_sample: true, num_samples: 2, temperature: 1.0}}}}")
    runs = {}
    for label, eval_section in (("plain", None), ("evaluated", section)):
        folder = tmp_path / label
        folder.mkdir()
        run("grpo", str(grpo_recipe(folder, eval_section)), f"output_dir={folder / 'run'}", "trainer.max_steps=3")
        runs[label] = folder / "run"

    def training_logs(run_dir: Path) -> list[dict]:
        timing = ("runtime", "per_second", "step_time")
        return [{k: v for k, v in m.items() if not k.startswith("eval/") and not any(t in k for t in timing)}
                for m in metrics(run_dir) if "loss" in m]

    assert training_logs(runs["evaluated"]) == training_logs(runs["plain"])
    assert len(eval_steps(runs["evaluated"], "eval/heldout/accuracy")) == 4  # it did evaluate: steps 0-3
    assert {m["reward"] for m in training_logs(runs["plain"])} != {0.0}  # rewards vary: sampling mattered
    plain, evaluated = load_file(runs["plain"] / "model" / "model.safetensors"), \
        load_file(runs["evaluated"] / "model" / "model.safetensors")
    assert all(torch.equal(plain[k], evaluated[k]) for k in plain)


def test_evaluate_restores_the_model_mode_and_every_rng_state():
    import numpy as np

    from postrain.jobs.train_eval import EvalSet, TrainEval
    from postrain.models.loading import load_model
    from postrain.rewards import build_rewards

    model, tokenizer, _ = load_model({"name_or_path": "tiny", "dtype": "float32", "tiny": TINY})
    rewards, weights = build_rewards([{"name": "length", "args": {"max_length": 2}}])
    generation = {"max_new_tokens": 4, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                  "num_samples": 3, "batch_size": 4}
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(4)]
    train_eval = TrainEval([EvalSet("s", rows, generation)], rewards, weights, every_steps=1, at_start=True, seed=7)
    for training in (True, False):
        model.train(training)
        torch.manual_seed(123)
        states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
        first = train_eval.evaluate(model, tokenizer)
        assert model.training is training
        assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
        assert (np.random.get_state()[1] == states[2]).all()
        # seeded inside: every evaluation draws the same samples, so two points differ by the model only
        assert train_eval.evaluate(model, tokenizer) == first
    assert set(first) == {"eval/s/accuracy", "eval/s/mean_reward", "eval/s/mean_length_tokens"}


@pytest.mark.parametrize("job", ["sft", "dpo"])
def test_sft_and_dpo_evaluate_with_the_rewards_they_name(tmp_path, job):
    trainer = "max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1, report_to: none, max_length: 32"
    recipe = write_recipe(tmp_path / f"{job}.yaml", f"""
defaults: [base/{job}]
{TINY_MODEL}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 8, digits: 1}}}}}}
trainer: {{{trainer}}}
eval_during_training:
  every_steps: 1
  sets: {{heldout: {HELDOUT}}}
  generation: {{max_new_tokens: 3}}
  rewards: [{{name: exact_match}}, {{name: length, weight: 0.5, args: {{max_length: 1}}}}]
""")
    out = tmp_path / "run"
    run(job, str(recipe), f"output_dir={out}")
    assert eval_steps(out, "eval/heldout/accuracy") == [0, 1, 2]
    assert eval_steps(out, "eval/heldout/mean_reward") == [0, 1, 2]


def test_resuming_does_not_evaluate_the_start_again(tmp_path):
    section = f"{{every_steps: 2, sets: {{heldout: {HELDOUT}}}}}"
    import shutil

    recipe = str(grpo_recipe(tmp_path, section, save_strategy="steps", save_steps=2, max_steps=3))
    out = tmp_path / "run"
    run("grpo", recipe, f"output_dir={out}")
    assert eval_steps(out, "eval/heldout/accuracy") == [0, 2, 3]
    shutil.rmtree(out / "checkpoints" / "checkpoint-3")  # as if stopped after step 2's checkpoint
    run("grpo", recipe, f"output_dir={out}", "--resume")  # metrics after step 2 dropped, step 3 trained again
    assert eval_steps(out, "eval/heldout/accuracy") == [0, 2, 3]


# --- refused at load time, before any model loads ------------------------------------------------------------


def load(tmp_path: Path, job: str, section: str, extra: str = ""):
    return load_recipe(write_recipe(tmp_path / "r.yaml", f"""
defaults: [base/{job}]
{TINY_MODEL}
data: {{train: {{source: "builtin:arithmetic"}}}}
eval_during_training: {section}
{extra}
"""))


@pytest.mark.parametrize("section, expected", [
    (f"{{every_step: 5, sets: {{h: {HELDOUT}}}}}", "unknown key 'eval_during_training.every_step'"),
    (f"{{every_steps: 0, sets: {{h: {HELDOUT}}}}}", "'eval_during_training.every_steps'"),
    ("{every_steps: 5}", "'eval_during_training.sets'"),
    ("{every_steps: 5, sets: {h: {source: x.jsonl, generation: {max_tokens: 4}}}}",
     "unknown key 'eval_during_training.sets.h.generation.max_tokens'"),
    ("{every_steps: 5, sets: {h: {source: x.jsonl, generation: {do_sample: maybe}}}}",
     "'eval_during_training.sets.h.generation.do_sample'"),
    ("{every_steps: 5, generation: {max_new_token: 4}, sets: {h: {source: x.jsonl}}}",
     "unknown key 'eval_during_training.generation.max_new_token'"),
    ("{every_steps: 5, sets: {h: {source: x.jsonl, metrics: {pass_at: [1]}}}}",
     "'eval_during_training.sets.h.metrics'"),
    ("{every_steps: 5, sets: {math/test: {source: x.jsonl}}}", "'eval_during_training.sets.math/test'"),
])
def test_bad_section_is_refused_naming_the_key(tmp_path, section, expected):
    with pytest.raises(RecipeError) as error:
        load(tmp_path, "grpo", section)
    assert expected in str(error.value) and "r.yaml" in str(error.value)


@pytest.mark.parametrize("job", ["sft", "dpo"])
def test_sft_and_dpo_must_name_rewards(tmp_path, job):
    with pytest.raises(RecipeError, match=r"'eval_during_training.rewards' .* is required for `%s`" % job):
        load(tmp_path, job, f"{{every_steps: 5, sets: {{h: {HELDOUT}}}}}")
    load(tmp_path, job, f"{{every_steps: 5, sets: {{h: {HELDOUT}}}, rewards: [{{name: exact_match}}]}}")


def test_grpo_uses_its_own_rewards_unless_the_section_names_others(tmp_path):
    from postrain.jobs.train_eval import TrainEval

    job_rewards = "rewards: [{name: exact_match}, {name: length, weight: 0.2, args: {max_length: 3}}]"
    own = TrainEval.from_recipe(load(tmp_path, "grpo", f"{{every_steps: 5, sets: {{h: {HELDOUT}}}}}", job_rewards))
    assert [r.name for r in own.rewards] == ["exact_match", "length"] and own.weights == [1.0, 0.2]
    named = TrainEval.from_recipe(load(tmp_path, "grpo", f"{{every_steps: 5, sets: {{h: {HELDOUT}}}, "
                                                         "rewards: [{name: format, args: {pattern: x}}]}"))
    assert [r.name for r in named.rewards] == ["format"]
    with pytest.raises(RecipeError, match=r"eval_during_training.rewards: unknown reward 'exact_mach'.*exact_match"):
        TrainEval.from_recipe(load(tmp_path, "grpo", f"{{every_steps: 5, sets: {{h: {HELDOUT}}}, "
                                                     "rewards: [{name: exact_mach}]}"))


def test_a_set_lacking_a_reward_column_stops_the_run_before_anything_is_written(tmp_path):
    (tmp_path / "no_answers.jsonl").write_text('{"prompt": "1+1="}\n')
    section = f"{{every_steps: 2, sets: {{bare: {{source: {tmp_path / 'no_answers.jsonl'}}}}}}}"
    recipe = str(grpo_recipe(tmp_path, section))
    out = tmp_path / "run"
    for extra in (["--dry-run"], []):
        result = runner.invoke(app, ["grpo", recipe, f"output_dir={out}", "rewards=[{name: exact_match}]", *extra])
        assert result.exit_code == 2 and "eval_during_training.sets.bare" in result.output
        assert "'answer'" in result.output and "Traceback" not in result.output
        assert not out.exists()


def test_dry_run_shows_the_schedule_and_smoke_swaps_the_sets_for_built_in_data(tmp_path):
    section = "{every_steps: 20, sets: {hub: {source: some-org/some-dataset, split: test}}}"
    recipe = grpo_recipe(tmp_path, section)
    from postrain.jobs import load_smoke_recipe

    smoke = load_smoke_recipe(recipe)
    assert smoke.cfg["eval_during_training"]["sets"]["hub"]["source"] == "builtin:arithmetic"
    assert smoke.cfg["eval_during_training"]["every_steps"] == 1
    local = "eval_during_training.sets.hub.source=builtin:arithmetic"
    dry = runner.invoke(app, ["grpo", str(recipe), "--dry-run", local])
    assert dry.exit_code == 0, dry.output
    assert "every 20 steps" in dry.output and "eval set hub" in dry.output
