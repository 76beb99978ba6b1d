"""What every job shares: the run directory, its records, the TRL version check and the trainer config.

A run directory holds:
  recipe.yaml    the resolved recipe, its hash in the header
  env.json       package versions, git commit, seed, command line, recipe hash
  metrics.jsonl  one line per logging step
  model/         the final model (safetensors) with its tokenizer
  checkpoints/   checkpoint-N folders (TRL's), when the recipe saves them or a signal stopped the run
  status.json    `running`, `done`, `failed` (with the error) or `interrupted` (with the signal, the step and the
                 checkpoint to resume from): how a pipeline knows a stage finished

How it is kept whole (atomic writes, `--overwrite` into `<name>.new`, the lock, complete checkpoints):
postrain.jobs.rundir; the training checks (NaN / inf, stalls, atomic checkpoints): postrain.jobs.guard; signals:
postrain.jobs.signals.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from postrain.errors import LaunchError, PostrainError, RunDirError
from postrain.files import attempt_dir, write_atomic
from postrain.jobs import signals
from postrain.jobs.rundir import LOCK_HELD_ENV, RunLock, complete_checkpoints, note, replace_with_attempt
from postrain.models.loading import check_model_reference
from postrain.launch.launcher import check_runnable_here, current_layout, launch_section, launch_started, relaunch
from postrain.recipes import Recipe

# The TRL versions postrain is tested against (pyproject.toml declares the same range).
TRL_TESTED = ((1, 16), (1, 17))  # >= 1.16, < 1.17


def check_trl_version() -> None:
    """Refuse to run on a TRL outside the tested range: trainer internals move between minor versions."""
    if os.environ.get("POSTRAIN_SKIP_VERSION_CHECK"):
        return
    import trl  # slow: trl, needed only when this runs

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


@dataclass
class RunPlan:
    """Where a run writes, decided from the run directory as it is and the flags (`check_run_dir`)."""

    final: Path                          # output_dir: where the run is once it has finished
    work: Path                           # where it is written: `final`, or `<final>.new` under --overwrite
    checkpoint: Path | None = None       # --resume: the last complete checkpoint, continued from
    torn: list[tuple[Path, str]] = field(default_factory=list)  # incomplete checkpoints, removed when it starts

    @property
    def replacing(self) -> bool:
        """The run replaces a previous one, which is kept until this one has finished."""
        return self.work != self.final


def check_run_dir(recipe: Recipe, options: RunOptions) -> RunPlan:
    """Whether the recipe may use its run directory as the flags ask, without touching it: a RunDirError if not;
    otherwise where the run writes and, under --resume, the checkpoint it continues from. The calling process of a
    launch runs this before any worker starts, so the mistake is reported once; every worker then reaches the same
    plan from the same directory."""
    final = Path(recipe.cfg["output_dir"])
    if final.exists() and not final.is_dir():
        raise RunDirError(f"output_dir {final} exists and is not a directory; choose another with output_dir=...")
    attempt = resumable_attempt(final, recipe.hash) if options.resume else None
    if attempt is not None:  # an --overwrite run that stopped: it is the newer run, and continues where it stopped
        complete, torn = complete_checkpoints(attempt)
        return RunPlan(final, attempt, complete[-1], torn)
    if not (final.exists() and any(final.iterdir())):
        return RunPlan(final, final)
    if options.resume:
        saved = read_recipe_hash(final)
        if saved is not None and saved != recipe.hash:
            raise RunDirError(
                f"cannot resume {final}: its recipe hash is {saved} but this recipe resolves to {recipe.hash}; "
                f"resume with the same recipe, or start over with --overwrite"
            )
        complete, torn = complete_checkpoints(final)
        if not complete:
            saves = (recipe.cfg.get("trainer") or {}).get("save_strategy")
            why = ("the recipe saves no checkpoints (trainer.save_strategy: no)" if saves == "no" and not torn
                   else "it holds no complete checkpoint" + (f" ({torn[-1][0].name} is incomplete: {torn[-1][1]})"
                                                             if torn else " yet"))
            raise RunDirError(
                f"cannot resume {final}: {why}, so it would restart at step 0. Start over with --overwrite; "
                f"to make runs resumable, set trainer.save_strategy: steps and trainer.save_steps"
            )
        if read_status(final).get("status") == "done" and checkpoint_is_final(complete[-1]):
            # Resuming from a finished run's final checkpoint would train past its end (TRL runs one more step).
            raise RunDirError(
                f"cannot resume {final}: the run finished ({complete[-1].name} is its last step); nothing is left "
                f"to train with this recipe. To train longer, start a new run from its model "
                f"(model.name_or_path={final}), or start over with --overwrite"
            )
        return RunPlan(final, final, complete[-1], torn)
    if not options.overwrite:
        raise RunDirError(
            f"run directory {final} already exists and is not empty. Pass --overwrite to replace it, "
            f"--resume to continue it, or choose another with output_dir=... (or name=...)"
        )
    return RunPlan(final, attempt_dir(final))


def resumable_attempt(final: Path, recipe_hash: str) -> Path | None:
    """An --overwrite run of this recipe that stopped before it finished, with a checkpoint to continue from."""
    attempt = attempt_dir(final)
    if attempt.is_dir() and read_recipe_hash(attempt) == recipe_hash and read_status(attempt).get("status") != "done" \
            and last_checkpoint(attempt) is not None:
        return attempt
    return None


# The run directories this process prepared and has not finished: work dir -> (final dir, its lock).
_ACTIVE: dict[Path, tuple[Path, RunLock | None]] = {}


def prepare_run_dir(recipe: Recipe, options: RunOptions) -> Path:
    """Lock the run directory, check it (`check_run_dir`) and start the run there; returns where the run writes
    (`<output_dir>.new` under --overwrite of an existing run, see postrain.jobs.rundir). `running` finishes it.

    Under a launch every process checks (each raises the same error) before the main process writes anything,
    and the others wait until it has: the run directory has one writer. The main process holds the lock (or the
    launch's calling process does, for the whole launch)."""
    layout = current_layout()
    final = Path(recipe.cfg["output_dir"])
    wait_for_everyone()  # no process checks a directory another one is already writing
    lock = RunLock.acquire(final) if layout.is_main else None
    try:
        plan = check_run_dir(recipe, options)
        wait_for_everyone()
        if layout.is_main:
            start_run_dir(recipe, options, plan, layout.world_size)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    _ACTIVE[plan.work.resolve()] = (final, lock)
    wait_for_everyone()
    return plan.work


def release_run_dir(work: Path) -> None:
    """Give up a prepared run directory without running it: its lock is released."""
    _, lock = _ACTIVE.pop(Path(work).resolve(), (None, None))
    if lock is not None:
        lock.release()


def start_run_dir(recipe: Recipe, options: RunOptions, plan: RunPlan, processes: int) -> None:
    """The main process' first writes: torn checkpoints out, metrics cut back to the checkpoint, the records."""
    work = plan.work
    for path, why in plan.torn:
        note(f"{path} is incomplete ({why}): removed" + (f"; resuming from {plan.checkpoint.name}"
                                                          if plan.checkpoint else ""))
        shutil.rmtree(path, ignore_errors=True)
    if plan.checkpoint is not None:
        if plan.replacing:
            note(f"--resume continues the --overwrite run in {work}, stopped at {plan.checkpoint.name}; {plan.final} "
                 f"keeps the previous run until it has finished")
        drop_metrics_after(work, int(plan.checkpoint.name.split("-")[-1]))
    elif plan.replacing:
        if work.exists():  # an earlier --overwrite run that did not finish
            shutil.rmtree(work)
        note(f"--overwrite: the new run is written to {work}; {plan.final} keeps the previous run until it has "
             f"finished, and is replaced then")
    work.mkdir(parents=True, exist_ok=True)
    recipe.save(work)
    write_json(work / "env.json", environment(recipe, options))
    write_json(work / "status.json", {"status": "running", "recipe_hash": recipe.hash,
                                      "started": launch_started() or options.started, "processes": processes,
                                      "output_dir": str(plan.final)})


def wait_for_everyone() -> None:
    """A barrier over the launch's processes once torch.distributed is up (the trainer's config brings it up);
    nothing for a single process."""
    import torch.distributed as dist  # slow: torch, needed only when this runs

    if dist.is_available() and dist.is_initialized():
        from accelerate import PartialState  # slow: accelerate, needed only when this runs

        PartialState().wait_for_everyone()


def read_recipe_hash(run_dir: Path) -> str | None:
    path = Path(run_dir) / "recipe.yaml"
    if not path.exists():
        return None
    first = path.read_text().split("\n", 1)[0]
    return first.rsplit(" ", 1)[-1] if "hash" in first else None


def read_status(run_dir: Path) -> dict:
    path = Path(run_dir) / "status.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:  # written by an older version, torn: the run's state is unknown
        return {}


@contextmanager
def running(run_dir: Path, started: float | None = None):
    """The body writes the run directory `run_dir` (from `prepare_run_dir`); when it ends, the main process
    records how: `done`; `failed` with the error; `interrupted` with the signal, the step and the checkpoint to
    resume from (SIGTERM / SIGINT are handled while the body runs, postrain.jobs.signals). A finished --overwrite
    run then replaces the previous run; one that did not finish stays at `<name>.new`, and the previous run is
    left as it was. The wall time counts from `started` (the command's start) or the launch's start, whichever
    came first. The body may add facts to the final status through the dict it is given."""
    start = launch_started() or started or time.time()
    layout = current_layout()
    run_dir = Path(run_dir)
    final, lock = _ACTIVE.pop(run_dir.resolve(), (run_dir, None))
    status = read_status(run_dir)
    facts: dict[str, Any] = {}
    try:
        try:
            with signals.handled():
                yield facts
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):  # Ctrl-C where Python's own handler was still in place
                raise_as: BaseException = signals.Interrupted(signal.SIGINT)
            else:
                raise_as = e
            if layout.is_main:
                record_end(run_dir, final, raise_as, {**status, **facts})
            if raise_as is e:
                raise
            raise raise_as from None
        if layout.is_main:
            write_json(run_dir / "status.json", {**status, **facts, "status": "done",
                                                 "wall_time_s": round(time.time() - start, 2),
                                                 "processes": layout.world_size})
            if run_dir != final:
                replace_with_attempt(run_dir, final)
    finally:
        if lock is not None:
            lock.release()


def record_end(run_dir: Path, final: Path, error: BaseException, status: dict) -> None:
    """status.json of a run that did not finish: `interrupted` (a signal) or `failed` (any other error)."""
    if isinstance(error, signals.Interrupted):
        error.detail = interrupted_status(run_dir, final, error, status)
        return
    step = {"step": error.step} if getattr(error, "step", None) is not None else {}
    message = str(error) if isinstance(error, PostrainError) else repr(error)
    write_json(run_dir / "status.json", {**status, "status": "failed", **step, "error": message[:2000]})
    if run_dir != final:
        note(f"{final} keeps the previous run as it was; this failed run is in {run_dir} (status.json and "
             f"metrics.jsonl there say what happened): --overwrite replaces it, --resume continues it from its "
             f"last checkpoint")


def interrupted_status(run_dir: Path, final: Path, error: "signals.Interrupted", status: dict) -> str:
    """Record a run stopped by a signal in status.json; what the user is told about resuming it."""
    complete, _ = complete_checkpoints(run_dir)
    checkpoint = Path(error.checkpoint) if error.checkpoint else (complete[-1] if complete else None)
    step = error.step if error.step is not None else (int(checkpoint.name.split("-")[-1]) if checkpoint else None)
    error.step, error.checkpoint = step, checkpoint.name if checkpoint else None
    write_json(run_dir / "status.json", {**status, "status": "interrupted", "signal": error.signal_name,
                                         "step": step, "checkpoint": checkpoint.name if checkpoint else None})
    return resume_advice(run_dir, final, checkpoint.name if checkpoint else None)


def resume_advice(run_dir: Path, final: Path, checkpoint: str | None) -> str:
    where = f"{run_dir} (the --overwrite run; {final} keeps the previous run)" if run_dir != final else str(run_dir)
    if checkpoint is not None:
        return f"{where} is marked interrupted; continue it from {checkpoint} with --resume"
    return f"{where} is marked interrupted, with no checkpoint to continue from: start over with --overwrite"


def run_launched(recipe: Recipe, options: RunOptions, worker_args: list[str]) -> None:
    """Run the job on the processes its `launch:` section asks for: `worker_args` (a postrain command line) under
    `accelerate launch`. The machine and the run directory are checked first, so a mistake is reported once, before
    any worker starts; this process holds the run directory's lock for the whole launch. A failing worker raises
    LaunchError with the first failing rank's message; a launch stopped by a signal raises Interrupted."""
    section = launch_section(recipe.cfg)
    check_runnable_here(section, recipe.origins)
    lock = RunLock.acquire(Path(recipe.cfg["output_dir"]))
    try:
        plan = check_run_dir(recipe, options)
        held = {LOCK_HELD_ENV: str(lock.path.resolve())} if lock is not None else {}
        code, message = relaunch(section, worker_args, recipe.origins, options.started, env=held)
    finally:
        if lock is not None:
            lock.release()
    if code:
        where = plan.work if plan.work.is_dir() else plan.final
        status = read_status(where)
        if status.get("status") == "interrupted":
            signum = getattr(signal, status.get("signal") or "", signal.SIGTERM)
            stopped = signals.Interrupted(int(signum), status.get("step"), status.get("checkpoint"))
            stopped.detail = resume_advice(where, plan.final, status.get("checkpoint"))
            raise stopped
        mark_failed(where, message)
        raise LaunchError(message or "the launch failed", code)


def mark_failed(run_dir: str | Path, message: str | None) -> None:
    """A launch whose workers failed: the run directory's status says so, with the first failing rank's message
    (the main process may have been stopped before it could write anything, or have written its own symptom:
    a peer that went away)."""
    status = read_status(Path(run_dir))
    if status and status.get("status") not in ("done", "interrupted"):
        write_json(Path(run_dir) / "status.json", {**status, "status": "failed", "error": (message or "")[:500]})


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (postrain.jobs.rundir.write_atomic): a reader never sees half a status.json."""
    write_atomic(Path(path), json.dumps(data, indent=2, default=str) + "\n")


def git_commit(start: Path | None = None) -> str | None:
    """The commit checked out in the git work tree holding `start` (the working directory), as `git rev-parse HEAD`
    prints it, read from the .git files: a `git` subprocess forked from a process holding the model costs about
    0.2 s of every run's start. None outside a work tree or where HEAD cannot be read."""
    folder = (start or Path.cwd()).resolve()
    for parent in (folder, *folder.parents):
        dot_git = parent / ".git"
        if dot_git.is_file():  # a worktree or submodule: "gitdir: <path>"
            text = dot_git.read_text().strip()
            if not text.startswith("gitdir:"):
                return None
            dot_git = (parent / text.split(":", 1)[1].strip()).resolve()
        if dot_git.is_dir():
            return _head_commit(dot_git)
    return None


def _head_commit(git_dir: Path) -> str | None:
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None  # a detached HEAD holds the commit itself
        ref = head.split(":", 1)[1].strip()
        # A linked worktree keeps its HEAD, but branches live in the main repository (its "commondir").
        common = (git_dir / (git_dir / "commondir").read_text().strip()).resolve() \
            if (git_dir / "commondir").is_file() else git_dir
        for base in (git_dir, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip() or None
        for line in (common / "packed-refs").read_text().splitlines() if (common / "packed-refs").is_file() else ():
            commit, _, name = line.partition(" ")
            if name == ref:
                return commit
    except OSError:
        pass
    return None


def check_models_exist(cfg: dict) -> None:
    """`model` and `ref_model` name models that exist (a run directory, a packaged model, a local folder or a hub
    id)."""
    check_model_reference(cfg["model"], "model")
    check_model_reference(cfg.get("ref_model"), "ref_model")


def environment(recipe: Recipe, options: RunOptions) -> dict:
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
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
    }


def trainer_config(recipe: Recipe, run_dir: Path, config_cls: type, **forced: Any):
    """Build the TRL config from the `trainer:` section, with postrain's run directory and seed."""
    import torch  # slow: torch, needed only when this runs

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


def peft_config(recipe: Recipe):
    section = recipe.cfg.get("peft")
    if not section:
        return None
    from peft import LoraConfig  # slow: peft, needed only when this runs

    section = dict(section)
    section.setdefault("task_type", "CAUSAL_LM")
    try:
        return LoraConfig(**section)
    except (ValueError, TypeError) as e:
        raise PostrainError(f"invalid `peft:` section: {e}") from None


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run's last complete checkpoint (postrain.jobs.rundir.checkpoint_problem says what complete means)."""
    complete, _ = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def checkpoint_is_final(checkpoint: Path) -> bool:
    """Whether a checkpoint was saved at the run's last step (transformers' trainer_state.json)."""
    path = Path(checkpoint) / "trainer_state.json"
    if not path.exists():
        return False
    state = json.loads(path.read_text())
    return bool(state.get("max_steps")) and state.get("global_step", 0) >= state["max_steps"]


def drop_metrics_after(run_dir: Path, step: int) -> None:
    """Keep the metrics logged up to the checkpoint a run resumes from: the steps after it are logged again. A
    last line cut short (the run was killed while writing it) is dropped with a note; any other line that does
    not parse is an error naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row_step = row["step"]
        except (ValueError, KeyError, TypeError) as e:
            if number == len(lines):
                note(f"{path}: its last line is cut short ({line[:60]!r}...), as a run stopped while writing it "
                     f"leaves it: dropped")
                continue
            raise RunDirError(f"cannot resume {run_dir}: {path}, line {number}, is not a metrics line "
                              f"({type(e).__name__}: {e}); remove or fix that line") from None
        if row_step <= step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))


def quiet_libraries() -> None:
    """Keep the console for postrain's own output: no per-weight loading bars, no advisory warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Advisories a user cannot act on from a recipe (CPU pinning, libraries' own deprecations of each other).
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|accelerate|peft)\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mergekit\..*")
    import transformers  # slow: transformers, needed only when this runs

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets  # slow: datasets, needed only when this runs

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
