"""What a training run shows on the console: a live view on a terminal, compact lines everywhere else.

The live view (rich) holds the stage, step / total with elapsed time and ETA, the few numbers that matter for
the job (JOB_METRICS), the in-training evaluation next to them (postrain.jobs.train_eval), and for GRPO a few of
the latest sampled completions with their rewards. The plain view prints one line per logging step (and one per
evaluation); everything is in metrics.jsonl either way.

Which one: `POSTRAIN_LIVE=1` forces the live view (with terminal codes, also into a pipe or file), `POSTRAIN_LIVE=0`
the plain lines; unset, the live view exactly when stdout is a terminal. An environment variable rather than a
recipe key: how a run is shown changes nothing it computes, and a recipe key would change the recipe's hash (a
pipeline reruns a stage whose hash changed, `--resume` refuses one).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from postrain.errors import PostrainError

LIVE_ENV = "POSTRAIN_LIVE"

# The numbers that matter per job, as (metrics.jsonl key, label); keys a run does not log are left out.
JOB_METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    "grpo": (
        ("reward", "reward mean"), ("reward_std", "reward std"), ("kl", "KL"), ("entropy", "entropy"),
        ("clip_ratio/region_mean", "clip fraction"), ("completions/mean_length", "completion length"),
        ("frac_reward_zero_std", "zero-variance groups"),
    ),
    "dpo": (("loss", "loss"), ("rewards/margins", "reward margin"), ("rewards/accuracies", "preference accuracy")),
    "sft": (("loss", "loss"), ("mean_token_accuracy", "token accuracy")),
}

# What a plain line shows of a training log.
CONSOLE_METRICS = ("loss", "reward", "rewards/accuracies", "mean_token_accuracy", "learning_rate", "grad_norm")

# GRPO completions shown per logging step when trainer.num_completions_to_print is unset.
SAMPLES_SHOWN = 3


def live_wanted() -> bool:
    """POSTRAIN_LIVE if set, else whether stdout is a terminal."""
    value = os.environ.get(LIVE_ENV, "").strip().lower()
    if value in ("", "auto"):
        return sys.stdout.isatty()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise PostrainError(f"{LIVE_ENV}={os.environ[LIVE_ENV]!r}: use 1 (live view), 0 (plain lines) or leave it unset "
                        f"(live view exactly when stdout is a terminal)")


def make_view(job: str, title: str) -> "PlainView | LiveView":
    if not live_wanted():
        return PlainView()
    # Forced on into something that is not a terminal: write the terminal codes anyway (that is what was asked).
    return LiveView(job, title, console=Console(force_terminal=True) if not sys.stdout.isatty() else None)


def eval_results(logs: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`eval/<set>/<metric>` keys of a log -> {set: {metric: value}}."""
    out: dict[str, dict[str, float]] = {}
    for key, value in logs.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval" and isinstance(value, (int, float)):
            out.setdefault(parts[1], {})[parts[2]] = value
    return out


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


class PlainView:
    """One line per logging step, as postrain has always printed, and one per in-training evaluation."""

    def start(self, step: int, total: int) -> None:
        pass

    def advance(self, step: int) -> None:
        pass

    def phase(self, text: str) -> None:
        pass

    def samples(self, step: int, rows: list[dict]) -> None:
        pass  # trainer.log_completions: true prints TRL's own table of them

    def stop(self) -> None:
        pass

    def metrics(self, step: int, total: int, logs: dict[str, Any]) -> None:
        shown = "  ".join(f"{k.split('/')[-1]} {logs[k]:.4g}" for k in CONSOLE_METRICS
                          if isinstance(logs.get(k), (int, float)))
        if shown:
            print(f"  step {step}/{total}  {shown}", flush=True)
        for name, values in eval_results(logs).items():
            scores = "  ".join(f"{metric} {_number(values.get(metric))}" for metric in ("accuracy", "mean_reward"))
            print(f"  eval {name} at step {step}/{total}  {scores}", flush=True)


class LiveView:
    """A rich Live panel, redrawn in place. Start and stop it around training (`start` / `stop`); `render()` is
    the panel as it stands, so it can be printed anywhere (tests print it to a buffer)."""

    def __init__(self, job: str, title: str, console=None, refresh_per_second: float = 2):
        self.job, self.title = job, title
        self.console = console or Console()
        self.refresh_per_second = refresh_per_second
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=self.console, auto_refresh=False)
        self.task = self.progress.add_task("starting", total=None)
        self.latest: dict[str, Any] = {}   # the latest value of every key logged
        self.latest_step = 0
        self.evals: dict[str, dict[str, dict[str, float]]] = {}  # set -> {"first": ..., "latest": ...} values
        self.eval_steps: dict[str, tuple[int, int]] = {}           # set -> (first step, latest step)
        self.sample_rows: list[dict] = []
        self.sample_step = 0
        self.live = None

    # --- what the training loop reports ---------------------------------------------------------------------

    def start(self, step: int, total: int) -> None:
        # reset: elapsed time and ETA count from here, not from loading the model
        self.progress.reset(self.task, description="training", total=total, completed=step)
        self.live = Live(console=self.console, get_renderable=self.render, refresh_per_second=self.refresh_per_second,
                         transient=False)
        self.live.start()

    def advance(self, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def phase(self, text: str) -> None:
        self.progress.update(self.task, description=text)
        if self.live is not None:
            self.live.refresh()

    def metrics(self, step: int, total: int, logs: dict[str, Any]) -> None:
        for name, values in eval_results(logs).items():
            entry = self.evals.setdefault(name, {"first": values})
            entry["latest"] = values
            self.eval_steps[name] = (self.eval_steps.get(name, (step, step))[0], step)
        train = {k: v for k, v in logs.items() if not k.startswith("eval/")}
        if train:
            self.latest.update(train)
            self.latest_step = step

    def samples(self, step: int, rows: list[dict]) -> None:
        self.sample_rows, self.sample_step = rows, step

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()  # leaves the last frame on screen
            self.live = None

    # --- the panel ------------------------------------------------------------------------------------------

    def render(self):
        parts: list[Any] = [self.progress.get_renderable()]
        for table in (self._metrics_table(), self._eval_table(), self._samples_table()):
            if table is not None:
                parts.append(table)
        return Panel(Group(*parts), title=self.title, title_align="left")

    def _metrics_table(self):
        rows = [(label, _number(self.latest[key])) for key, label in JOB_METRICS.get(self.job, ())
                if isinstance(self.latest.get(key), (int, float))]
        if not rows:
            return None
        table = Table(title=f"step {self.latest_step}", title_justify="left", show_header=False, box=None,
                      padding=(0, 2))
        for label, value in rows:
            table.add_row(label, value)
        return table

    def _eval_table(self):
        if not self.evals:
            return None
        table = Table(title="evaluation during training", title_justify="left", box=None, padding=(0, 2))
        for column in ("set", "step", "accuracy", "mean reward", "first (step)"):
            table.add_column(column, justify="left" if column == "set" else "right")
        for name, entry in list(self.evals.items()):  # a copy: the refresh thread renders while training logs
            first_step, latest_step = self.eval_steps[name]
            latest, first = entry["latest"], entry["first"]
            table.add_row(name, str(latest_step), _number(latest.get("accuracy")), _number(latest.get("mean_reward")),
                          f"{_number(first.get('accuracy'))} ({first_step})")
        return table

    def _samples_table(self):
        if not self.sample_rows:
            return None
        reward_names = list(self.sample_rows[0].get("rewards", {}))
        table = Table(title=f"sampled completions (step {self.sample_step})", title_justify="left", box=None,
                      padding=(0, 2), expand=True)
        # Long texts are cut to one line; the numbers are never squeezed out.
        table.add_column("prompt", overflow="ellipsis", no_wrap=True, ratio=1, min_width=8)
        table.add_column("completion", overflow="ellipsis", no_wrap=True, ratio=3, min_width=8)
        for name in [*reward_names, "advantage"]:
            table.add_column(name, justify="right", no_wrap=True, min_width=len(name))
        for row in self.sample_rows:
            # Text, not markup: completions may hold "[...]" that rich would read as style tags.
            table.add_row(Text(_one_line(row["prompt"])), Text(_one_line(row["completion"])),
                          *(_number(row["rewards"].get(name)) for name in reward_names), _number(row.get("advantage")))
        return table


def _one_line(value: Any) -> str:
    """A prompt or completion as one line: chat turns give their last message's content."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1].get("content", "")
    return str(value).replace("\n", " ⏎ ")


def grpo_samples(trainer, count: int) -> list[dict]:
    """The first completion of each of the first `count` groups of the latest generation batch, with its rewards
    and advantage. TRL 1.16's GRPOTrainer keeps that batch in `trainer._logs` whether or not `log_completions` is
    on; reading it here, rather than switching `log_completions` on, keeps TRL from printing its own table through
    the live view, writing a parquet file per logging step, and drawing the sample with Python's `random` (which
    would shift that RNG's stream in training)."""
    logs = getattr(trainer, "_logs", None)
    if not logs or not logs.get("prompt"):
        return []
    prompts, completions = list(logs["prompt"]), list(logs["completion"])
    rewards = {name: list(values) for name, values in logs["rewards"].items()}
    advantages = list(logs["advantages"])
    group = max(int(getattr(trainer, "num_generations", 1) or 1), 1)
    rows = []
    for i in range(0, len(prompts), group)[:count]:
        rows.append({"prompt": prompts[i], "completion": completions[i],
                     "rewards": {name: values[i] for name, values in rewards.items() if i < len(values)},
                     "advantage": advantages[i] if i < len(advantages) else None})
    return rows


def view_callback(view, trainer_ref: dict):
    """A TrainerCallback driving `view` from the training loop (the main process only): start, progress, GRPO
    samples at each logging step. `trainer_ref["trainer"]` is set once the trainer exists (callbacks are handed
    to it before it does). The view is stopped by the job, also when training raises."""
    from transformers import TrainerCallback  # slow: transformers, needed only when this runs

    class ViewCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                view.start(state.global_step, state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                view.advance(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            trainer = trainer_ref.get("trainer")
            if state.is_world_process_zero and trainer is not None:
                count = getattr(args, "num_completions_to_print", None) or SAMPLES_SHOWN
                rows = grpo_samples(trainer, count)
                if rows:
                    view.samples(state.global_step, rows)

    return ViewCallback()
