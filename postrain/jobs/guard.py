"""What keeps a training run honest, on top of any TRL trainer (`guarded(trainer_cls)`, `guard_callback`).

- **Non-finite steps.** After each optimizer step's gradients are in (every micro-batch's loss known, the gradient
  norm computed) and before the optimizer applies them, the step is checked: a NaN or inf loss or gradient norm
  on any process. `health.nonfinite: stop` (the default) ends the run there with `NonFiniteError`, before the
  update, so the weights in memory and every checkpoint stay as they were: the message names the step, the values
  and the last complete checkpoint, and the step's batch is written to `<run_dir>/nonfinite_step_<k>.jsonl`.
  `skip` drops the step's gradients (set to None, so the optimizer leaves each weight and its state as they
  were), counts it (`health/skipped_steps` in metrics.jsonl, `skipped_steps` in status.json) and goes on; more
  than `health.max_skipped_steps` skipped steps stop the run. transformers' own `logging_nan_inf_filter` would
  otherwise replace a NaN loss by the running mean in the log and apply the NaN update.
- **Stalled learning.** Warnings (stderr, and `warnings` in status.json) when, for `health.stall_steps` steps in
  a row, the loss is exactly constant (sft, dpo: GRPO's on-policy loss is near 0 by construction, so its value
  says little), the gradient norm is exactly 0 (any job: the updates change nothing, e.g. GRPO advantages that
  are all 0), or every group of every GRPO batch has zero reward variance (`frac_reward_zero_std` = 1: no
  learning signal).
- **Atomic checkpoints.** Each checkpoint is written by transformers into `checkpoints/.checkpoint-N.partial/`,
  flushed to disk once every process has written its part, and renamed to `checkpoints/checkpoint-N`; older ones
  are then rotated (`save_total_limit`). A checkpoint folder therefore exists only whole.
- **Signals.** At each step's end the processes agree whether one of them received SIGTERM / SIGINT
  (postrain.jobs.signals); if so that step is logged and saved, and training stops.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from postrain.errors import PostrainError, RecipeError
from postrain.jobs import signals
from postrain.jobs.rundir import CHECKPOINT_PREFIX, PARTIAL_SUFFIX, complete_checkpoints, note, publish, write_atomic
from postrain.launch.launcher import launch_section, sharding_strategy
from postrain.recipes.validate import origin_of

HEALTH_DEFAULTS = {"nonfinite": "stop", "max_skipped_steps": 10, "stall_steps": 20}
SKIP_UNDER_DEEPSPEED = ("DeepSpeed's engine applies the update inside backward, before a step can be checked; use "
                        "health.nonfinite: stop, or an fsdp2 / ddp launch configuration")


class NonFiniteError(PostrainError):
    """Training met a NaN or inf loss or gradient norm, or the weights to save hold one, and stopped (exit code 1:
    the recipe was valid, the run failed). `step`: the step it happened at, when it was one."""

    exit_code = 1

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


def health_settings(cfg: dict) -> dict[str, Any]:
    return {**HEALTH_DEFAULTS, **(cfg.get("health") or {})}


def check_health_section(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """Load-time checks of `health:` (the schema checks the types and `nonfinite`'s values)."""
    if cfg.get("health") is None:
        return
    section = health_settings(cfg)
    for key in ("max_skipped_steps", "stall_steps"):
        if section[key] < 0:
            raise RecipeError(f"health.{key} (from {origin_of(origins, f'health.{key}')}) must be 0 or more, "
                              f"got {section[key]}")
    if section["nonfinite"] == "skip":
        strategy = sharding_strategy(launch_section(cfg), origins)
        if strategy.startswith("zero"):
            raise RecipeError(f"health.nonfinite (from {origin_of(origins, 'health.nonfinite')}) is skip, which "
                              f"launch.config {strategy} cannot do: {SKIP_UNDER_DEEPSPEED}")


def guarded(trainer_cls: type) -> type:
    """`trainer_cls` with the checks of this module (the mixin first in the method order, so it wraps TRL's and
    postrain's own overrides)."""
    return type(trainer_cls.__name__, (TrainingGuard, trainer_cls), {"__module__": trainer_cls.__module__,
                                                                     "__qualname__": trainer_cls.__qualname__})


class TrainingGuard:
    """Mixin over a transformers Trainer; `guard_setup(settings, run_dir)` before training."""

    _guard_settings: dict = HEALTH_DEFAULTS
    _guard_run_dir: Path | None = None
    _guard_staging: Path | None = None

    def guard_setup(self, settings: dict[str, Any], run_dir: Path) -> None:
        from accelerate.utils import DistributedType  # slow: accelerate, needed only when this runs

        self._guard_settings, self._guard_run_dir = settings, Path(run_dir)
        self._guard_losses: list = []
        self._guard_batches: list = []
        self.guard_skipped = 0
        self._guard_update_applied = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if settings["nonfinite"] == "skip" and self._guard_update_applied:  # an accelerate config of one's own
            raise RecipeError(f"health.nonfinite: skip under DeepSpeed: {SKIP_UNDER_DEEPSPEED}")

    # --- the step's loss and gradient norm ----------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._guard_run_dir is not None:
            self._guard_losses.append(loss.detach())
            self._guard_batches.append(inputs)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """transformers calls this once per optimizer step, after clipping and before `optimizer.step()`."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self._guard_run_dir is not None:
            self._guard_check_step(model, grad_norm)
        return grad_norm

    def _guard_check_step(self, model, grad_norm) -> None:
        import torch  # slow: torch, needed only when this runs

        losses, batches = self._guard_losses, self._guard_batches
        self._guard_losses, self._guard_batches = [], []
        loss_bad = bool(losses) and not bool(torch.isfinite(torch.stack([x.float().reshape(()) for x in losses])
                                                            .to("cpu")).all())
        norm = None if grad_norm is None else float(grad_norm)
        norm_bad = norm is not None and not math.isfinite(norm)
        bad = self._guard_any_process(loss_bad or norm_bad)
        if not bad:
            return
        step = self.state.global_step + 1  # the step being taken; metrics.jsonl logs it as this step
        what = []
        if loss_bad:
            values = sorted({str(float(x.float().reshape(()))) for x in losses if not torch.isfinite(x).all()})
            what.append(f"the loss is {' / '.join(values)}")
        if norm_bad:
            what.append(f"the gradient norm is {norm}")
        what = " and ".join(what) or "another process met a NaN or inf loss or gradient norm"
        settings = self._guard_settings
        if settings["nonfinite"] == "skip" and self.guard_skipped < settings["max_skipped_steps"]:
            self.guard_skipped += 1
            model.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
            self.optimizer.zero_grad(set_to_none=True)
            if self.args.should_save:
                note(f"step {step}: {what}; the step's update is dropped (health.nonfinite: skip; "
                     f"{self.guard_skipped} skipped so far, at most {settings['max_skipped_steps']})")
            return
        batch_file = self._guard_write_batch(step, batches)
        complete, _ = complete_checkpoints(self._guard_run_dir)
        kept = (f"the last checkpoint, {complete[-1]}, is intact: `--resume health.nonfinite=skip` continues from it "
                f"and drops such steps" if complete else "no checkpoint was saved before it")
        if settings["nonfinite"] == "skip":
            why = (f"{self.guard_skipped} steps were skipped already (health.max_skipped_steps: "
                   f"{settings['max_skipped_steps']})")
        else:
            why = "health.nonfinite: stop"
        stopped = ("DeepSpeed had applied this step's update already (nothing of it is saved)"
                   if self._guard_update_applied else "The run stopped before applying this step's update")
        raise NonFiniteError(
            f"step {step}: {what} ({why}). {stopped}; {kept}. "
            f"The step's batch is in {batch_file}. Lower trainer.learning_rate or set trainer.max_grad_norm", step)

    def _guard_any_process(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        import torch  # slow: torch, needed only when this runs

        total = self.accelerator.reduce(torch.tensor([float(flag)], device=self.accelerator.device), "sum")
        return bool(total.item() > 0)

    def _guard_write_batch(self, step: int, batches: list) -> Path:
        """The step's micro-batches, as text, gathered from every process; the main process writes them."""
        rows = []
        for micro, inputs in enumerate(batches):
            for row in batch_rows(inputs, self.processing_class):
                rows.append({"process": self.accelerator.process_index, "micro_batch": micro, **row})
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object  # slow: accelerate, needed only when this runs

            rows = gather_object(rows)
        path = self._guard_run_dir / f"nonfinite_step_{step}.jsonl"
        if self.args.should_save:
            write_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))
        return path

    # --- metrics ------------------------------------------------------------------------------------------------

    def log(self, logs, *args, **kwargs):
        if self._guard_settings["nonfinite"] == "skip" and "loss" in logs:
            logs["health/skipped_steps"] = getattr(self, "guard_skipped", 0)
        return super().log(logs, *args, **kwargs)

    # --- atomic checkpoints -------------------------------------------------------------------------------------

    def _get_output_dir(self, trial):
        return str(self._guard_staging) if self._guard_staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """transformers' save, into a staging folder renamed into place once every process has written its part;
        the rotation of old checkpoints comes after, so that the newest complete one is never the one removed."""
        from transformers.trainer_utils import rotate_checkpoints  # slow: transformers, needed only when this runs

        root = Path(super()._get_output_dir(trial))
        name = f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        staging = root / f".{name}{PARTIAL_SUFFIX}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self._guard_staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._guard_staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = root / name
            best = self.state.best_model_checkpoint
            if best and Path(best).parent == staging:  # transformers named it inside the staging folder
                self.state.best_model_checkpoint = str(root / Path(best).name)
                self.state.save_to_json(str(staging / name / "trainer_state.json"))
            publish(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=str(root), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()


def check_finite_weights(state_dict: dict) -> None:
    """NonFiniteError naming the tensors that hold NaN or inf: such a model is not saved as a run's result."""
    import torch  # slow: torch, needed only when this runs

    bad = [name for name, tensor in state_dict.items()
           if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise NonFiniteError(f"the trained weights hold NaN or inf ({len(bad)} of {len(state_dict)} tensors: "
                             f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); the model is not saved. "
                             f"Lower trainer.learning_rate or set trainer.max_grad_norm")


def batch_rows(inputs: Any, tokenizer) -> list[dict]:
    """A training micro-batch as text: rows of a dataset (GRPO's prompts), or collated token ids decoded (the
    prompt, where a completion mask or labels say which tokens are the prompt, and the whole sequence)."""
    if isinstance(inputs, list):
        return [{"prompt": row.get("prompt")} if isinstance(row, dict) else {"row": row} for row in inputs]
    if not isinstance(inputs, dict) or "input_ids" not in inputs or tokenizer is None:
        return [{"keys": sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__}]
    ids = inputs["input_ids"].detach().to("cpu")
    attention = inputs.get("attention_mask")
    prompt_mask = None
    if inputs.get("completion_mask") is not None:
        prompt_mask = inputs["completion_mask"].detach().to("cpu") == 0
    elif inputs.get("labels") is not None:
        prompt_mask = inputs["labels"].detach().to("cpu") == -100
    rows = []
    for i in range(ids.shape[0]):
        keep = attention[i].detach().to("cpu").bool() if attention is not None else ids[i] == ids[i]
        row = {"text": tokenizer.decode(ids[i][keep].tolist())}
        if prompt_mask is not None:
            row["prompt"] = tokenizer.decode(ids[i][keep & prompt_mask[i]].tolist())
        rows.append(row)
    return rows


def guard_callback(job: str, settings: dict[str, Any], trainer_ref: dict):
    """A TrainerCallback: the stalled-learning warnings (main process) and the stop on a signal (every process,
    agreed at each step's end). `warnings` holds what was warned, for status.json."""
    from transformers import TrainerCallback  # slow: transformers, needed only when this runs

    watch = StallWatch(job, settings["stall_steps"])

    class Guard(TrainerCallback):
        warnings = watch.warnings

        def on_step_end(self, args, state, control, **kwargs):
            trainer = trainer_ref.get("trainer")
            requested = signals.stop_requested()
            if trainer is not None and trainer.accelerator.num_processes > 1:
                import torch  # slow: torch, needed only when this runs

                flag = torch.tensor([float(requested or 0)], device=trainer.accelerator.device)
                agreed = int(trainer.accelerator.reduce(flag, "max").item())
                if agreed and requested is None:
                    signals.request_stop(agreed)
                requested = agreed or None
            if requested:
                control.should_log = control.should_save = control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or not state.is_world_process_zero:
                return
            for message in watch.observe(state.global_step, logs):
                note(message, kind="warning")

    return Guard()


class StallWatch:
    """Streaks of logged values that mean nothing is being learned. Each logged value stands for the steps since
    the previous log, so a streak covers the steps from the log before its first one to its last one."""

    def __init__(self, job: str, stall_steps: int):
        self.job, self.stall_steps = job, stall_steps
        self.previous_step = 0
        self.streaks: dict[str, dict] = {}
        self.warnings: list[str] = []

    def conditions(self, logs: dict) -> dict[str, Any]:
        """The stall conditions this log meets: name -> the value that must repeat."""
        out = {}
        loss, norm = logs.get("loss"), logs.get("grad_norm")
        if self.job != "grpo" and isinstance(loss, (int, float)) and math.isfinite(loss):
            out["loss"] = loss
        if isinstance(norm, (int, float)) and norm == 0:
            out["grad_norm"] = 0.0
        if self.job == "grpo" and logs.get("frac_reward_zero_std") == 1:
            out["zero_std"] = 1.0
        return out

    def observe(self, step: int, logs: dict) -> list[str]:
        if self.stall_steps <= 0 or ("loss" not in logs and "grad_norm" not in logs
                                     and "frac_reward_zero_std" not in logs):
            return []  # an evaluation's log, not a training step's
        met = self.conditions(logs)
        out = []
        for name in list(self.streaks):
            if name not in met or met[name] != self.streaks[name]["value"]:
                del self.streaks[name]
        for name, value in met.items():
            streak = self.streaks.setdefault(name, {"value": value, "since": self.previous_step, "warned": False,
                                                    "logs": 0})
            streak["logs"] += 1
            covered = step - streak["since"]
            # A loss or gradient norm is constant when it repeats: one log is one value. frac_reward_zero_std is the
            # mean over the steps a log stands for, so 1 means every one of them had no signal.
            repeated = streak["logs"] >= (1 if name == "zero_std" else 2)
            if covered >= self.stall_steps and repeated and not streak["warned"]:
                streak["warned"] = True
                out.append(self.message(name, value, streak["since"] + 1, step))
        self.previous_step = step
        self.warnings.extend(out)
        return out

    @staticmethod
    def message(name: str, value: Any, first: int, last: int) -> str:
        steps = f"steps {first}-{last}"
        if name == "loss":
            return (f"the loss was exactly {value} at every log of {steps}: nothing is being learned (check "
                    f"trainer.learning_rate, frozen parameters, and that the training data varies)")
        if name == "grad_norm":
            return (f"the gradient norm was exactly 0 for {steps}: the updates change nothing (in GRPO: every "
                    f"advantage is 0, e.g. rewards that never differ within a group, or a reward that is NaN or inf)")
        return (f"every group of every GRPO batch had the same reward for all its completions for {steps} "
                f"(frac_reward_zero_std = 1): no learning signal. Make the reward graded or the task easier, or raise "
                f"trainer.temperature or trainer.num_generations")
