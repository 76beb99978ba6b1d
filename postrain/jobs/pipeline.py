"""`postrain run PIPELINE.yaml`: stages in order, each a command with its recipe and overrides.

Each stage writes its own run directory, `<pipeline output_dir>/<stage>`, which later stages reference as
`${stages.<stage>.output}` (a run directory is accepted wherever a model is). The pipeline directory records the
lineage: which stage produced which model, from which models, under which recipe hash.

Resuming: a stage whose run directory finished under the same resolved-recipe hash is skipped; one that was
interrupted is rerun (from its last checkpoint, if any); one whose recipe changed is refused unless --overwrite.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from postrain.errors import LaunchError, PostrainError, did_you_mean
from postrain.evaluation.results import model_results
from postrain.jobs import checks
from postrain.jobs.common import (RunOptions, last_checkpoint, read_recipe_hash, read_status, resumable_attempt,
                                  write_json)
from postrain.jobs.common import run_launched
from postrain.jobs.dispatch import run_job
from postrain.jobs.hub import hub_target
from postrain.jobs.loading import load_recipe, load_smoke_recipe
from postrain.jobs.signals import Interrupted
from postrain.jobs.table import job_module
from postrain.launch.launcher import launch_section, needs_launch
from postrain.recipes import Recipe, find_recipe
from postrain.reports.rundir import model_inputs, upstream_stages  # pipeline facts the reports read too


def check(cfg: dict, origins: dict[str, str]) -> None:
    """Load-time checks of a pipeline recipe itself, in this order (each stage is loaded, with its own job's
    checks, when the pipeline runs: `stage_recipe`)."""
    checks.check_inputs("pipeline", cfg, origins)
    checks.check_run_sections("pipeline", cfg, origins)
    checks.check_health("pipeline", cfg, origins)
    checks.check_reward_errors(cfg, origins)


def plan(recipe: Recipe, check_models: bool = True, worker_args: list[str] | None = None) -> dict[str, Any]:
    """The --dry-run lines of a pipeline after the head (postrain.jobs.plan): one per stage, its command, recipe,
    run directory, hash and hub target. Every stage's recipe is loaded and planned by its own job now, without
    checking its models (earlier stages write them); `check_models` and `worker_args` are not read (each stage
    launches itself)."""
    out: dict[str, Any] = {}
    for name, stage in recipe.cfg["stages"].items():
        loaded = stage_recipe(recipe, name, stage, smoke=False)  # validates every stage's recipe now
        job_module(loaded.command).plan(loaded, check_models=False)
        out[f"stage {name}"] = f"{stage['command']} {loaded.path.name} -> {loaded.cfg['output_dir']} ({loaded.hash})"
        if hub_target(loaded.cfg):
            out[f"stage {name}"] += f", pushed to {hub_target(loaded.cfg)['repo_id']}"
    return out


def smoke_layer(cfg: dict) -> dict:
    """Nothing for the pipeline itself: each stage is loaded with its own job's smoke layer (`stage_recipe`)."""
    return {}

def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """`{"trainer.max_steps": 5}` -> `{"trainer": {"max_steps": 5}}` (stage overrides use dotted keys)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = str(key).split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = {**node[leaf], **nest(value)}  # `trainer.x: 1` and `trainer: {y: 2}` both apply
        else:
            node[leaf] = nest(value) if isinstance(value, dict) else value
    return out


def stage_recipe(recipe: Recipe, name: str, stage: dict, smoke: bool) -> Recipe:
    base = recipe.path.parent if recipe.path else None
    path = find_recipe(stage["recipe"], base)
    overrides = {**nest(stage.get("overrides") or {}), "output_dir": stage["output"], "name": f"{recipe.cfg['name']}-{name}"}
    if smoke:
        return load_smoke_recipe(path, overrides, stage["command"], data_wins=True)
    return load_recipe(path, overrides, stage["command"])


def run(recipe: Recipe, options: RunOptions) -> dict:
    cfg = recipe.cfg
    if not cfg["stages"]:
        raise PostrainError(f"pipeline {recipe.path} has no stages")
    # Load every stage first: a bad key in the last stage fails before the first one trains.
    stages = {name: stage_recipe(recipe, name, stage, options.smoke) for name, stage in cfg["stages"].items()}
    for name, stage in stages.items():  # keys a stage sets that nothing reads (postrain.recipes.unread)
        for warning in stage.warnings:
            print(f"[pipeline] {name}: warning: {warning}", file=sys.stderr, flush=True)
    if options.stage is not None:
        return run_one_stage(recipe, stages, options)
    pipe_dir = Path(cfg["output_dir"])
    pipe_dir.mkdir(parents=True, exist_ok=True)
    recipe.save(pipe_dir)
    lineage: list[dict] = []
    outputs: dict[str, str] = {}
    ran: set[str] = set()  # stages (re)run in this invocation: whatever reads them must rerun too
    for name, stage in stages.items():
        run_dir = Path(stage.cfg["output_dir"])
        saved_hash, status = read_recipe_hash(run_dir), read_status(run_dir).get("status")
        upstream = upstream_stages(stage.cfg, outputs)
        outputs[name] = stage.cfg["output_dir"]
        record = {
            "stage": name, "command": stage.command, "recipe": str(stage.path), "recipe_hash": stage.hash,
            "run_dir": str(run_dir), "inputs": model_inputs(stage.cfg), "upstream": upstream,
        }
        stale_inputs = [u for u in upstream if u in ran]
        if status == "done" and saved_hash == stage.hash and not stale_inputs:
            print(f"[pipeline] {name}: finished earlier with the same recipe ({stage.hash}); skipped", flush=True)
            lineage.append({**record, "status": "skipped (done)"})
            continue
        same_recipe_interrupted = saved_hash == stage.hash and status != "done"
        # An --overwrite of this stage that stopped midway (its previous run is still in place): continued.
        attempt = None if stale_inputs else resumable_attempt(run_dir, stage.hash)
        if status == "done" and stale_inputs:
            print(f"[pipeline] {name}: rerunning, its input stage(s) {', '.join(stale_inputs)} ran again", flush=True)
        elif saved_hash is not None and not same_recipe_interrupted and attempt is None and not options.overwrite:
            raise PostrainError(
                f"stage {name!r}: {run_dir} holds a run of another recipe (hash {saved_hash}, now {stage.hash}). "
                f"Pass --overwrite to rerun it, or point the pipeline's output_dir elsewhere."
            )
        print(f"[pipeline] {name}: postrain {stage.command} {stage.path}", flush=True)
        start = time.time()
        # An interrupted stage continues from its last checkpoint; without one, or when a stage it reads ran
        # again, it starts over.
        resumable = attempt is not None or (same_recipe_interrupted and not stale_inputs
                                            and last_checkpoint(run_dir) is not None)
        stage_options = RunOptions(
            overwrite=saved_hash is not None and not resumable,
            resume=resumable,
            command_line=f"{options.command_line} [stage {name}]",
            started=start,
        )
        try:
            run_stage(recipe, name, stage, stage_options, options)
        except Interrupted as e:  # a pipeline continues an interrupted stage by itself when it is run again
            again = f"run the pipeline again to continue it from {e.checkpoint}" if e.checkpoint else \
                "run the pipeline again: the stage starts over"
            e.detail = f"stage {name!r} ({run_dir}) is marked interrupted; {again}"
            raise
        ran.add(name)
        lineage.append({**record, "status": "done", "wall_time_s": round(time.time() - start, 2)})
        write_json(pipe_dir / "lineage.json", lineage)
    write_json(pipe_dir / "lineage.json", lineage)
    rows = summary_rows(stages, reported={n for n, st in cfg["stages"].items() if st.get("report", True)})
    write_json(pipe_dir / "summary.json", rows)
    (pipe_dir / "summary.md").write_text(markdown_table(rows))
    print_table(rows)
    return {"run_dir": str(pipe_dir), "summary": rows}


def run_stage(pipeline: Recipe, name: str, stage: Recipe, stage_options: RunOptions, options: RunOptions) -> None:
    """Run one stage here, or, when its `launch:` asks for several processes or a sharding configuration, under
    `accelerate launch` as `postrain run PIPELINE --stage NAME` (each worker loads the pipeline as this process did
    and runs that stage alone)."""
    if not needs_launch(launch_section(stage.cfg)):
        run_job(stage, stage_options)
        return
    flags = [flag for flag, on in (("--smoke", options.smoke), ("--overwrite", stage_options.overwrite),
                                   ("--resume", stage_options.resume)) if on]
    try:
        run_launched(stage, stage_options, ["run", str(pipeline.path), *options.overrides, *flags, "--stage", name])
    except LaunchError as e:
        raise LaunchError(f"stage {name!r}: {e}", e.exit_code) from None


def run_one_stage(recipe: Recipe, stages: dict[str, Recipe], options: RunOptions) -> dict:
    """`postrain run PIPELINE --stage NAME`: that stage alone, with the flags as given (a launched worker of a
    stage runs this); the stages it reads must have run. The pipeline's lineage and summary are not written."""
    if options.stage not in stages:
        near = did_you_mean(options.stage, list(stages))
        raise PostrainError(f"--stage {options.stage!r}: the pipeline {recipe.path} has no such stage"
                            f"{'; ' + near if near else ''} (stages: {', '.join(stages)})")
    stage = stages[options.stage]
    stage_options = RunOptions(overwrite=options.overwrite, resume=options.resume, smoke=options.smoke,
                               command_line=options.command_line, started=options.started)
    run_stage(recipe, options.stage, stage, stage_options, options)
    return {"run_dir": stage.cfg["output_dir"]}


def summary_rows(stages: dict[str, Recipe], reported: set[str]) -> list[dict]:
    """One row per reported eval stage and set: which stage's model, its scores, that stage's training wall time."""
    by_output = {str(Path(s.cfg["output_dir"]).resolve()): name for name, s in stages.items()}
    rows = []
    for name, stage in stages.items():
        if stage.command != "eval" or name not in reported:
            continue
        results_path = Path(stage.cfg["output_dir"]) / "results.json"
        if not results_path.exists():
            continue
        results = json.loads(results_path.read_text())
        for label, evaluated in model_results(results).items():  # several under an eval stage's `models:`
            model_ref = evaluated["model"]
            producer = by_output.get(str(Path(model_ref).resolve()))
            wall = read_status(Path(stages[producer].cfg["output_dir"])).get("wall_time_s") if producer else None
            shown = label if "models" in results else producer or model_ref
            for set_name, r in evaluated["sets"].items():
                rows.append({
                    "eval": name, "model": shown, "set": set_name, "accuracy": r["accuracy"],
                    "unparsable": r["unparsable"], "mean_length": r["mean_length_tokens"], "train_wall_s": wall,
                })
    return rows


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    if pct:
        return f"{100 * value:.1f}%"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


COLUMNS = [("eval", "stage"), ("model", "model"), ("set", "set"), ("accuracy", "accuracy"),
           ("unparsable", "unparsable"), ("mean_length", "mean length (tokens)"), ("train_wall_s", "wall time (s)")]


def _cells(row: dict) -> list[str]:
    return [_fmt(row[key], pct=key in ("accuracy", "unparsable")) for key, _ in COLUMNS]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict]) -> None:
    table = Table(title="pipeline summary")
    for _, title in COLUMNS:
        table.add_column(title, no_wrap=True)
    for r in rows:
        table.add_row(*_cells(r))
    Console(width=max(Console().width, 120)).print(table)
