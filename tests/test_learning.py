"""A shorter run of the demo: GRPO raises held-out accuracy over the SFT checkpoint it starts from, and DPO on
verifier-labelled self-samples does not lower it. Asserts the direction of the change, beyond sampling noise,
not a figure.

Uses the demo's own recipes (recipes/demo/) with fewer GRPO steps and fewer samples, through `postrain run`.
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from postrain.cli import app
from tests.conftest import REPO, write_recipe

DEMO = REPO / "recipes" / "demo"


def accuracy(run_dir, set_name="sampled") -> tuple[float, int]:
    r = json.loads((run_dir / "results.json").read_text())["sets"][set_name]
    return r["accuracy"], r["samples"]


def noise(p: float, n: int, q: float, m: int) -> float:
    """Two standard errors of the difference of two sample means of 0/1 scores."""
    return 2 * math.sqrt(p * (1 - p) / n + q * (1 - q) / m)


@pytest.mark.slow
def test_grpo_improves_and_dpo_does_not_hurt(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "demo"
    pipe = write_recipe(tmp_path / "mini_demo.yaml", f"""
command: pipeline
name: mini-demo
output_dir: {out}
stages:
  sft: {{command: sft, recipe: {DEMO / 'sft.yaml'}}}
  eval_sft: {{command: eval, recipe: {DEMO / 'eval.yaml'}, overrides: {{model.name_or_path: "${{stages.sft.output}}"}}}}
  grpo:
    command: grpo
    recipe: {DEMO / 'grpo.yaml'}
    overrides: {{model.name_or_path: "${{stages.sft.output}}", trainer.max_steps: 250}}
  eval_grpo: {{command: eval, recipe: {DEMO / 'eval.yaml'}, overrides: {{model.name_or_path: "${{stages.grpo.output}}"}}}}
  sample_sft:
    command: eval
    recipe: {DEMO / 'sample.yaml'}
    overrides: {{model.name_or_path: "${{stages.sft.output}}"}}
  dpo:
    command: dpo
    recipe: {DEMO / 'dpo.yaml'}
    overrides: {{model.name_or_path: "${{stages.sft.output}}", data.train.source: "${{stages.sample_sft.output}}/samples.jsonl"}}
  eval_dpo: {{command: eval, recipe: {DEMO / 'eval.yaml'}, overrides: {{model.name_or_path: "${{stages.dpo.output}}"}}}}
""")
    result = CliRunner().invoke(app, ["run", str(pipe)])
    assert result.exit_code == 0, result.output + repr(result.exception)

    sft, n = accuracy(out / "eval_sft")
    grpo, m = accuracy(out / "eval_grpo")
    dpo, k = accuracy(out / "eval_dpo")
    assert 0.05 < sft < 0.95, f"SFT accuracy {sft:.3f}: the demo task leaves no room to measure a change"
    assert grpo - sft > noise(sft, n, grpo, m), f"GRPO {grpo:.3f} vs SFT {sft:.3f}"
    assert dpo - sft > -noise(sft, n, dpo, k), f"DPO {dpo:.3f} vs SFT {sft:.3f}"
