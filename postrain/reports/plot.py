"""`postrain plot RUN [RUN ...]`: the training curves of one or several runs, overlaid, in one PNG.

One panel per metric (PANELS), one colour per run in every panel, each panel's legend naming the runs. A run
that did not log a metric is left out of that panel with a note; a metrics.jsonl line without the key is a missing
point, not a zero. Beside the PNG a JSON file holds every plotted point (`curves.png` -> `curves.json`), so the
figure can be checked or redrawn without reading the image. A pipeline directory stands for its training stages.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from postrain.errors import PostrainError
from postrain.reports.rundir import (pipeline_stages, read_metrics, refuse_to_overwrite, run_kind, run_label,
                                     series)

SET = "{set}"  # in a panel's key: an eval set's name, one line per set


@dataclass(frozen=True)
class Panel:
    title: str
    key: str  # the metrics.jsonl key; with {set}, a family of keys

    def keys_in(self, logged: list[str]) -> list[tuple[str, str | None]]:
        """(key, set name or None) for each logged key this panel plots, in logging order."""
        if SET not in self.key:
            return [(self.key, None)] if self.key in logged else []
        pattern = re.compile(re.escape(self.key).replace(re.escape(SET), "(.+)"))
        return [(k, m.group(1)) for k in logged if (m := pattern.fullmatch(k))]


# What the jobs log (TRL's trainers and postrain's own): GRPO first, then DPO's and SFT's own measures.
PANELS = (
    Panel("reward", "reward"),
    Panel("task metric", f"eval/{SET}/accuracy"),  # in-training evaluation, one line per eval set
    Panel("eval mean reward", f"eval/{SET}/mean_reward"),
    Panel("KL", "kl"),
    Panel("entropy", "entropy"),
    Panel("completion length", "completions/mean_length"),
    Panel("clip fraction", "clip_ratio/region_mean"),
    Panel("loss", "loss"),
    Panel("preference accuracy", "rewards/accuracies"),
    Panel("reward margin", "rewards/margins"),
    Panel("token accuracy", "mean_token_accuracy"),
)
LINE_STYLES = ("-", "--", ":", "-.")


@dataclass
class Curve:
    run: str
    panel: str
    key: str
    label: str  # the legend entry: the run, and the eval set where the panel has one line per set
    steps: list[float]
    values: list[float]
    set: str | None = None  # the eval set, in panels with one line per set


@dataclass
class Plot:
    png: Path
    data: Path
    curves: list[Curve]
    notes: list[str]


def training_runs(paths: list[str | Path]) -> tuple[dict[str, Path], list[str]]:
    """Run label -> run directory (a pipeline stands for its stages with metrics.jsonl), and notes."""
    dirs, notes = [], []
    for path in map(Path, paths):
        if run_kind(path) == "pipeline":
            stages = [s["dir"] for s in pipeline_stages(path) if (s["dir"] / "metrics.jsonl").is_file()]
            if not stages:
                notes.append(f"{path}: no stage of this pipeline has logged metrics yet")
            dirs += stages
        else:
            dirs.append(path)
    return dict(zip(run_label(dirs), dirs)), notes


def collect(runs: dict[str, Path]) -> tuple[list[Curve], list[str]]:
    """Every panel's curves for every run, and notes on what is missing."""
    curves, notes, logged_by = [], [], {}
    for label, run_dir in runs.items():
        rows = read_metrics(run_dir)
        if not rows:
            what = "an eval run" if (run_dir / "results.json").is_file() else "no training metrics"
            notes.append(f"{label}: no metrics.jsonl lines ({what}); nothing to plot")
            continue
        logged = list(dict.fromkeys(k for row in rows for k in row))
        logged_by[label] = logged
        for panel in PANELS:
            for key, set_name in panel.keys_in(logged):
                steps, values = series(rows, key)
                if steps:
                    curves.append(Curve(label, panel.title, key, label if set_name is None else f"{label}: {set_name}",
                                        steps, values, set_name))
    plotted = [p for p in PANELS if any(c.panel == p.title for c in curves)]
    for label in logged_by:
        missing = [f"{p.title} ({p.key})" for p in plotted if not any(c.run == label and c.panel == p.title
                                                                       for c in curves)]
        if missing:
            notes.append(f"{label}: no {', '.join(missing)} in metrics.jsonl; left out of "
                         f"{'that panel' if len(missing) == 1 else 'those panels'}")
    unplotted = [f"{p.title} ({p.key})" for p in PANELS if p not in plotted]
    if logged_by and unplotted:
        notes.append(f"logged by no run, so not plotted: {', '.join(unplotted)}")
    return curves, notes


def draw(curves: list[Curve], png: Path) -> None:
    """A grid of panels (three across), one colour per run, one line style per eval set."""
    # slow: matplotlib, only when a plot is drawn
    from matplotlib.figure import Figure  # no pyplot: no display, no global backend state (Agg writes the PNG)
    from matplotlib.ticker import MaxNLocator

    panels = [p for p in PANELS if any(c.panel == p.title for c in curves)]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colours = {run: f"C{i % 10}" for i, run in enumerate(dict.fromkeys(c.run for c in curves))}
    for ax, panel in zip(axes, panels):
        mine = [c for c in curves if c.panel == panel.title]
        styles = {key: LINE_STYLES[i % len(LINE_STYLES)] for i, key in enumerate(dict.fromkeys(c.key for c in mine))}
        for c in mine:
            few = len(c.steps) <= 40  # markers, so that a run of a step or two still shows
            ax.plot(c.steps, c.values, color=colours[c.run], linestyle=styles[c.key], marker="o" if few else None,
                    markersize=3, label=c.label)
        ax.set_title(f"{panel.title} ({panel.key})", fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.savefig(png, dpi=100)


def plot(paths: list[str | Path], out: str | Path, overwrite: bool = False) -> Plot:
    """Write `out` (a PNG) and its data (`out` with .json) for the runs at `paths`."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise PostrainError(f"-o {out}: the figure is written as PNG; give a path ending in .png")
    runs, notes = training_runs(paths)
    curves, missing = collect(runs)
    notes += missing
    if not curves:
        raise PostrainError(f"nothing to plot: {', '.join(map(str, paths))} logged none of "
                            f"{', '.join(p.key for p in PANELS)}" + "".join(f"\n  {n}" for n in notes))
    data = out.with_suffix(".json")
    refuse_to_overwrite([out, data], overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw(curves, out)
    data.write_text(json.dumps({
        "png": out.name,
        "runs": {label: str(path) for label, path in runs.items()},
        "panels": [asdict(p) for p in PANELS if any(c.panel == p.title for c in curves)],
        "curves": [asdict(c) for c in curves],
        "notes": notes,
    }, indent=1) + "\n")
    return Plot(out, data, curves, notes)
