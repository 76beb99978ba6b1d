"""The shape of a recipe, one dataclass per command.

A recipe is validated against these dataclasses at load time, before any model loads. Sections that map onto a
TRL config (`trainer:`, the class the job builds: `postrain.trainers.TRAINERS`) or a peft config (`peft:`) are
checked against that class's own dataclass fields, so the valid keys are always those of the installed version. The defaults here are the *built-in defaults* layer: the
lowest layer of every recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# A data source's shape is the data package's own (its transforms' settings are their registered parameters).
from postrain.data.source_spec import ChunkSpec, MixSpec, SourceSpec  # noqa: F401  (part of the recipe schema)
# The tiny model's size and lm-eval's settings are their readers' own (models, evaluation layers).
from postrain.evaluation.lm_eval_backend import LMEvalSpec
from postrain.evaluation.scoring import EvalMetricsSpec  # `metrics:` of an eval recipe, next to the scoring that reads it
from postrain.models.tiny import TinyModelSpec


@dataclass
class PaperSpec:
    """The paper a recipe reproduces (shown by `postrain recipes`)."""

    title: str = ""
    arxiv: str = ""
    url: str | None = None
    notes: str | None = None


@dataclass
class HubSpec:
    """`hub:` of a training or merge recipe (postrain.jobs.hub): after the run finishes, its final model folder
    (`<output_dir>/model`: weights, tokenizer and the model card README.md) is uploaded to this Hugging Face hub
    model repository with huggingface_hub, by the main process only. Off while `repo_id` is null.

    postrain pushes rather than TRL (`trainer.push_to_hub`, refused at load time): TRL's trainer uploads its own
    output folder, which is postrain's `checkpoints/` (intermediate checkpoints, LoRA adapters not merged, no
    card), and pushes during training; postrain pushes the one finished model once, after the run succeeded.
    Credentials come from huggingface_hub's own login (`hf auth login` or HF_TOKEN), never from a recipe: the
    recipe is saved in the run directory, logged to trackers and printed in the card.
    Not part of the recipe hash (postrain.recipes.loader): where a model is published does not change what was
    trained, so changing it neither retrains a pipeline stage nor blocks --resume."""

    # `org/name` (or `name`, in the namespace of the logged-in user); null: no push.
    repo_id: str | None = None
    # Applies when the repository is created; pushing private weights into an existing public repository is
    # refused (see postrain.jobs.hub). Private by default: publishing is something a recipe says, not a default.
    private: bool = True
    # A branch of the repository (created from the default branch when missing); null: the default branch.
    revision: str | None = None
    # null: "postrain <command> <name> (recipe <hash>)".
    commit_message: str | None = None


@dataclass
class ModelSpec:
    """Which model to start from: `tiny`, a local path or run directory, or a hub id (passed through untouched)."""

    name_or_path: str = "tiny"
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec)


@dataclass
class EvalSetSpec(SourceSpec):
    """An eval set: a data source plus optional decoding and metric overrides for this set (e.g. sampled vs
    greedy; pass@k only where several samples are drawn)."""

    generation: dict[str, Any] = field(default_factory=dict)
    metrics: EvalMetricsSpec | None = None


@dataclass
class DataSpec:
    train: SourceSpec | None = None
    eval: SourceSpec | None = None


@dataclass
class RewardSpec:
    """A reward function: a built-in `name` or a user's `fn` (`module:function` or `path/file.py:function`)."""

    name: str | None = None
    fn: str | None = None
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)
    alias: str | None = None


@dataclass
class RLSpec:
    """GRPO's RL parts (postrain.rl.section): each an entry name, or `{name: ..., <its hyperparameters>}`."""

    advantage: str | dict[str, Any] | None = None
    policy_loss: str | dict[str, Any] | None = None
    aggregation: str | dict[str, Any] | None = None
    regularizers: list[str | dict[str, Any]] = field(default_factory=list)
    shaping: list[str | dict[str, Any]] = field(default_factory=list)
    samplers: list[str | dict[str, Any]] = field(default_factory=list)


@dataclass
class RewardErrorPolicy:
    """What a reward that fails does to the run: `fail` stops it, `score` scores the completion as `score` and
    counts it (logged as rewards/<name>/errors). A reward fails when it raises, scores NaN or infinity, or runs
    out of time: every reward runs in a worker process (postrain.rewards.worker) and a call gets `timeout`
    seconds for a batch (verl's reward loop: 300 s) and `completion_timeout` for one completion, when a failed
    batch is scored again one completion at a time (open-r1's sandboxes: 30 s); null: no limit."""

    policy: Literal["fail", "score"] = "fail"
    score: float = 0.0
    timeout: float | None = 300.0
    completion_timeout: float | None = 30.0


@dataclass
class GenerationSpec:
    """Decoding for `postrain eval` (batched, KV cache)."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1
    batch_size: int = 64


@dataclass
class TrainEvalGenerationSpec(GenerationSpec):
    """Decoding for evaluation during training; `max_new_tokens: null` is the trainer's `max_completion_length`
    (GRPO: the length the policy is trained to write), else GenerationSpec's default."""

    max_new_tokens: int | None = None


@dataclass
class TrainEvalSpec:
    """`eval_during_training:` of a training recipe (postrain.jobs.train_eval): every `every_steps` optimizer steps
    (and at the start when `at_start`, and at the end) the `sets` are generated from and scored as `postrain eval`
    does, and logged to metrics.jsonl as eval/<set>/accuracy (the first reward) and eval/<set>/mean_reward.
    `rewards` left empty are the job's own (grpo; sft and dpo have none, so must name them); `reward_errors`
    left null is the job's own (grpo), else `fail`."""

    every_steps: int = 0
    at_start: bool = True
    sets: dict[str, EvalSetSpec] = field(default_factory=dict)
    generation: TrainEvalGenerationSpec = field(default_factory=TrainEvalGenerationSpec)
    rewards: list[RewardSpec] = field(default_factory=list)
    reward_errors: RewardErrorPolicy | None = None
    # The first N completions of each set (prompt order) are written per evaluation to
    # <output_dir>/eval_samples/step_<step>.jsonl (prompt, completion, answer, rewards); 0: none.
    save_samples: int = 4


@dataclass
class LaunchSpec:
    """`launch:` of a training recipe: how many processes run it, and how the model is sharded over them
    (postrain.launch). With one process and no `config` the job runs in the calling process, as always; otherwise
    postrain re-executes itself under `accelerate launch` (as TRL's CLI does), one process per device.

    `config` is a shipped accelerate configuration (`ddp`, `fsdp2`, `fsdp2_offload`, `zero2`, `zero3`,
    `zero3_offload`; postrain/launch/configs/) or the path of an accelerate config file of your own; null: `ddp`
    when more than one process runs. The number of processes and machines comes from here, not from the file."""

    num_processes: int = 1  # per machine (one per GPU)
    num_machines: int = 1
    machine_rank: int = 0  # this machine's rank, 0 .. num_machines - 1 (multi-node: run once on every machine)
    main_process_ip: str | None = None  # the rank-0 machine's address (required when num_machines > 1)
    main_process_port: int = 29500
    config: str | None = None
    # Further `accelerate launch` arguments, passed as they are (e.g. ["--rdzv_backend", "c10d"]).
    extra_args: list[str] = field(default_factory=list)


@dataclass
class HealthSpec:
    """`health:` of a training recipe (postrain.jobs.guard): what a NaN or inf loss or gradient norm does to the
    run, and when a run that stopped learning is warned about. Not part of the recipe hash: it changes no step
    that trains normally, and a run stopped by a NaN can then be resumed with `health.nonfinite=skip`."""

    # stop: end the run at that step, before its update (status failed, the step's batch written out);
    # skip: drop that step's update and count it (health/skipped_steps), stopping after max_skipped_steps
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10
    # warn when, for this many steps in a row, the loss is exactly constant (sft, dpo), the gradient norm exactly
    # 0, or every GRPO group has zero reward variance; 0: no warnings
    stall_steps: int = 20


@dataclass
class CommonSpec:
    """Keys every recipe has."""

    command: str = ""
    name: str = "run"
    output_dir: str = "runs/${name}"
    seed: int = 42
    description: str | None = None
    paper: PaperSpec | None = None


@dataclass
class SFTRecipe(CommonSpec):
    command: str = "sft"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    trainer: dict[str, Any] = field(default_factory=dict, metadata={"trainer_config": "sft"})
    peft: dict[str, Any] | None = field(default=None, metadata={"peft": "LoraConfig"})
    eval_during_training: TrainEvalSpec | None = None
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    health: HealthSpec = field(default_factory=HealthSpec)
    # Upload the finished model folder to the Hugging Face hub (HubSpec; off while hub.repo_id is null).
    hub: HubSpec = field(default_factory=HubSpec)


@dataclass
class DPORecipe(CommonSpec):
    command: str = "dpo"
    model: ModelSpec = field(default_factory=ModelSpec)
    # None: TRL's implicit reference (a frozen copy of the starting policy, or the adapter-free base under peft).
    ref_model: ModelSpec | None = None
    data: DataSpec = field(default_factory=DataSpec)
    trainer: dict[str, Any] = field(default_factory=dict, metadata={"trainer_config": "dpo"})
    peft: dict[str, Any] | None = field(default=None, metadata={"peft": "LoraConfig"})
    eval_during_training: TrainEvalSpec | None = None
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    health: HealthSpec = field(default_factory=HealthSpec)
    # Preference losses from postrain's registry, combined as Σ weight·mean(loss): [{name: simpo, weight: 1.0,
    # beta: 2.0, gamma: 1.0}] (keys besides name/weight are the loss' hyperparameters; checked at load time by
    # postrain.preference.section.parse_losses). Empty: TRL's own loss (`trainer.loss_type`), untouched.
    loss: list[dict[str, Any]] = field(default_factory=list)
    # Further models whose summed log-probs of each chosen / rejected completion are computed once before training
    # and added as the columns `<name>_chosen_logps` / `<name>_rejected_logps` (postrain.trainers.logp_models):
    # `{prev: {name_or_path: ...}}` is INPO's previous iterate, `mrpo`'s `references:` name its further references.
    logp_models: dict[str, ModelSpec] = field(default_factory=dict)
    # Upload the finished model folder to the Hugging Face hub (HubSpec; off while hub.repo_id is null).
    hub: HubSpec = field(default_factory=HubSpec)
    # What a loss whose defining step cannot act under the batch layout does (postrain.jobs.liveness): `warn`
    # logs it when the recipe loads, `error` refuses the recipe. Not part of the recipe hash.
    liveness: Literal["warn", "error"] = "warn"


@dataclass
class GRPORecipe(CommonSpec):
    command: str = "grpo"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    rewards: list[RewardSpec] = field(default_factory=list)
    reward_errors: RewardErrorPolicy = field(default_factory=RewardErrorPolicy)
    trainer: dict[str, Any] = field(default_factory=dict, metadata={"trainer_config": "grpo"})
    peft: dict[str, Any] | None = field(default=None, metadata={"peft": "LoraConfig"})
    eval_during_training: TrainEvalSpec | None = None
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    health: HealthSpec = field(default_factory=HealthSpec)
    # A named method (`dapo`, or `{name: dapo, epsilon_high: 0.3}`): expands to its `rl:` parts at load time.
    method: str | dict[str, Any] | None = None
    # Registered RL parts replacing TRL's advantage and loss path (postrain.rl.section); None: TRL's, untouched.
    rl: RLSpec | None = None
    # Upload the finished model folder to the Hugging Face hub (HubSpec; off while hub.repo_id is null).
    hub: HubSpec = field(default_factory=HubSpec)
    # What an rl: part whose defining step cannot act under the batch layout does (postrain.jobs.liveness):
    # `warn` logs it when the recipe loads, `error` refuses the recipe. Not part of the recipe hash.
    liveness: Literal["warn", "error"] = "warn"


@dataclass
class EvalBackendSpec:
    """`eval:` of an eval recipe: which evaluator runs. `postrain`: this recipe's sets, generation, rewards and
    metrics (postrain.jobs.evaluate); `lm_eval`: EleutherAI's lm-evaluation-harness as a library, on the tasks
    under `lm_eval:` (postrain.evaluation.lm_eval_backend)."""

    backend: Literal["postrain", "lm_eval"] = "postrain"


@dataclass
class EvalRecipe(CommonSpec):
    command: str = "eval"
    model: ModelSpec = field(default_factory=ModelSpec)
    sets: dict[str, EvalSetSpec] = field(default_factory=dict)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    metrics: EvalMetricsSpec = field(default_factory=EvalMetricsSpec)
    rewards: list[RewardSpec] = field(default_factory=list)
    reward_errors: RewardErrorPolicy = field(default_factory=RewardErrorPolicy)
    # Comparison mode: several models on the same sets, each under its own name in results.json. A list of model
    # references (each its own name) or a mapping name -> reference; each replaces `model.name_or_path`, the
    # other `model:` keys (dtype, revision, ...) apply to all of them.
    models: list[str] | dict[str, str] | None = None
    # `eval.backend: lm_eval` runs lm-eval's tasks (`lm_eval:`) instead of `sets:`; results.json has the same shape.
    eval: EvalBackendSpec = field(default_factory=EvalBackendSpec)
    lm_eval: LMEvalSpec | None = None


@dataclass
class MergeRecipe(CommonSpec):
    command: str = "merge"
    # mergekit's own configuration (merge_method, models, base_model, parameters, dtype, ...).
    merge: dict[str, Any] = field(default_factory=dict)
    # Upload the finished model folder to the Hugging Face hub (HubSpec; off while hub.repo_id is null).
    hub: HubSpec = field(default_factory=HubSpec)


@dataclass
class StageSpec:
    """One pipeline stage: a command, its recipe, and dotlist-style overrides (`{trainer.max_steps: 10}`)."""

    command: str = ""
    recipe: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    # Whether an eval stage's results go into the pipeline's summary table.
    report: bool = True
    # Filled in by the pipeline: the stage's run directory, referable as ${stages.<name>.output}.
    output: str | None = None


@dataclass
class PipelineRecipe(CommonSpec):
    command: str = "pipeline"
    stages: dict[str, StageSpec] = field(default_factory=dict)


RECIPE_SCHEMAS: dict[str, type] = {
    "sft": SFTRecipe,
    "dpo": DPORecipe,
    "grpo": GRPORecipe,
    "eval": EvalRecipe,
    "merge": MergeRecipe,
    "pipeline": PipelineRecipe,
}

