"""Reading what jobs write (postrain/jobs/common.py describes a run directory), defensively.

A run written by another postrain version, a run still going, or a stage that never ran lacks files or keys;
the readers return what is there and leave it to the caller to say what is missing. Only input that cannot be a
run at all (a path that does not exist, a folder with none of a run's files, a file that is not JSON) is an error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from postrain.errors import PostrainError
from postrain.files import is_attempt_of
from postrain.merging import model_references

WHAT_A_RUN_HOLDS = ("a run directory holds recipe.yaml and status.json, with metrics.jsonl (training runs) or "
                    "results.json and samples.jsonl (eval runs); a pipeline directory (postrain run) holds "
                    "recipe.yaml, lineage.json and one run directory per stage")
RUN_FILES = ("recipe.yaml", "status.json", "metrics.jsonl", "results.json")


def refuse_to_overwrite(paths: list[Path], overwrite: bool) -> None:
    """Never replace a file silently: the same rule as run directories (`--overwrite`)."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise PostrainError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}. Pass "
                            f"--overwrite to replace, or choose another path with -o")


def run_kind(path: Path) -> str:
    """`pipeline` or `run`; PostrainError naming the path and what a run directory holds otherwise."""
    path = Path(path)
    if not path.exists():
        raise PostrainError(f"{path} does not exist; expected a run directory ({WHAT_A_RUN_HOLDS})")
    if not path.is_dir():
        raise PostrainError(f"{path} is a file, not a run directory ({WHAT_A_RUN_HOLDS})")
    if (path / "lineage.json").is_file() or read_recipe(path).get("command") == "pipeline":
        return "pipeline"
    if any((path / name).is_file() for name in RUN_FILES):
        return "run"
    raise PostrainError(f"{path} is not a run directory: it has none of {', '.join(RUN_FILES)} "
                        f"({WHAT_A_RUN_HOLDS})")


def read_json(path: Path) -> Any:
    """A JSON file's content, None when it is absent."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PostrainError(f"{path} is not valid JSON: {e}") from None


def read_recipe(run_dir: Path) -> dict:
    """The resolved recipe a run saved (recipe.yaml), {} when there is none."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PostrainError(f"{path} is not valid YAML: {e}") from None
    return data if isinstance(data, dict) else {}


def read_metrics(run_dir: Path) -> list[dict]:
    """The lines of metrics.jsonl, [] when there is none. A last line that does not parse is skipped: a running
    job may be writing it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                continue
            raise PostrainError(f"{path}, line {number}, is not JSON ({e}): each line should be one JSON object "
                                f"of the metrics logged at one step") from None
        if not isinstance(row, dict):
            raise PostrainError(f"{path}, line {number}, is {type(row).__name__}, not a JSON object of metrics")
        rows.append(row)
    return rows


def number(value: Any) -> float | None:
    """A finite real number as float; None for anything else (absent, null, NaN, a string, a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the lines that log it: a line without the key is a missing point, not 0."""
    steps, values = [], []
    for row in rows:
        value, step = number(row.get(key)), number(row.get("step"))
        if value is not None and step is not None:
            steps.append(int(step) if step.is_integer() else step)
            values.append(value)
    return steps, values


def pipeline_stages(pipe_dir: Path) -> list[dict]:
    """Every stage of a pipeline directory in the pipeline's order: the recipe's stages, each with its lineage
    record where it ran (`status` "not run" where it did not) and the run directory it has here."""
    pipe_dir = Path(pipe_dir)
    recipe = read_recipe(pipe_dir)
    lineage = read_json(pipe_dir / "lineage.json") or []
    records = {r.get("stage"): r for r in lineage if isinstance(r, dict)}
    names = list(recipe.get("stages") or {}) or list(records)
    names += [n for n in records if n not in names]
    stages = []
    for name in names:
        record = dict(records.get(name) or {"stage": name, "status": "not run"})
        spec = (recipe.get("stages") or {}).get(name) or {}
        record.setdefault("command", spec.get("command"))
        record.setdefault("report", spec.get("report", True))
        # The lineage holds the path the stage ran at; a pipeline directory moved since has it under its name.
        recorded = Path(record["run_dir"]) if record.get("run_dir") else None
        record["dir"] = recorded if recorded is not None and recorded.is_dir() else pipe_dir / name
        stages.append(record)
    return stages


def run_label(paths: list[Path]) -> list[str]:
    """Short distinct names for runs: the directory name, with as many parent names as it takes to tell two
    apart (`a/grpo`, `b/grpo`)."""
    parts = [Path(p).resolve().parts for p in paths]
    labels = []
    for i, own in enumerate(parts):
        depth = 1
        while depth < len(own) and any(other[-depth:] == own[-depth:] for j, other in enumerate(parts) if j != i):
            depth += 1
        labels.append("/".join(own[-depth:]))
    return labels


def model_inputs(stage_cfg: dict) -> list[str]:
    """The model references a run or pipeline stage starts from (for the lineage): model, ref_model, a merge's
    models."""
    refs = []
    for key in ("model", "ref_model"):
        if stage_cfg.get(key):
            refs.append(stage_cfg[key]["name_or_path"])
    if stage_cfg.get("merge"):
        refs += model_references(stage_cfg["merge"])
    return [str(r) for r in refs]


def _strings(node: Any):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def upstream_stages(stage_cfg: dict, outputs: dict[str, str]) -> list[str]:
    """The earlier pipeline stages whose run directory this stage reads (a model, a samples file, ...); `outputs`:
    stage name -> its output directory."""
    found = []
    for value in _strings({k: v for k, v in stage_cfg.items() if k not in ("output_dir", "name")}):
        for name, out in outputs.items():
            if (value == out or value.startswith(out.rstrip("/") + "/")) and name not in found:
                found.append(name)
    return found


def run_lineage(run_dir: Path, recipe: dict | None = None) -> dict:
    """Where a run's model comes from, as far as is known when the run starts (trackers log it then; the model
    card repeats it): `inputs`, the model references it starts from (model, ref_model, a merge's models, as
    model_inputs lists them), and `pipeline`, when the run is a stage of a pipeline: the pipeline's
    directory and name, the stage and the earlier stages whose outputs it reads. A stage is recognised as the
    report does it (report.parent_lineage): its parent directory holds the pipeline's recipe.yaml. lineage.json is
    not read for this stage, since the pipeline writes a stage's record only after the stage finished."""
    run_dir = Path(run_dir)
    recipe = read_recipe(run_dir) if recipe is None else recipe
    try:
        inputs = model_inputs(recipe)
    except (KeyError, TypeError, AttributeError, PostrainError):  # a recipe shape it does not know: none
        inputs = []
    out: dict[str, Any] = {"inputs": inputs}
    stage = pipeline_stage_of(final_place(run_dir, recipe), recipe)
    if stage is not None:
        out["pipeline"] = stage
    return out


def final_place(run_dir: Path, recipe: dict) -> Path:
    """Where a run directory is meant to be: an --overwrite run being written to `<output_dir>.new` is the run
    `output_dir` (postrain.files.attempt_dir), whose lineage and pipeline stage it has."""
    out = recipe.get("output_dir") if isinstance(recipe, dict) else None
    return Path(out) if isinstance(out, str) and is_attempt_of(run_dir, Path(out)) else Path(run_dir)


def pipeline_stage_of(run_dir: Path, recipe: dict) -> dict | None:
    """The pipeline stage a run directory is, from the pipeline's recipe.yaml in its parent directory (written
    before the first stage runs); None for a run of its own."""
    parent = Path(run_dir).resolve().parent
    pipe = read_recipe(parent) if (parent / "recipe.yaml").is_file() else {}
    stages = pipe.get("stages") if pipe.get("command") == "pipeline" else None
    if not isinstance(stages, dict):
        return None
    outputs = {name: str(spec.get("output") or parent / name) for name, spec in stages.items() if isinstance(spec, dict)}
    here = Path(run_dir).resolve()
    name = next((n for n, out in outputs.items() if Path(out).resolve() == here), None)
    if name is None:
        return None
    earlier = dict(list(outputs.items())[:list(outputs).index(name)])
    return {"dir": str(parent), "name": pipe.get("name"), "stage": name,
            "command": (stages[name] or {}).get("command"), "upstream": upstream_stages(recipe, earlier)}
