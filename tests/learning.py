"""The pipeline behind tests/test_learning.py, shared with benchmarks/learning_margin.py, which calibrates
the test's margins over seeds and CPU kernel paths.

SFT on 4-letter reversal with half the demonstrations wrong (tests/recipes/learning/), then GRPO with an
exact-match verifier, and DPO on the SFT model's own verifier-labelled samples, each evaluated on held-out
reversals. The noise leaves the SFT model unsure between the right answer and one wrong one on every prompt, so
RL and preference learning have a large effect within a short budget, whatever the CPU.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "tests" / "recipes" / "learning"


def pipeline_yaml(out: Path, seed: int) -> str:
    seed_override = f"seed: {seed}"
    return f"""
command: pipeline
name: learning
output_dir: {out}
stages:
  sft: {{command: sft, recipe: {RECIPES / 'sft.yaml'}, overrides: {{{seed_override}}}}}
  eval_sft: {{command: eval, recipe: {RECIPES / 'eval.yaml'}, overrides: {{model.name_or_path: "${{stages.sft.output}}", {seed_override}}}}}
  grpo:
    command: grpo
    recipe: {RECIPES / 'grpo.yaml'}
    overrides: {{model.name_or_path: "${{stages.sft.output}}", {seed_override}}}
  eval_grpo: {{command: eval, recipe: {RECIPES / 'eval.yaml'}, overrides: {{model.name_or_path: "${{stages.grpo.output}}", {seed_override}}}}}
  sample_sft:
    command: eval
    recipe: {RECIPES / 'sample.yaml'}
    report: false
    overrides: {{model.name_or_path: "${{stages.sft.output}}", {seed_override}}}
  dpo:
    command: dpo
    recipe: {RECIPES / 'dpo.yaml'}
    overrides: {{model.name_or_path: "${{stages.sft.output}}", data.train.source: "${{stages.sample_sft.output}}/samples.jsonl", {seed_override}}}
  eval_dpo: {{command: eval, recipe: {RECIPES / 'eval.yaml'}, overrides: {{model.name_or_path: "${{stages.dpo.output}}", {seed_override}}}}}
"""
