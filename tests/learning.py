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


# --- Per-method learning checks (tests/test_learning_methods.py, benchmarks/method_learning_margin.py) -----------
# The same noisy SFT model as above, then one short GRPO run per named method (rl/methods.py) and one short DPO run
# per registry preference loss, each judged on held-out data against the SFT model it started from.

# `method:` values; dapo's overlong buffer must fit in the 6-token completions.
GRPO_METHODS: dict[str, object] = {
    "grpo": "grpo", "dr_grpo": "dr_grpo", "dapo": {"name": "dapo", "overlong_buffer_len": 2}, "gspo": "gspo",
    "gmpo": "gmpo", "cispo": "cispo", "rloo": "rloo", "reinforce_pp": "reinforce_pp", "opo": "opo", "gpg": "gpg",
}
GRPO_METHOD_STEPS = 30
# Not `discopop`: from a policy equal to its reference (log-ratio margin z = 0) its loss falls by making z
# negative, to a local minimum near z = -0.1 at its paper's tau = 0.05, so a short run lowers the loss and the
# preference accuracy together (measured: 0.40 -> 0.02); the formula is the authors' and TRL's.
DPO_LOSSES = ["dpo", "ipo", "cdpo", "robust", "hinge", "simpo", "orpo", "nca_pair", "exo_pair", "apo_zero",
              "sppo_hard"]


def invoke(args: list[str]) -> None:
    """Run a postrain command in this process; fail with its output."""
    from typer.testing import CliRunner

    from postrain.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        raise AssertionError(f"postrain {' '.join(map(str, args))} failed:\n{result.output[-4000:]}\n{result.exception!r}")


def train_noisy_sft(out: Path, seed: int) -> Path:
    invoke(["sft", RECIPES / "sft.yaml", f"seed={seed}", f"output_dir={out}"])
    return out / "model"


def sampled_accuracy(model: Path, out: Path, seed: int) -> float:
    """Held-out accuracy sampled at T=1 (tests/recipes/learning/eval_sampled.yaml; the same figure as the
    `sampled` set of eval.yaml, which evaluates it first)."""
    import json

    invoke(["eval", RECIPES / "eval_sampled.yaml", f"model.name_or_path={model}", f"seed={seed}", f"output_dir={out}"])
    return json.loads((out / "results.json").read_text())["sets"]["sampled"]["accuracy"]


def grpo_with_method(model: Path, out: Path, method: str, seed: int, steps: int = GRPO_METHOD_STEPS) -> Path:
    import json

    invoke(["grpo", RECIPES / "grpo.yaml", f"model.name_or_path={model}", f"seed={seed}", f"output_dir={out}",
            f"method={json.dumps(GRPO_METHODS[method])}", f"trainer.max_steps={steps}"])
    return out / "model"


def dpo_with_loss(model: Path, out: Path, loss: str, seed: int) -> tuple[Path, list[float]]:
    """Returns the trained model and the logged training losses."""
    import json

    invoke(["dpo", RECIPES / "dpo_pairs.yaml", f"model.name_or_path={model}", f"seed={seed}", f"output_dir={out}",
            f"loss=[{{name: {loss}}}]"])
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return out / "model", [entry["loss"] for entry in logs if "loss" in entry]


def held_out_pairs(n: int = 300) -> list[dict]:
    from postrain.data.tasks import build_task

    return build_task("reverse", "test", {"length": 4, "n": n})


def preference_accuracy(model: Path, pairs: list[dict]) -> tuple[float, float]:
    """Fraction of pairs whose chosen completion the model finds more likely than the rejected one, and the mean
    log-likelihood margin. Computed with a plain forward pass, independently of the trainer's log-prob code:
    log p(completion + EOS | prompt), summed over the completion tokens."""
    import torch

    from postrain.models.loading import load_model

    net, tokenizer, _ = load_model({"name_or_path": str(model)})
    net.eval()

    def logp(prompt: str, completion: str) -> float:
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        ids = torch.tensor([p + tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]])
        with torch.no_grad():
            logprobs = net(ids).logits[0, :-1].float().log_softmax(-1)
        targets = ids[0, 1:]
        return logprobs[len(p) - 1 :].gather(-1, targets[len(p) - 1 :, None]).sum().item()

    margins = [logp(r["prompt"], r["chosen"]) - logp(r["prompt"], r["rejected"]) for r in pairs]
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)
