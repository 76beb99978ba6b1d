"""Evaluation during training: a training recipe's `eval_during_training:` section (schema: TrainEvalSpec).

    eval_during_training:
      every_steps: 20            # optimizer steps between evaluations
      at_start: true             # also at step 0, before any update: the baseline point
      sets: {heldout: {source: "builtin:arithmetic", split: test, task: {n: 64}}}
      generation: {max_new_tokens: 16}   # null max_new_tokens: the trainer's max_completion_length (grpo)
      rewards: []                # empty: the job's own rewards (grpo); sft and dpo must name theirs
      save_samples: 4            # completions per set kept per evaluation in eval_samples/step_<N>.jsonl; 0: none

The sets are generated and scored as `postrain eval` does (postrain.models.generation: `generate_with_ids`;
postrain.evaluation.scoring: `score_set`) and logged to metrics.jsonl as `eval/<set>/accuracy` (mean of the first
reward, the verifier), `eval/<set>/mean_reward` (the weighted reward sum) and `eval/<set>/mean_length_tokens`,
at step 0 (`at_start`), every `every_steps` steps and at the last step. Next to the training reward this shows
reward hacking: the reward rises, the task metric does not. The first `save_samples` completions of each set are kept per evaluation
(`eval_samples/step_<N>.jsonl`; `postrain report` shows them), to read what the numbers measured.

A set's prompts are formatted as data.train's are (`chat`, `system_prompt`, `prompt_template`) unless the set names
the key itself (`key: null` there opts out): the model is evaluated on prompts shaped as those it trains on, as a
TRL user's eval_dataset is formatted as the train_dataset (with a chat model, a bare prompt is another task).

Two things the evaluation must not change in the training it interrupts:
  - the model's mode: `generate` puts the model in eval mode; its previous mode is restored afterwards;
  - the random stream: transformers' `generate` samples from the global torch RNG and takes no generator, so the
    RNG state (CPU and every CUDA device) is saved before and restored after (`torch.random.fork_rng`). Inside,
    the RNG is seeded with the recipe's seed, so every evaluation samples with the same noise and two points of
    the curve differ by the model only.

Every process evaluates (a sharded model needs all of them for a forward pass); the main one logs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from postrain.data.sources import is_local, load_source, source_size
from postrain.errors import DataError, RecipeError
from postrain.evaluation.scoring import score_set
from postrain.files import SAMPLES_DIR  # the run directory's name, read by the reports too
from postrain.models.generation import generate_with_ids
from postrain.recipes.schema import GenerationSpec, TrainEvalGenerationSpec, TrainEvalSpec
from postrain.recipes.validate import origin_of, validate_section
from postrain.rewards import RewardSpecError, build_rewards, check_reward_columns, policy_options

SECTION = "eval_during_training"
TRAINING_COMMANDS = ("sft", "dpo", "grpo")
# How data.train formats its prompts; a set that does not name a key itself formats its prompts as training does,
# `key: null` (or false) on the set opts out.
PROMPT_FORMAT_KEYS = ("chat", "system_prompt", "prompt_template")


def set_spec(cfg: dict, spec: dict) -> tuple[dict, list[str]]:
    """An eval set's source spec with the prompt formatting it leaves out taken from data.train, and the keys taken."""
    train = (cfg.get("data") or {}).get("train") or {}
    inherited = [key for key in PROMPT_FORMAT_KEYS if key not in spec and train.get(key) not in (None, False)]
    return {**spec, **{key: train[key] for key in inherited}}, inherited


def load_set(cfg: dict, spec: dict, where: str):
    """Load one set as `set_spec` formats it; an inherited prompt_template that does not fit the set says so."""
    spec, inherited = set_spec(cfg, spec)
    try:
        return load_source(spec, "eval", where=where)
    except DataError as e:
        if "prompt_template" not in inherited:
            raise
        raise DataError(f"{where}: {e} (prompt_template is data.train's, which sets without their own inherit; give "
                        f"the set its own, or {where}.prompt_template: null for its prompts as they are)") from None


def section_with_defaults(cfg: dict) -> dict | None:
    """The recipe's section with every key the recipe left out at its schema default (the built-in defaults
    layer holds `eval_during_training: null`, so a recipe's partial section is all the resolved recipe has)."""
    section = cfg.get(SECTION)
    if section is None:
        return None
    defaults = dataclasses.asdict(TrainEvalSpec())
    return {**defaults, **section, "generation": {**defaults["generation"], **(section.get("generation") or {})}}


def check_section(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """Load-time checks of what the schema's types cannot say (every job's check runs this:
    postrain.jobs.checks.check_inputs)."""
    section = section_with_defaults(cfg) if command in TRAINING_COMMANDS else None
    if section is None:
        return

    def where(key: str) -> str:
        path = f"{SECTION}.{key}"
        return f"'{path}' (from {origin_of(origins, path)})"

    if section["every_steps"] < 1:
        raise RecipeError(f"{where('every_steps')} must be a positive number of optimizer steps between "
                          f"evaluations, got {section['every_steps']}")
    if section["save_samples"] < 0:
        raise RecipeError(f"{where('save_samples')} is the number of completions per set saved at each evaluation "
                          f"(0: none), got {section['save_samples']}")
    if not section["sets"]:
        raise RecipeError(f"{where('sets')} needs at least one set, e.g. sets: {{heldout: {{source: "
                          f"\"builtin:arithmetic\", split: test}}}}")
    if not section["rewards"] and (command != "grpo" or not cfg.get("rewards")):
        raise RecipeError(f"{where('rewards')} is required for `{command}`: the job has no rewards of its own to "
                          f"score with (the first one is the verifier behind accuracy), e.g. rewards: "
                          f"[{{name: exact_match}}]")
    for name, spec in section["sets"].items():
        if "/" in str(name):  # logged as eval/<set>/<metric>: readers split on "/"
            raise RecipeError(f"{where(f'sets.{name}')}: a set name cannot hold '/' (it is logged as "
                              f"eval/<set>/accuracy); rename it, e.g. {str(name).replace('/', '_')!r}")
        overrides = spec.get("generation") or {}
        # The set's decoding overrides are a mapping in EvalSetSpec; here they must be TrainEvalGenerationSpec keys.
        validate_section(overrides, TrainEvalGenerationSpec, f"{SECTION}.sets.{name}.generation", origins)
        if spec.get("metrics") is not None:
            raise RecipeError(f"{where(f'sets.{name}.metrics')}: evaluation during training logs accuracy and "
                              f"mean_reward only; pass@k / maj@k are `postrain eval`'s (run it on the saved model)")


@dataclass
class EvalSet:
    name: str
    rows: list[dict]
    generation: dict[str, Any]


class TrainEval:
    """The evaluation sets, rewards and schedule of one training run; `callback()` runs them from the trainer."""

    def __init__(self, sets: list[EvalSet], rewards: list, weights: list[float], every_steps: int,
                 at_start: bool, seed: int, *, samples_dir: str | Path | None = None, save_samples: int = 0):
        self.sets, self.rewards, self.weights = sets, rewards, weights
        self.every_steps, self.at_start, self.seed = every_steps, at_start, seed
        self.samples_dir, self.save_samples = samples_dir, save_samples

    @classmethod
    def from_recipe(cls, recipe, run_dir: str | Path | None = None) -> "TrainEval | None":
        """Build the rewards and load every set, checking the columns the rewards read, or raise naming the set:
        the training job calls this before the run directory is made and the model loads. Samples are kept under
        `run_dir` (where the run writes: output_dir, or the --overwrite run's `<output_dir>.new`)."""
        section = section_with_defaults(recipe.cfg)
        if section is None:
            return None
        rewards, weights = build_section_rewards(recipe, section)
        sets = []
        for name, spec in section["sets"].items():
            where = f"{SECTION}.sets.{name}"
            dataset = load_set(recipe.cfg, spec, where)
            check_reward_columns(rewards, dataset, where)
            generation = {**section["generation"], **(spec.get("generation") or {})}
            sets.append(EvalSet(name, dataset.to_list(), generation))
        return cls(sets, rewards, weights, section["every_steps"], section["at_start"], recipe.cfg["seed"],
                   samples_dir=Path(run_dir or recipe.cfg["output_dir"]) / SAMPLES_DIR, save_samples=section["save_samples"])

    def evaluate(self, model, tokenizer, max_completion_length: int | None = None) -> dict[str, float]:
        """Score every set with the model as it is now; the model's mode and the RNG state are left as found."""
        return self.evaluate_with_samples(model, tokenizer, max_completion_length)[0]

    def evaluate_with_samples(self, model, tokenizer, max_completion_length: int | None = None
                              ) -> tuple[dict[str, float], list[dict]]:
        """`evaluate`'s logs and the first `save_samples` sample records of each set (postrain eval's records:
        prompt, completion, answer, score, rewards, parsed; with `set` and `completion_tokens`)."""
        import torch  # slow: torch, needed only when this runs

        was_training = model.training
        cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        logs: dict[str, float] = {}
        kept: list[dict] = []
        try:
            with torch.random.fork_rng(devices=cuda_devices):
                torch.manual_seed(self.seed)
                for eval_set in self.sets:
                    generation = dict(eval_set.generation)
                    if generation["max_new_tokens"] is None:
                        generation["max_new_tokens"] = max_completion_length or GenerationSpec.max_new_tokens
                    completions, ids = generate_with_ids(model, tokenizer, [row["prompt"] for row in eval_set.rows],
                                                         generation)
                    summary, samples = score_set(eval_set.rows, completions, self.rewards, self.weights, tokenizer,
                                                 completion_ids=ids)
                    for key in ("accuracy", "mean_reward", "mean_length_tokens"):
                        logs[f"eval/{eval_set.name}/{key}"] = summary[key]
                    lengths = [len(one) for per_prompt in ids for one in per_prompt]
                    kept += [{"set": eval_set.name, **sample, "completion_tokens": length}
                             for sample, length in zip(samples[: self.save_samples], lengths)]
        finally:
            model.train(was_training)
        return logs, kept

    def write_samples(self, step: int, samples: list[dict]) -> Path | None:
        """<samples_dir>/step_<step>.jsonl, one line per sample (written anew when a resumed run evaluates again)."""
        if self.samples_dir is None or not samples:
            return None
        path = Path(self.samples_dir) / f"step_{step}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"step": step, **sample}, default=str) + "\n" for sample in samples))
        return path

    def is_due(self, step: int) -> bool:
        return step % self.every_steps == 0 and (step > 0 or self.at_start)

    def callback(self, tokenizer, record: Callable[[Any, dict], None], view=None):
        """A TrainerCallback evaluating at the start (step 0, not when resuming), every `every_steps` optimizer
        steps and at the end, and passing the results to `record(state, logs)` (metrics.jsonl and the console).
        It runs in `on_step_end`, before the trainer logs that step, so the model is back in train mode when the
        trainer decides whether its logs are train or eval metrics."""
        from transformers import TrainerCallback  # slow: transformers, needed only when this runs

        train_eval = self

        class InTrainingEval(TrainerCallback):
            last_step: int | None = None

            def _evaluate(self, args, state, model) -> None:
                if view is not None:
                    view.phase(f"evaluating {', '.join(s.name for s in train_eval.sets)}")
                logs, samples = train_eval.evaluate_with_samples(model, tokenizer,
                                                                 getattr(args, "max_completion_length", None))
                self.last_step = state.global_step
                if state.is_world_process_zero:
                    record(state, logs)
                    train_eval.write_samples(state.global_step, samples)
                if view is not None:
                    view.phase("training")

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                if state.global_step == 0 and train_eval.is_due(0):
                    self._evaluate(args, state, model)

            def on_step_end(self, args, state, control, model=None, **kwargs):
                if train_eval.is_due(state.global_step):
                    self._evaluate(args, state, model)

            def on_train_end(self, args, state, control, model=None, **kwargs):
                if self.last_step != state.global_step:
                    self._evaluate(args, state, model)

        return InTrainingEval()


def build_section_rewards(recipe, section: dict) -> tuple[list, list[float]]:
    """The section's rewards, else the job's own (grpo), each built anew: their error counts are the
    evaluation's, not mixed into training's `rewards/<name>/errors`."""
    own = bool(section["rewards"])
    specs = section["rewards"] if own else recipe.cfg.get("rewards") or []
    policy = section["reward_errors"] or recipe.cfg.get("reward_errors") or {}  # sft / dpo have none: fail
    try:
        return build_rewards(specs, base_dir=recipe.path.parent if recipe.path else None, **policy_options(policy))
    except RewardSpecError as e:
        raise RecipeError(f"{SECTION}.rewards: {e}" if own else str(e)) from None


def plan_lines(recipe) -> dict[str, str]:
    """`--dry-run`'s account of the section; builds the rewards and checks the columns of every local set."""
    section = section_with_defaults(recipe.cfg)
    if section is None:
        return {}
    rewards, _ = build_section_rewards(recipe, section)
    when = f"every {section['every_steps']} steps{', at step 0' if section['at_start'] else ''} and at the end"
    out = {"eval during training": f"{when}; accuracy = {rewards[0].name}"}
    for name, spec in section["sets"].items():
        where = f"{SECTION}.sets.{name}"
        if is_local(spec):
            check_reward_columns(rewards, load_set(recipe.cfg, spec, where), where)
        gen = {**section["generation"], **(spec.get("generation") or {})}
        decoding = f"sampled (temperature {gen['temperature']})" if gen["do_sample"] else "greedy"
        tokens = gen["max_new_tokens"] or ("trainer.max_completion_length" if recipe.command == "grpo"
                                           else GenerationSpec.max_new_tokens)
        out[f"  eval set {name}"] = (f"{source_size(spec) or 'unknown'} prompts x {gen['num_samples']} samples, "
                                     f"{decoding}, <= {tokens} new tokens")
    return out
