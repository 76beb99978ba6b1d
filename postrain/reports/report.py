"""`postrain report RUN`: one Markdown page about a run, or about a whole pipeline.

A run: what it trained (the key settings, then its resolved recipe.yaml in full), where its model came from, its
final metrics, its curves (a PNG from postrain.reports.plot, linked) and a few sample completions (eval runs). A
pipeline directory: the stages with their lineage, a metrics table across stages, then that section per stage.

The page is RUN/report.md unless -o says otherwise; its figures go to `<page name>_files/` beside it. An existing
page or figure folder is never replaced without --overwrite, as with run directories.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postrain.errors import PostrainError
from postrain.files import SAMPLES_DIR
from postrain.recipes.catalog import describe_method
from postrain.reports import plot as plotting
from postrain.reports.rundir import (model_inputs, number, pipeline_stages, read_json, read_metrics, read_recipe,
                                     refuse_to_overwrite, run_kind)

SAMPLES_PER_SET = 3
# The trainer settings worth a line of the summary (the whole recipe follows it).
TRAINER_KEYS = ("learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                "gradient_accumulation_steps", "num_generations", "max_completion_length", "beta", "loss_type")
# results.json keys that are not a score (counts); every other number of a set is one.
COUNTS = ("prompts", "samples")


@dataclass
class Page:
    """Where the page and its figures go: figure paths in the page are relative to the page."""

    path: Path
    assets: Path
    samples: int = SAMPLES_PER_SET

    def link(self, target: Path) -> str:
        return Path(os.path.relpath(target, self.path.parent)).as_posix()


def write_report(target: str | Path, out: str | Path | None = None, overwrite: bool = False,
                 samples: int = SAMPLES_PER_SET) -> Path:
    target = Path(target)
    kind = run_kind(target)
    out = Path(out) if out else target / "report.md"
    if out.suffix.lower() != ".md":
        raise PostrainError(f"-o {out}: the report is Markdown; give a path ending in .md")
    page = Page(out, out.parent / f"{out.stem}_files", samples)
    refuse_to_overwrite([out, page.assets], overwrite)
    lines = pipeline_report(target, page) if kind == "pipeline" else run_report(target, page)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out


# --- one run ----------------------------------------------------------------------------------------------------

def run_report(run_dir: Path, page: Page) -> list[str]:
    recipe = read_recipe(run_dir)
    title = recipe.get("name") or run_dir.name
    return [f"# Report: {title}", "", *run_section(run_dir, page, level=2, lineage=parent_lineage(run_dir))]


def parent_lineage(run_dir: Path) -> dict | None:
    """The lineage record of a run that is a stage of a pipeline (its parent directory), if it is one."""
    parent = run_dir.resolve().parent
    if not (parent / "lineage.json").is_file():
        return None
    return next((s for s in pipeline_stages(parent) if Path(s["dir"]).resolve() == run_dir.resolve()), None)


def run_section(run_dir: Path, page: Page, level: int, lineage: dict | None = None) -> list[str]:
    """The recipe, lineage, final metrics, curves and samples of one run; headings at `level` and below."""
    h = "#" * level
    recipe = read_recipe(run_dir)
    status = read_json(run_dir / "status.json") or {}
    env = read_json(run_dir / "env.json") or {}
    command = recipe.get("command") or env.get("command") or "?"
    facts = [f"`{run_dir}`", f"`postrain {command}`", f"status **{status.get('status', 'unknown')}**"]
    if number(status.get("wall_time_s")) is not None:
        facts.append(f"{status['wall_time_s']:.1f} s")
    if status.get("recipe_hash") or env.get("recipe_hash"):
        facts.append(f"recipe hash `{status.get('recipe_hash') or env.get('recipe_hash')}`")
    versions = env.get("packages") or {}
    if versions:
        facts.append(", ".join(f"{k} {versions[k]}" for k in ("postrain", "trl", "torch") if versions.get(k)))
    lines = [" · ".join(facts), ""]
    if status.get("error"):
        lines += [f"Stopped with: `{status['error']}`", ""]
    lines += [f"{h} Recipe", "", *settings_table(recipe, lineage), ""]
    if recipe:
        lines += ["<details><summary>resolved recipe (recipe.yaml)</summary>", "", "```yaml",
                  (run_dir / "recipe.yaml").read_text().rstrip(), "```", "", "</details>", ""]
    rows = read_metrics(run_dir)
    if rows:
        lines += training_section(run_dir, rows, page, h)
    lines += eval_samples_section(run_dir, page, h)
    results = read_json(run_dir / "results.json")
    if results is not None:
        lines += [f"{h} Results", "", *results_table(results), ""]
        lines += samples_section(run_dir, page, h)
    if not rows and results is None:
        lines += ["No metrics.jsonl or results.json: nothing measured" +
                  (" (a merge writes only its model)." if command == "merge" else "."), ""]
    return lines


def settings_table(recipe: dict, lineage: dict | None) -> list[str]:
    """The settings that say what a run was, one row each."""

    if not recipe:
        return ["No recipe.yaml in this run directory."]
    command = recipe.get("command")
    rows: list[tuple[str, str]] = []
    if recipe.get("description"):
        rows.append(("description", str(recipe["description"])))
    paper = recipe.get("paper") or {}
    if isinstance(paper, dict) and paper.get("title"):
        rows.append(("paper", f"{paper['title']} ([arXiv {paper.get('arxiv')}](https://arxiv.org/abs/"
                              f"{paper.get('arxiv')}))" if paper.get("arxiv") else str(paper["title"])))
    try:
        inputs = model_inputs(recipe)
    except (KeyError, TypeError, AttributeError, PostrainError):  # a recipe shape it does not know: show none
        inputs = []
    if inputs:
        rows.append(("model" if command != "merge" else "merged models", ", ".join(f"`{i}`" for i in inputs)))
    if lineage:
        rows.append(("pipeline stage", f"`{lineage.get('stage')}`, after "
                                       f"{', '.join(f'`{u}`' for u in lineage.get('upstream') or []) or 'no stage'}"))
    data = recipe.get("data") or {}
    for split in ("train", "eval"):
        if isinstance(data.get(split), dict):
            rows.append((f"data ({split})", source_label(data[split])))
    for name, spec in (recipe.get("sets") or {}).items():
        rows.append((f"eval set {name}", source_label(spec)))
    if command in ("dpo", "grpo", "merge"):
        rows.append(("method / losses", describe_method(command, recipe.get("method"), recipe.get("rl"),
                                                        recipe.get("loss"), recipe.get("trainer"),
                                                        recipe.get("merge"))))
    rewards = recipe.get("rewards") or []
    if rewards and command in ("grpo", "eval"):
        rows.append(("rewards", ", ".join(f"{r.get('alias') or r.get('name') or r.get('fn')} x{r.get('weight', 1.0)}"
                                          for r in rewards if isinstance(r, dict))))
    trainer = recipe.get("trainer") or {}
    chosen = {k: trainer[k] for k in TRAINER_KEYS if trainer.get(k) not in (None, [], "")}
    if chosen:
        rows.append(("trainer", ", ".join(f"{k}={v}" for k, v in chosen.items())))
    if recipe.get("seed") is not None:
        rows.append(("seed", str(recipe["seed"])))
    return ["| setting | value |", "|---|---|", *(f"| {k} | {table_cell(v)} |" for k, v in rows)]


def source_label(spec: dict) -> str:
    source = spec.get("source", "?")
    task = spec.get("task")
    extra = [f"split {spec['split']}"] if spec.get("split") else []
    if isinstance(task, dict) and task:
        extra.append(", ".join(f"{k}={v}" for k, v in task.items()))
    if isinstance(spec.get("generation"), dict) and spec["generation"]:
        extra.append("generation " + ", ".join(f"{k}={v}" for k, v in spec["generation"].items()))
    return f"`{source}`" + (f" ({'; '.join(extra)})" if extra else "")


def training_section(run_dir: Path, rows: list[dict], page: Page, h: str) -> list[str]:
    """The final value of every plotted metric, and the curves."""
    label = run_dir.name
    curves, _ = plotting.collect({label: run_dir})
    lines = [f"{h} Final metrics", ""]
    summary = next((r for r in reversed(rows) if "train_runtime" in r), None)
    if summary:
        lines += [f"Trained to step {summary.get('step')} in {number(summary.get('train_runtime')) or 0:.1f} s"
                  + (f", mean training loss {summary['train_loss']:.4g}." if number(summary.get("train_loss"))
                     is not None else "."), ""]
    if curves:
        lines += ["| metric | key | first | last | min | max | last step | points |", "|---" * 8 + "|"]
        for c in curves:
            lines.append(f"| {c.panel} | `{c.key}` | {num(c.values[0])} | {num(c.values[-1])} | "
                         f"{num(min(c.values))} | {num(max(c.values))} | {num(c.steps[-1])} | {len(c.values)} |")
        lines.append("")
        png = page.assets / f"{label}.png"
        plotted = plotting.plot([run_dir], png, overwrite=True)  # the page's own folder, checked by write_report
        lines += [f"{h} Curves", "", f"![curves of {label}]({page.link(png)})", "",
                  f"The plotted points: [{plotted.data.name}]({page.link(plotted.data)}).", ""]
    else:
        lines += ["metrics.jsonl holds none of the plotted metrics "
                  f"({', '.join(p.key for p in plotting.PANELS)}).", ""]
    return lines


def results_by_model(results: Any) -> dict[str, dict]:
    """Model -> its eval sets, from either shape of results.json (one model: `sets` at the top; several models
    compared: under `models`); {} for anything else."""
    if not isinstance(results, dict):
        return {}
    if isinstance(results.get("models"), dict):
        return {str(name): m.get("sets") or {} for name, m in results["models"].items() if isinstance(m, dict)}
    return {str(results.get("model") or "model"): results.get("sets") or {}}


def set_scores(scores: dict, prefix: str = "") -> dict[str, Any]:
    """One eval set of results.json as flat `name -> number` (nested mappings as `rewards/exact_match`, a paper
    metric `{value, ci}` as `pass@4 -> (value, ci)`), without its generation settings: whatever an eval writes,
    known or new, is shown."""
    out: dict[str, Any] = {}
    for key, value in scores.items():
        if key == "generation":
            continue
        if key == "metrics" and isinstance(value, dict):
            value, key = value, ""  # mean@n, pass@k, maj@k: named as papers name them, no `metrics/` prefix
        if key == "subsets" and isinstance(value, dict) and isinstance(value.get("values"), dict):
            for label, subset in value["values"].items():
                if isinstance(subset, dict):
                    out.update(set_scores(subset, f"{prefix}{value.get('column', 'subset')}={label}/"))
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict) and number(value.get("value")) is not None:
            ci = value.get("ci")
            ok = isinstance(ci, list) and len(ci) == 2 and all(number(c) is not None for c in ci)
            out[name] = (number(value["value"]), tuple(ci) if ok else None)
        elif isinstance(value, dict):
            out.update(set_scores(value, f"{name}/" if key else prefix))
        elif number(value) is not None:
            out[name] = number(value)
    return out


def results_table(results: Any) -> list[str]:
    """One row per measure, one column per eval set (per model and set, for a comparison of models)."""
    models = results_by_model(results)
    columns = {(f"{model}: {name}" if len(models) > 1 else name): set_scores(scores)
               for model, sets in models.items() for name, scores in sets.items() if isinstance(scores, dict)}
    if not columns:
        return ["results.json has no eval sets with scores."]
    keys = list(dict.fromkeys(k for scores in columns.values() for k in scores))
    lines = ["| measure | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {k} | " + " | ".join(num(columns[c].get(k)) for c in columns) + " |" for k in keys]
    return lines


def samples_section(run_dir: Path, page: Page, h: str) -> list[str]:
    """The first few samples of each eval set, as written (prompt order), with answer and score."""
    path = run_dir / "samples.jsonl"
    if not path.is_file() or page.samples <= 0:
        return []
    by_set: dict[str, list[dict]] = {}
    total: dict[str, int] = {}
    for line in path.read_text().splitlines():
        try:
            sample = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written, or damaged: a report shows what it can
        if not isinstance(sample, dict):
            continue
        name = str(sample.get("set", "?"))
        total[name] = total.get(name, 0) + 1
        if len(by_set.setdefault(name, [])) < page.samples:
            by_set[name].append(sample)
    lines = [f"{h} Sample completions", ""]
    for name, samples in by_set.items():
        lines += [f"**{name}** (the first {len(samples)} of {total[name]})", "",
                  "| prompt | completion | answer | score |", "|---|---|---|---|"]
        lines += [f"| {_code(_prompt_text(s.get('prompt')))} | {_code(s.get('completion'))} | "
                  f"{_code(s.get('answer'))} | {num(number(s.get('score')))} |" for s in samples]
        lines.append("")
    return lines


def eval_samples_section(run_dir: Path, page: Page, h: str) -> list[str]:
    """Completions kept by evaluation during training (eval_samples/step_<N>.jsonl): the first few of each set at the
    first and at the last evaluation, side by side in time, to read what the eval curve measured."""
    files = {}
    for path in (run_dir / SAMPLES_DIR).glob("step_*.jsonl"):
        step = path.stem.removeprefix("step_")
        if step.isdigit():
            files[int(step)] = path
    if not files or page.samples <= 0:
        return []
    shown = sorted({min(files), max(files)})
    lines = [f"{h} Evaluation samples during training", "",
             f"{len(files)} evaluation points saved in `{SAMPLES_DIR}/`; the first {page.samples} completions of each "
             f"set at step {' and step '.join(map(str, shown))}.", ""]
    for step in shown:
        by_set: dict[str, list[dict]] = {}
        for line in files[step].read_text().splitlines():
            try:
                sample = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(sample, dict) and len(by_set.setdefault(str(sample.get("set", "?")), [])) < page.samples:
                by_set[str(sample.get("set", "?"))].append(sample)
        for name, samples in by_set.items():
            lines += [f"**{name}**, step {step}", "", "| prompt | completion | answer | score | tokens |",
                      "|---|---|---|---|---|"]
            lines += [f"| {_code(_prompt_text(s.get('prompt')))} | {_code(s.get('completion'))} | "
                      f"{_code(s.get('answer'))} | {num(number(s.get('score')))} | "
                      f"{num(number(s.get('completion_tokens')))} |" for s in samples]
            lines.append("")
    return lines


# --- a pipeline -------------------------------------------------------------------------------------------------

def pipeline_report(pipe_dir: Path, page: Page) -> list[str]:
    recipe = read_recipe(pipe_dir)
    stages = pipeline_stages(pipe_dir)
    lines = [f"# Pipeline report: {recipe.get('name') or pipe_dir.name}", "",
             f"`{pipe_dir}` · {len(stages)} stages" + (f" · {recipe['description']}" if recipe.get("description")
                                                      else ""), ""]
    lines += ["## Stages", "", "| stage | command | status | model from | after stages | recipe hash | wall time (s) |",
              "|---|---|---|---|---|---|---|"]
    for s in stages:
        wall = (read_json(Path(s["dir"]) / "status.json") or {}).get("wall_time_s", s.get("wall_time_s"))
        lines.append(f"| [{s['stage']}](#stage-{_anchor(s['stage'])}) | {s.get('command') or '?'} | "
                     f"{s.get('status', '?')} | {table_cell(', '.join(map(str, s.get('inputs') or [])) or '-')} | "
                     f"{', '.join(s.get('upstream') or []) or '-'} | {s.get('recipe_hash') or '-'} | "
                     f"{num(number(wall))} |")
    lines += ["", "## Metrics across stages", "", *evaluations_across(stages), "", *training_across(stages), ""]
    if recipe:
        lines += ["<details><summary>pipeline recipe (recipe.yaml)</summary>", "", "```yaml",
                  (pipe_dir / "recipe.yaml").read_text().rstrip(), "```", "", "</details>", ""]
    for s in stages:
        lines += [f"## Stage {s['stage']}", ""]
        if not Path(s["dir"]).is_dir():
            lines += [f"Not run yet (no `{s['dir']}`).", ""]
            continue
        lines += run_section(Path(s["dir"]), page, level=3, lineage=s)
    return lines


def evaluations_across(stages: list[dict]) -> list[str]:
    """Every eval stage's scores per set (stages marked `report: false` left out, as in the pipeline's summary)."""
    rows = []
    for s in stages:
        if s.get("command") != "eval" or not s.get("report", True):
            continue
        models = results_by_model(read_json(Path(s["dir"]) / "results.json"))
        for model, sets in models.items():
            if len(models) == 1:  # the model by the stage that made it, where a stage did
                model = ", ".join(s.get("upstream") or []) or ", ".join(map(str, s.get("inputs") or []))
            for set_name, scores in sets.items():
                if isinstance(scores, dict):
                    top = {k: v for k, v in set_scores(scores).items() if "/" not in k and k not in COUNTS}
                    rows.append((s["stage"], model, set_name, top))
    if not rows:
        return ["No evaluation results yet."]
    keys = list(dict.fromkeys(k for *_, top in rows for k in top))
    lines = ["Evaluations (results.json of each eval stage):", "",
             "| eval stage | model | set | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    lines += [f"| {stage} | {table_cell(model)} | {set_name} | " + " | ".join(num(top.get(k)) for k in keys) + " |"
              for stage, model, set_name, top in rows]
    return lines


def training_across(stages: list[dict]) -> list[str]:
    """The last logged value of each plotted metric, per training stage."""
    finals: dict[str, dict[str, float]] = {}
    for s in stages:
        if (Path(s["dir"]) / "metrics.jsonl").is_file():
            curves, _ = plotting.collect({s["stage"]: Path(s["dir"])})
            finals[s["stage"]] = {c.panel if c.set is None else f"{c.panel} ({c.set})": c.values[-1] for c in curves}
    if not finals:
        return ["No training metrics yet."]
    order = [p.title for p in plotting.PANELS]  # the figure's panel order
    columns = sorted(dict.fromkeys(k for f in finals.values() for k in f), key=lambda k: order.index(k.split(" (")[0]))
    return ["Training (last logged value; - where a stage does not log it):", "",
            "| stage | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns),
            *(f"| {stage} | " + " | ".join(num(f.get(k)) for k in columns) + " |" for stage, f in finals.items())]


# --- formatting -------------------------------------------------------------------------------------------------

def num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):  # (value, confidence interval or None)
        shown, ci = value
        return num(shown) + (f" [{num(ci[0])}, {num(ci[1])}]" if ci else "")
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table_cell(text: Any) -> str:
    """Text for a table cell: no line breaks, no column separators."""
    return str(text).replace("|", "\\|").replace("\n", " ")


CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _code(value: Any, limit: int = 160) -> str:
    """A value as inline code in a table cell: control characters escaped (`\\n`), long text cut."""
    if value is None:
        return "-"
    text = CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), str(value))
    if not text:
        return "(empty)"
    if len(text) > limit:
        text = text[:limit] + "…"
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text.replace('|', chr(92) + '|')}{pad}{fence}"


def _prompt_text(prompt: Any) -> Any:
    """A chat prompt as its last user turn; plain text as it is."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        return prompt[-1].get("content")
    return prompt


def _anchor(heading: str) -> str:
    """The anchor GitHub gives the heading `Stage <name>` (lowercase, punctuation dropped, spaces to dashes)."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
