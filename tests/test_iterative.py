"""Iterative preference learning as pipeline stages: two rounds of sample -> verify -> pair -> DPO run end to end
on the embedded tiny model, each round starting from (and referenced to) the previous round's model."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from postrain.cli import app
from tests.conftest import REPO, TINY

EXAMPLE = REPO / "recipes" / "examples" / "iterative_dpo"
DEMO = REPO / "recipes" / "demo"


def test_iterative_dpo_runs_two_rounds_end_to_end(tmp_path):
    out = tmp_path / "iter"
    tiny = json.dumps({**TINY})
    small_sft = (f'{{model.tiny: {tiny}, data.train.task: {{digits: 1, n: 64}}, trainer.max_steps: 10, '
                 f'trainer.per_device_train_batch_size: 16, trainer.learning_rate: 1.0e-2}}')
    # A graded second reward makes sampled completions score differently, so every round finds pairs even from a
    # barely trained model; the verifier stays the first reward.
    rewards = "[{name: exact_match, args: {extract: full}}, {name: length, weight: 0.1, args: {target: 2}}]"

    def sample(model: str, seed: int) -> str:
        return (f'{{model.name_or_path: "{model}", sets.train_prompts.task: {{digits: 1, n: 24, seed: {seed}}}, '
                f'rewards: {rewards}}}')

    def dpo(model: str, samples: str) -> str:
        return (f'{{model.name_or_path: "{model}", data.train.source: "{samples}/samples.jsonl", '
                f'trainer.max_steps: 3, trainer.per_device_train_batch_size: 8, trainer.logging_steps: 1}}')

    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text(f"""
command: pipeline
name: iter
output_dir: {out}
stages:
  sft: {{command: sft, recipe: {DEMO / 'sft.yaml'}, overrides: {small_sft}}}
  sample_r1: {{command: eval, recipe: {EXAMPLE / 'sample.yaml'}, report: false, overrides: {sample('${stages.sft.output}', 11)}}}
  dpo_r1: {{command: dpo, recipe: {EXAMPLE / 'dpo.yaml'}, overrides: {dpo('${stages.sft.output}', '${stages.sample_r1.output}')}}}
  sample_r2: {{command: eval, recipe: {EXAMPLE / 'sample.yaml'}, report: false, overrides: {sample('${stages.dpo_r1.output}', 12)}}}
  dpo_r2: {{command: dpo, recipe: {EXAMPLE / 'dpo.yaml'}, overrides: {dpo('${stages.dpo_r1.output}', '${stages.sample_r2.output}')}}}
""")
    result = CliRunner().invoke(app, ["run", str(pipe)])
    assert result.exit_code == 0, result.output + repr(result.exception)

    lineage = {s["stage"]: s for s in json.loads((out / "lineage.json").read_text())}
    assert lineage["sample_r2"]["inputs"] == [str(out / "dpo_r1")]  # round 2 samples the round-1 policy
    assert lineage["dpo_r2"]["inputs"] == [str(out / "dpo_r1")]  # and trains it, referenced to itself (implicit)
    assert lineage["dpo_r2"]["upstream"] == ["dpo_r1", "sample_r2"]
    prompts = [{json.loads(line)["prompt"] for line in (out / s / "samples.jsonl").read_text().splitlines()}
               for s in ("sample_r1", "sample_r2")]
    assert prompts[0] != prompts[1]  # each round draws its own prompts
    for stage in ("dpo_r1", "dpo_r2"):
        logged = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in logged if "loss" in m] == [1, 2, 3]
