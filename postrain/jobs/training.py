"""The TRL training jobs' shared skeleton (`train_with_trl`): data, run directory, model, trainer, train, save.

`postrain sft`, `dpo` and `grpo` call it with their trainer and config classes; what they share with the other jobs
(the run directory and its records, the trainer config) is in postrain.jobs.common. It sits above common, the hub
push, the trackers and the in-training eval, which it wires together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from postrain.data.lengths import fit_source_lengths
from postrain.data.sources import load_source
from postrain.errors import RunDirError
from postrain.jobs import hub, signals, trackers
from postrain.jobs.common import (RunOptions, check_models_exist, check_run_dir, last_checkpoint, peft_config,
                                  prepare_run_dir, release_run_dir, running, trainer_config)
from postrain.jobs.guard import check_finite_weights, guard_callback, guarded, health_settings
from postrain.jobs.live import PlainView, make_view, view_callback
from postrain.jobs.rundir import partial_dir, publish
from postrain.jobs.train_eval import TrainEval
from postrain.models import loading as model_loading  # load_model through it: tests replace it there
from postrain.models.loading import MODEL_SUBDIR
from postrain.recipes import Recipe
from postrain.reports import model_card


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
    data = recipe.cfg["data"]
    train = load_source(data["train"], job, where="data.train")
    eval_ds = load_source(data["eval"], job, where="data.eval") if data.get("eval") else None
    if check_data is not None:
        check_data(train, "data.train")
        if eval_ds is not None:
            check_data(eval_ds, "data.eval")
    check_models_exist(recipe.cfg)
    plan = check_run_dir(recipe, options)  # where the run writes (its checkpoints, its in-training eval samples)
    args = trainer_config(recipe, plan.work, config_cls, **(config_overrides or {}))
    # prompts that do not fit: refused, dropped or kept

    train = fit_source_lengths(train, job, args, recipe.cfg["model"], data["train"], "data.train")
    if eval_ds is not None:
        eval_ds = fit_source_lengths(eval_ds, job, args, recipe.cfg["model"], data["eval"], "data.eval")
    # eval_during_training: sets loaded, reward columns checked
    in_training_eval = TrainEval.from_recipe(recipe, run_dir=plan.work)
    view = make_view(job, f"postrain {job} · {recipe.cfg['output_dir']}")  # live view or plain lines
    run_dir = prepare_run_dir(recipe, options)
    if run_dir != plan.work:  # another run changed the directory in between (the lock is held from now on)
        release_run_dir(run_dir)
        raise RunDirError(f"{recipe.cfg['output_dir']} changed while this run started; start it again")
    health = health_settings(recipe.cfg)
    with running(run_dir, options.started) as facts:
        model, tokenizer, _ = model_loading.load_model(recipe.cfg["model"])
        metrics = metrics_callback(run_dir, view)
        trainer_ref: dict = {}  # the view reads GRPO's latest completions from the trainer
        guard = guard_callback(job, health, trainer_ref)  # stalled-learning warnings, the stop on a signal
        callbacks = [metrics, view_callback(view, trainer_ref), guard]
        if in_training_eval is not None:
            callbacks.append(in_training_eval.callback(tokenizer, metrics.record, view))
        trainer = guarded(trainer_cls)(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=peft_config(recipe),
            callbacks=callbacks,
            **(trainer_kwargs() if trainer_kwargs else {}),
        )
        trainer.guard_setup(health, run_dir)  # NaN / inf checks, atomic checkpoints
        trainer_ref["trainer"] = trainer
        facts["distributed_type"] = trainer.accelerator.distributed_type.value  # NO, MULTI_GPU, FSDP, DEEPSPEED, ...
        trackers.attach(trainer, recipe, run_dir)  # the recipe and lineage as each tracker's run config
        # slow: transformers, needed only when this runs
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(ProgressCallback)  # the view shows progress and metrics instead
        trainer.remove_callback(PrinterCallback)
        try:
            with signals.training():
                trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None)
        finally:
            view.stop()  # give the terminal back, also when training raises
            facts["warnings"] = list(guard.warnings)
            if health["nonfinite"] == "skip":
                facts["skipped_steps"] = trainer.guard_skipped
        stopped_by = signals.stop_requested()
        if stopped_by and trainer.state.global_step < trainer.state.max_steps:  # stopped at a step's end, saved
            raise signals.Interrupted(stopped_by, trainer.state.global_step, last_checkpoint(run_dir))
        save_final_model(trainer, tokenizer, run_dir)
        model_card.finish_model(trainer, run_dir)  # model/README.md, main process only
    final = Path(recipe.cfg["output_dir"])  # a --overwrite run has replaced the previous one by now
    hub.push_after_run(recipe, final, trainer.args.should_save)  # after `done`: a failed push keeps the run done
    return {"run_dir": str(final)}


def metrics_callback(run_dir: Path, view=None):
    """A TrainerCallback appending each log to `metrics.jsonl` (one JSON object per logging step) and showing it
    on the console through `view` (postrain.jobs.live; default: one compact line per log); it replaces the
    trainer's console printer, which prints every logged key. Its `record(state, logs)` does the same for logs
    made outside the trainer's logging (evaluation during training)."""
    from transformers import TrainerCallback  # slow: transformers, needed only when this runs

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


def save_final_model(trainer, tokenizer, run_dir: Path) -> Path:
    """Save the trained model (LoRA adapters merged into the base) and tokenizer into `run_dir/model`, atomically:
    written to `model.partial`, flushed and renamed, so `model/` is whole or absent. Weights holding NaN or inf
    are not saved: the run fails (NonFiniteError) instead of shipping them.

    One process: the model as it is. Several: every process takes part in gathering the full weights (a
    collective under FSDP or ZeRO-3, a no-op copy under DDP) and the main process alone writes them."""
    out = Path(run_dir) / MODEL_SUBDIR
    accelerator = trainer.accelerator
    if accelerator.num_processes == 1 and not _sharded(accelerator):
        model = trainer.model
        if hasattr(model, "merge_and_unload"):  # a peft model: ship a plain model every tool can load
            model = model.merge_and_unload()
        check_finite_weights(model.state_dict())
        staging = partial_dir(out)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        return publish(staging, out)
    state_dict = accelerator.get_state_dict(trainer.model_wrapped, unwrap=True)  # full tensors on the main process
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(trainer.model)
        if hasattr(model, "merge_and_unload"):
            # Under DDP the model holds full weights: merge them as they are. Sharded, its parameters are shards:
            # merge the gathered adapters into a fresh copy of the base model instead.
            model = merged_from_state_dict(model, state_dict) if _sharded(accelerator) else model.merge_and_unload()
            state_dict = None
        check_finite_weights(state_dict if state_dict is not None else model.state_dict())
        staging = partial_dir(out)
        model.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        publish(staging, out)
    accelerator.wait_for_everyone()
    return out


def _sharded(accelerator) -> bool:
    """Whether the weights are split over processes (FSDP, DeepSpeed), so that gathering them is a collective."""
    from accelerate.utils import DistributedType  # slow: accelerate, needed only when this runs

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def merged_from_state_dict(peft_model, state_dict: dict):
    """A plain model: the base model the peft model was made from, loaded anew on the CPU, with the LoRA adapters
    of `state_dict` (the peft model's full, gathered state dict) merged into it."""
    # slow: peft, needed only when this runs
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM  # slow: transformers, needed only when this runs

    config = peft_model.peft_config["default"]
    dtype = next(iter(state_dict.values())).dtype
    base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, dtype=dtype)
    fresh = get_peft_model(base, config)
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(peft_model, state_dict=state_dict))
    return fresh.merge_and_unload()
