"""What every job shares: the run directory, its records, the TRL version check and the trainer config.

A run directory holds:
  recipe.yaml    the resolved recipe, its hash in the header
  env.json       package versions, git commit, seed, command line, recipe hash
  metrics.jsonl  one line per logging step
  model/         the final model (safetensors) with its tokenizer
  status.json    `running` / `done`, wall time: how a pipeline knows a stage finished
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from postrain.errors import LaunchError, PostrainError, RunDirError
from postrain.launch.launcher import current_layout, launch_started
from postrain.models.loading import MODEL_SUBDIR, check_model_reference
from postrain.recipes import Recipe

# The TRL versions postrain is tested against (pyproject.toml declares the same range).
TRL_TESTED = ((1, 16), (1, 17))  # >= 1.16, < 1.17


def check_trl_version() -> None:
    """Refuse to run on a TRL outside the tested range: trainer internals move between minor versions."""
    if os.environ.get("POSTRAIN_SKIP_VERSION_CHECK"):
        return
    import trl

    parts = tuple(int(p) for p in trl.__version__.split(".")[:2] if p.isdigit())
    lo, hi = TRL_TESTED
    if not (lo <= parts < hi):
        raise PostrainError(
            f"postrain is tested with trl >={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]} but trl {trl.__version__} is installed. "
            f"Install a tested version (pip install 'trl>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}') or set "
            f"POSTRAIN_SKIP_VERSION_CHECK=1 to run anyway."
        )


@dataclass
class RunOptions:
    """How a job treats its run directory (from the CLI flags)."""

    overwrite: bool = False
    resume: bool = False
    command_line: str = ""
    smoke: bool = False
    # When the command started: the run's wall time counts from here (or from the launch, for a launched worker).
    started: float = field(default_factory=time.time)
    # The command line's key=value overrides, and `postrain run --stage`'s stage: what a launched worker is given.
    overrides: list[str] = field(default_factory=list)
    stage: str | None = None


def check_run_dir(recipe: Recipe, options: RunOptions) -> Path | None:
    """Whether the recipe may use its run directory as the flags ask, without touching it: a RunDirError if not;
    the checkpoint to resume from under --resume. The calling process of a launch runs this before any worker
    starts, so the mistake is reported once."""
    run_dir = Path(recipe.cfg["output_dir"])
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output_dir {run_dir} exists and is not a directory; choose another with output_dir=...")
    if not (run_dir.exists() and any(run_dir.iterdir())):
        return None
    if options.resume:
        saved = read_recipe_hash(run_dir)
        if saved is not None and saved != recipe.hash:
            raise RunDirError(
                f"cannot resume {run_dir}: its recipe hash is {saved} but this recipe resolves to {recipe.hash}; "
                f"resume with the same recipe, or start over with --overwrite"
            )
        checkpoint = last_checkpoint(run_dir)
        if checkpoint is None:
            saves = (recipe.cfg.get("trainer") or {}).get("save_strategy")
            why = ("the recipe saves no checkpoints (trainer.save_strategy: no)" if saves == "no"
                   else "it holds no checkpoint yet")
            raise RunDirError(
                f"cannot resume {run_dir}: {why}, so it would restart at step 0. Start over with --overwrite; "
                f"to make runs resumable, set trainer.save_strategy: steps and trainer.save_steps"
            )
        if read_status(run_dir).get("status") == "done" and checkpoint_is_final(checkpoint):
            # Resuming from a finished run's final checkpoint would train past its end (TRL runs one more step).
            raise RunDirError(
                f"cannot resume {run_dir}: the run finished ({checkpoint.name} is its last step); nothing is left "
                f"to train with this recipe. To train longer, start a new run from its model "
                f"(model.name_or_path={run_dir}), or start over with --overwrite"
            )
        return checkpoint
    if not options.overwrite:
        raise RunDirError(
            f"run directory {run_dir} already exists and is not empty. Pass --overwrite to replace it, "
            f"--resume to continue it, or choose another with output_dir=... (or name=...)"
        )
    return None


def prepare_run_dir(recipe: Recipe, options: RunOptions) -> Path:
    """Create the run directory, refusing to overwrite a previous run unless asked.

    Under a launch every process checks (each raises the same error) before the main process writes anything,
    and the others wait until it has: the run directory has one writer."""
    layout = current_layout()
    run_dir = Path(recipe.cfg["output_dir"])
    wait_for_everyone()  # no process checks a directory another one is already writing
    checkpoint = check_run_dir(recipe, options)
    wait_for_everyone()
    if layout.is_main:
        if checkpoint is not None:
            drop_metrics_after(run_dir, int(checkpoint.name.split("-")[-1]))
        elif options.overwrite and run_dir.is_dir():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        recipe.save(run_dir)
        write_json(run_dir / "env.json", environment(recipe, options))
        write_json(run_dir / "status.json", {"status": "running", "recipe_hash": recipe.hash,
                                             "started": launch_started() or options.started,
                                             "processes": layout.world_size})
    wait_for_everyone()
    return run_dir


def wait_for_everyone() -> None:
    """A barrier over the launch's processes once torch.distributed is up (the trainer's config brings it up);
    nothing for a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def read_recipe_hash(run_dir: Path) -> str | None:
    path = Path(run_dir) / "recipe.yaml"
    if not path.exists():
        return None
    first = path.read_text().split("\n", 1)[0]
    return first.rsplit(" ", 1)[-1] if "hash" in first else None


def read_status(run_dir: Path) -> dict:
    path = Path(run_dir) / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


@contextmanager
def running(run_dir: Path, started: float | None = None):
    """Mark the run `done` when the body finishes, `failed` if it raises; the main process writes. The wall time
    counts from `started` (the command's start) or the launch's start, whichever came first. The body may add
    facts to the final status through the dict it is given (e.g. how the processes were set up)."""
    start = launch_started() or started or time.time()
    layout = current_layout()
    status = read_status(run_dir)
    facts: dict[str, Any] = {}
    try:
        yield facts
    except BaseException as e:
        if layout.is_main:
            write_json(run_dir / "status.json", {**status, **facts, "status": "failed", "error": repr(e)[:500]})
        raise
    if layout.is_main:
        write_json(run_dir / "status.json", {**status, **facts, "status": "done",
                                             "wall_time_s": round(time.time() - start, 2),
                                             "processes": layout.world_size})


def run_launched(recipe: Recipe, options: RunOptions, worker_args: list[str]) -> None:
    """Run the job on the processes its `launch:` section asks for: `worker_args` (a postrain command line) under
    `accelerate launch`. The machine and the run directory are checked first, so a mistake is reported once, before
    any worker starts; a failing worker raises LaunchError with the first failing rank's message."""
    from postrain.launch.launcher import check_runnable_here, launch_section, relaunch

    section = launch_section(recipe.cfg)
    check_runnable_here(section, recipe.origins)
    check_run_dir(recipe, options)
    code, message = relaunch(section, worker_args, recipe.origins, options.started)
    if code:
        mark_failed(recipe.cfg["output_dir"], message)
        raise LaunchError(message or "the launch failed", code)


def mark_failed(run_dir: str | Path, message: str | None) -> None:
    """A launch whose workers failed: the run directory's status says so, with the first failing rank's message
    (the main process may have been stopped before it could write anything, or have written its own symptom:
    a peer that went away)."""
    status = read_status(Path(run_dir))
    if status and status.get("status") != "done":
        write_json(Path(run_dir) / "status.json", {**status, "status": "failed", "error": (message or "")[:500]})


def write_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(recipe: Recipe, options: RunOptions) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("postrain", "torch", "transformers", "trl", "datasets", "accelerate", "peft", "mergekit", "math-verify"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {
        "command_line": options.command_line or " ".join(sys.argv),
        "command": recipe.command,
        "recipe": str(recipe.path) if recipe.path else None,
        "recipe_hash": recipe.hash,
        "seed": recipe.cfg.get("seed"),
        "processes": current_layout().world_size,
        "git_commit": _git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
    }


def trainer_config(recipe: Recipe, run_dir: Path, config_cls: type, **forced: Any):
    """Build the TRL config from the `trainer:` section, with postrain's run directory and seed."""
    import torch

    kwargs = dict(recipe.cfg.get("trainer") or {})
    if "output_dir" in kwargs:
        raise PostrainError("set the run directory with the top-level `output_dir`, not `trainer.output_dir`")
    kwargs["output_dir"] = str(run_dir / "checkpoints")
    kwargs.setdefault("seed", recipe.cfg["seed"])
    kwargs.setdefault("report_to", "none")
    # TRL defaults bf16 to True; on a machine without a bf16 GPU that would run slowly or fail, so unless the
    # recipe says otherwise, use bf16 exactly where it is supported.
    if kwargs.get("bf16") is None and not kwargs.get("fp16"):
        kwargs["bf16"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    # A launch on a machine without GPUs: transformers sets torch.distributed up over gloo (MULTI_CPU) only with
    # use_cpu; without it every process would train alone on its own shard of the data.
    if current_layout().world_size > 1 and not torch.cuda.is_available():
        kwargs.setdefault("use_cpu", True)
    # TRL's configs default the deprecated `gradient_checkpointing` (transformers 5 renamed it); carry that default
    # under the new name so that every run does not warn about a key the recipe never set.
    if "activation_checkpointing" not in kwargs and "gradient_checkpointing" not in kwargs:
        default = {f.name: f.default for f in dataclasses.fields(config_cls)}.get("gradient_checkpointing")
        if isinstance(default, bool):
            kwargs["activation_checkpointing"] = default
    kwargs.update(forced)
    try:
        return config_cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise PostrainError(f"invalid `trainer:` section for {config_cls.__name__}: {e}") from None


def metrics_callback(run_dir: Path, view=None):
    """A TrainerCallback appending each log to `metrics.jsonl` (one JSON object per logging step) and showing it
    on the console through `view` (postrain.jobs.live; default: one compact line per log); it replaces the
    trainer's console printer, which prints every logged key. Its `record(state, logs)` does the same for logs
    made outside the trainer's logging (evaluation during training)."""
    from transformers import TrainerCallback

    from postrain.jobs.live import PlainView

    path = Path(run_dir) / "metrics.jsonl"
    view = view if view is not None else PlainView()

    class MetricsJsonl(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or not state.is_world_process_zero:
                return
            self.record(state, logs)

        def record(self, state, logs: dict) -> None:
            with path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}, default=float) + "\n")
            view.metrics(state.global_step, state.max_steps, logs)

    return MetricsJsonl()


def peft_config(recipe: Recipe):
    section = recipe.cfg.get("peft")
    if not section:
        return None
    from peft import LoraConfig

    section = dict(section)
    section.setdefault("task_type", "CAUSAL_LM")
    try:
        return LoraConfig(**section)
    except (ValueError, TypeError) as e:
        raise PostrainError(f"invalid `peft:` section: {e}") from None


def save_final_model(trainer, tokenizer, run_dir: Path) -> Path:
    """Save the trained model (LoRA adapters merged into the base) and tokenizer into `run_dir/model`.

    One process: the model as it is. Several: every process takes part in gathering the full weights (a
    collective under FSDP or ZeRO-3, a no-op copy under DDP) and the main process alone writes them."""
    out = Path(run_dir) / MODEL_SUBDIR
    accelerator = trainer.accelerator
    if accelerator.num_processes == 1 and not _sharded(accelerator):
        model = trainer.model
        if hasattr(model, "merge_and_unload"):  # a peft model: ship a plain model every tool can load
            model = model.merge_and_unload()
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return out
    state_dict = accelerator.get_state_dict(trainer.model_wrapped, unwrap=True)  # full tensors on the main process
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(trainer.model)
        if hasattr(model, "merge_and_unload"):
            # Under DDP the model holds full weights: merge them as they are. Sharded, its parameters are shards:
            # merge the gathered adapters into a fresh copy of the base model instead.
            model = merged_from_state_dict(model, state_dict) if _sharded(accelerator) else model.merge_and_unload()
            state_dict = None
        model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out)
    accelerator.wait_for_everyone()
    return out


def _sharded(accelerator) -> bool:
    """Whether the weights are split over processes (FSDP, DeepSpeed), so that gathering them is a collective."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def merged_from_state_dict(peft_model, state_dict: dict):
    """A plain model: the base model the peft model was made from, loaded anew on the CPU, with the LoRA adapters
    of `state_dict` (the peft model's full, gathered state dict) merged into it."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    config = peft_model.peft_config["default"]
    dtype = next(iter(state_dict.values())).dtype
    base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, dtype=dtype)
    fresh = get_peft_model(base, config)
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(peft_model, state_dict=state_dict))
    return fresh.merge_and_unload()


def last_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return ckpts[-1] if ckpts else None


def checkpoint_is_final(checkpoint: Path) -> bool:
    """Whether a checkpoint was saved at the run's last step (transformers' trainer_state.json)."""
    path = Path(checkpoint) / "trainer_state.json"
    if not path.exists():
        return False
    state = json.loads(path.read_text())
    return bool(state.get("max_steps")) and state.get("global_step", 0) >= state["max_steps"]


def drop_metrics_after(run_dir: Path, step: int) -> None:
    """Keep the metrics logged up to the checkpoint a run resumes from: the steps after it are logged again."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def resume_checkpoint(run_dir: Path, options: RunOptions) -> str | None:
    checkpoint = last_checkpoint(run_dir) if options.resume else None
    return str(checkpoint) if checkpoint else None


def quiet_libraries() -> None:
    """Keep the console for postrain's own output: no per-weight loading bars, no advisory warnings."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Advisories a user cannot act on from a recipe (CPU pinning, libraries' own deprecations of each other).
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|accelerate|peft)\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mergekit\..*")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def train_with_trl(
    recipe: Recipe,
    options: RunOptions,
    *,
    job: str,
    trainer_cls: type,
    config_cls: type,
    config_overrides: dict[str, Any] | None = None,
    trainer_kwargs: Callable[[], dict[str, Any]] | None = None,
    check_data: Callable[[Any, str], None] | None = None,
) -> dict:
    """The skeleton every TRL training job shares: data, run directory, model, trainer, train, save.

    `trainer_kwargs` is called once the run directory exists, for what a job adds (a reference model, rewards).
    Data is loaded (and `check_data(dataset, where)` run on it), the model reference resolved and the TRL config
    built (its own checks: batch arithmetic, loss weights, ...) before the run directory is made, so none of these
    mistakes leaves anything behind.
    """
    from postrain.data.sources import load_source
    from postrain.jobs import hub, trackers
    from postrain.jobs.live import make_view, view_callback
    from postrain.jobs.train_eval import TrainEval
    from postrain.models.loading import load_model
    from postrain.reports import model_card

    data = recipe.cfg["data"]
    train = load_source(data["train"], job, where="data.train")
    eval_ds = load_source(data["eval"], job, where="data.eval") if data.get("eval") else None
    if check_data is not None:
        check_data(train, "data.train")
        if eval_ds is not None:
            check_data(eval_ds, "data.eval")
    check_model_reference(recipe.cfg["model"], "model")
    check_model_reference(recipe.cfg.get("ref_model"), "ref_model")
    args = trainer_config(recipe, Path(recipe.cfg["output_dir"]), config_cls, **(config_overrides or {}))
    from postrain.data.lengths import fit_source_lengths  # prompts that do not fit: refused, dropped or kept

    train = fit_source_lengths(train, job, args, recipe.cfg["model"], data["train"], "data.train")
    if eval_ds is not None:
        eval_ds = fit_source_lengths(eval_ds, job, args, recipe.cfg["model"], data["eval"], "data.eval")
    in_training_eval = TrainEval.from_recipe(recipe)  # eval_during_training: sets loaded, reward columns checked
    view = make_view(job, f"postrain {job} · {recipe.cfg['output_dir']}")  # live view or plain lines
    run_dir = prepare_run_dir(recipe, options)
    with running(run_dir, options.started) as facts:
        model, tokenizer, _ = load_model(recipe.cfg["model"])
        metrics = metrics_callback(run_dir, view)
        trainer_ref: dict = {}  # the view reads GRPO's latest completions from the trainer
        callbacks = [metrics, view_callback(view, trainer_ref)]
        if in_training_eval is not None:
            callbacks.append(in_training_eval.callback(tokenizer, metrics.record, view))
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=peft_config(recipe),
            callbacks=callbacks,
            **(trainer_kwargs() if trainer_kwargs else {}),
        )
        trainer_ref["trainer"] = trainer
        facts["distributed_type"] = trainer.accelerator.distributed_type.value  # NO, MULTI_GPU, FSDP, DEEPSPEED, ...
        trackers.attach(trainer, recipe, run_dir)  # the recipe and lineage as each tracker's run config
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(ProgressCallback)  # the view shows progress and metrics instead
        trainer.remove_callback(PrinterCallback)
        try:
            trainer.train(resume_from_checkpoint=resume_checkpoint(run_dir, options))
        finally:
            view.stop()  # give the terminal back, also when training raises
        save_final_model(trainer, tokenizer, run_dir)
        model_card.finish_model(trainer, run_dir)  # model/README.md, main process only
    hub.push_after_run(recipe, run_dir, trainer.args.should_save)  # after `done`: a failed push keeps the run done
    return {"run_dir": str(run_dir)}
