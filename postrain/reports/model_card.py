"""The model card: `README.md` in every model folder a run writes (`<output_dir>/model`, sft / dpo / grpo / merge).

A Hugging Face model card: YAML front matter the hub reads (library_name, base_model, tags, datasets, license,
pipeline_tag), then what a reader of the model needs: what it was trained from (lineage), how (the method and the
papers it comes from), on what data, the final metrics, how to reproduce it and the resolved recipe itself.

`build_card` is pure (a recipe mapping and what the run recorded in, text out); `model_card(run_dir)` reads a run
directory for it (reports.rundir's readers); `write_model_card` writes it, called by the jobs once the final model
is saved, on the main process only (`finish_model`).

What the front matter claims, and from where (nothing is guessed):
  base_model  the hub model the lineage goes back to: a hub id, the hub model a packaged model was converted from,
              or, for a local model folder or run directory, its own card's base_model (every postrain model has
              one; a run from before cards: its recipe's model, followed back). None for the embedded tiny model.
  license     only where every model it goes back to has a known license (a packaged model's, a local card's);
              never for a hub id (postrain reads no hub metadata) or the tiny model.
  datasets    the hub dataset ids among the data sources (built-in tasks and local files are not hub datasets).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from postrain.files import write_atomic
from postrain.merging import model_references
from postrain.models.loading import MODEL_SUBDIR, looks_like_hub_id
from postrain.models.packaged import PACKAGED_MODELS, is_packaged
from postrain.models.tiny import is_tiny
from postrain.recipes.catalog import describe_method, entry_name  # entry_name: `simpo` or `{name: simpo, ...}` -> `simpo`
from postrain.registry import FAMILIES
from postrain.reports.report import num, source_label  # the report's number format and description of a data source
from postrain.reports.report import table_cell as cell
from postrain.trainers import config_class
from postrain.reports.rundir import number, read_json, read_metrics, read_recipe, run_lineage

CARD_FILE = "README.md"
TRAINING_COMMANDS = ("sft", "dpo", "grpo")
# what each command runs on, as the card names it
ENGINES = {"sft": "TRL's SFTTrainer", "dpo": "TRL's DPOTrainer", "grpo": "TRL's GRPOTrainer", "merge": "mergekit"}
# metrics.jsonl keys of the trainer's end-of-training summary (the last line), shown as one sentence
SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss")
# the rl: parts of a GRPO recipe and the registry family each is an entry of (postrain.rl.registry)
RL_PARTS = ("advantage", "policy_loss", "aggregation", "regularizers", "shaping", "samplers")
PART_FAMILY = {"regularizers": "regularizer", "shaping": "shaping", "samplers": "sampler"}
# how many ancestors a lineage is followed through (run directories that name run directories)
MAX_DEPTH = 16


# --- writing ------------------------------------------------------------------------------------------------------

def finish_model(trainer, run_dir: Path) -> Path | None:
    """The training jobs' call once the final model is saved: its card, written by the main process only (the
    process that saves, `args.should_save`)."""
    if not trainer.args.should_save:
        return None
    return write_model_card(run_dir)


def write_model_card(run_dir: Path) -> Path:

    out = Path(run_dir) / MODEL_SUBDIR / CARD_FILE
    write_atomic(out, model_card(run_dir))
    return out


def model_card(run_dir: Path) -> str:
    """The card of the model in `run_dir`, from what the run recorded: recipe.yaml, env.json, metrics.jsonl."""
    run_dir = Path(run_dir)
    recipe = read_recipe(run_dir)
    recipe_path = run_dir / "recipe.yaml"
    return build_card(recipe, recipe_text=recipe_path.read_text() if recipe_path.is_file() else None,
                      env=read_json(run_dir / "env.json") or {}, metrics=read_metrics(run_dir),
                      lineage=run_lineage(run_dir, recipe))


# --- the card -----------------------------------------------------------------------------------------------------

def build_card(recipe: dict, *, recipe_text: str | None = None, env: dict | None = None,
               metrics: list[dict] | None = None, lineage: dict | None = None) -> str:
    """The model card's Markdown for a resolved recipe (a mapping, as recipe.yaml holds it) and what its run
    recorded: `recipe_text` (recipe.yaml as written, hash header included; else the recipe is dumped), `env`
    (env.json: versions, command line, recipe hash), `metrics` (metrics.jsonl rows), `lineage` (rundir.run_lineage)."""
    env = env or {}
    metrics = list(metrics or [])
    lineage = lineage if lineage is not None else {"inputs": []}
    command = recipe.get("command") or env.get("command") or "?"
    name = recipe.get("name") or "model"
    origins = [model_origin(ref) for ref in starting_models(recipe)]
    papers = method_papers(recipe)
    lines = ["---", yaml.safe_dump(front_matter(recipe, origins), sort_keys=False, allow_unicode=True).rstrip(),
             "---", "", f"# {name}", ""]
    if recipe.get("description"):
        lines += [str(recipe["description"]).strip(), ""]
    made = (f"merged with {ENGINES['merge']} (`postrain merge`)" if command == "merge"
            else f"trained with postrain (`postrain {command}`, over {ENGINES.get(command, command)})")
    lines += [f"This model was {made}. The sections below are written by postrain from the run's own records.", ""]
    if " --smoke" in str(env.get("command_line") or ""):
        lines += ["A `--smoke` run: the recipe's method for a few steps on postrain's small stand-in model and "
                  "built-in data (see the lineage and the recipe below), to check that the recipe runs; not the "
                  "model the recipe describes.", ""]
    lines += lineage_section(recipe, origins, lineage)
    lines += method_section(recipe, papers)
    lines += data_section(recipe)
    lines += results_section(command, metrics)
    lines += reproduce_section(recipe, env, recipe_text)
    return "\n".join(lines).rstrip() + "\n"


def front_matter(recipe: dict, origins: list[dict]) -> dict[str, Any]:
    command = recipe.get("command")
    data: dict[str, Any] = {"library_name": "transformers"}
    bases = list(dict.fromkeys(h for o in origins for h in o["base_models"]))
    if bases:
        data["base_model"] = bases[0] if len(bases) == 1 else bases
        if command == "merge":
            data["base_model_relation"] = "merge"  # the hub's relation for a merge of its base models
    licenses = {o["license"] for o in origins}
    if origins and len(licenses) == 1 and None not in licenses:
        data["license"] = licenses.pop()
    data["tags"] = tags(recipe)
    datasets = hub_datasets(recipe)
    if datasets:
        data["datasets"] = datasets
    data["pipeline_tag"] = "text-generation"  # every model postrain writes is a causal LM
    return data


def tags(recipe: dict) -> list[str]:
    """postrain, the engine (trl / mergekit), the command, then the method and loss names."""
    command = str(recipe.get("command") or "")
    out = ["postrain", "mergekit" if command == "merge" else "trl", command]
    if command == "merge":
        out += ["merge", str((recipe.get("merge") or {}).get("merge_method") or "")]
    method = recipe.get("method")
    if method:
        out.append(entry_name(method))
    elif command == "grpo" and isinstance(recipe.get("rl"), dict):
        out += [entry_name(recipe["rl"][k]) for k in ("advantage", "policy_loss") if recipe["rl"].get(k)]
    if command == "dpo":
        losses = recipe.get("loss") or []
        out += [entry_name(e) for e in losses] if losses else _loss_types(recipe)
    return list(dict.fromkeys(t.lower() for t in out if t))


def hub_datasets(recipe: dict) -> list[str]:
    """The hub dataset ids among the recipe's data sources (train, eval, mixes, evaluation during training)."""

    sources: list[dict] = []
    data = recipe.get("data") or {}
    for split in ("train", "eval"):
        if isinstance(data.get(split), dict):
            sources += [data[split], data[split].get("mix") or {}]
    for spec in ((recipe.get("eval_during_training") or {}).get("sets") or {}).values():
        if isinstance(spec, dict):
            sources.append(spec)
    out = []
    for spec in sources:
        source = str(spec.get("source") or "")
        if (source and not source.startswith("builtin:") and looks_like_hub_id(source)
                and not Path(source).expanduser().exists() and Path(source).suffix not in (".jsonl", ".json", ".csv", ".parquet")):
            out.append(source)
    return list(dict.fromkeys(out))


# --- lineage ------------------------------------------------------------------------------------------------------

def starting_models(recipe: dict) -> list[str]:
    """The models this one is made from: a training run's `model`, a merge's inputs (not a DPO reference)."""
    if recipe.get("command") == "merge":

        try:
            return [str(r) for r in model_references(recipe.get("merge") or {})]
        except (KeyError, TypeError, AttributeError):
            return []
    model = recipe.get("model") or {}
    return [str(model["name_or_path"])] if model.get("name_or_path") else []


def model_origin(ref: str, depth: int = 0) -> dict[str, Any]:
    """What a model reference is and which hub models (with their license, where known) it goes back to."""

    if is_tiny(ref):
        return {"ref": ref, "what": "the embedded tiny model (random weights built by postrain, no pretraining)",
                "base_models": [], "license": None}
    if is_packaged(ref):
        entry = PACKAGED_MODELS[ref]
        return {"ref": ref, "what": f"{entry.origin}, converted by postrain from the quantized GGUF file the pip "
                                    f"package {entry.distribution} ships", "base_models": [entry.origin],
                "license": entry.license}
    path = Path(ref).expanduser()
    if path.is_dir():
        run = path if (path / "recipe.yaml").is_file() else path.parent if path.name == MODEL_SUBDIR else None
        parent = read_recipe(run) if run is not None else {}
        what = "a local model folder"
        if parent:
            made = "merged from" if parent.get("command") == "merge" else "trained from"
            what = (f"a postrain run directory (`postrain {parent.get('command')}`, {made} "
                    f"{', '.join(f'`{r}`' for r in starting_models(parent)) or 'models not recorded'})")
        for card in (path / MODEL_SUBDIR / CARD_FILE, path / CARD_FILE):
            meta = card_metadata(card)
            if meta is not None:  # its card went back through its own lineage already
                bases = meta.get("base_model") or []
                bases = [bases] if isinstance(bases, str) else [str(b) for b in bases]
                return {"ref": ref, "what": what, "base_models": bases, "license": meta.get("license")}
        if parent and depth < MAX_DEPTH:  # a run from before model cards: follow its recipe back
            ancestors = [model_origin(r, depth + 1) for r in starting_models(parent)]
            licenses = {a["license"] for a in ancestors}
            return {"ref": ref, "what": what,
                    "base_models": list(dict.fromkeys(b for a in ancestors for b in a["base_models"])),
                    "license": licenses.pop() if len(licenses) == 1 and ancestors else None}
        return {"ref": ref, "what": what, "base_models": [], "license": None}
    if looks_like_hub_id(ref):
        return {"ref": ref, "what": "a Hugging Face hub model", "base_models": [ref], "license": None}
    return {"ref": ref, "what": "a model reference", "base_models": [], "license": None}


def card_metadata(path: Path) -> dict | None:
    """The YAML front matter of a model card, None when there is no card or no front matter."""
    if not Path(path).is_file():
        return None
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", Path(path).read_text(), re.S)
    if not match:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def lineage_section(recipe: dict, origins: list[dict], lineage: dict) -> list[str]:
    command = recipe.get("command")
    lines = ["## Lineage", ""]
    verb = "Merged from" if command == "merge" else "Trained from"
    for o in origins:
        bases = [b for b in o["base_models"] if b != o["ref"]]
        lines.append(f"- {verb} `{o['ref']}`: {o['what']}" + (f", from {', '.join(f'`{b}`' for b in bases)}"
                                                              if bases else "") + ".")
        verb = "and" if command == "merge" else verb
    merge = recipe.get("merge") or {}
    if command == "merge" and merge.get("base_model"):
        lines.append(f"- Merge base model: `{merge['base_model']}`.")
    ref = (recipe.get("ref_model") or {}).get("name_or_path") if isinstance(recipe.get("ref_model"), dict) else None
    if command == "dpo":
        lines.append(f"- Reference model: `{ref}`." if ref else
                     "- Reference model: a frozen copy of the starting model (TRL's implicit reference).")
    for name, spec in (recipe.get("logp_models") or {}).items():
        if isinstance(spec, dict):
            lines.append(f"- Further model scoring the pairs (`logp_models.{name}`): `{spec.get('name_or_path')}`.")
    stage = lineage.get("pipeline")
    if stage:
        after = ", ".join(f"`{u}`" for u in stage.get("upstream") or []) or "no earlier stage"
        lines.append(f"- Pipeline: stage `{stage.get('stage')}` of the pipeline `{stage.get('name')}` "
                     f"(`{stage.get('dir')}`), reading the outputs of {after}.")
    if not origins and not stage:
        lines.append("- Not recorded.")
    return lines + [""]


# --- method and papers --------------------------------------------------------------------------------------------

def method_papers(recipe: dict) -> list[dict[str, Any]]:
    """The papers behind the recipe: its own `paper:`, then those of the registry entries it names (method, rl:
    parts, loss: entries) or, where it names none, of the registry entries that TRL's own loss_type computes.
    One row per paper (by arXiv id), with everything it gives this run."""
    # slow: the method registries import torch; only a card's papers need them
    from postrain.variants import all_variants

    all_variants()  # imports the registries
    rows: dict[str, dict[str, Any]] = {}

    def add(title: str, arxiv: str | None, use: str, url: str | None = None, notes: str | None = None) -> None:
        key = str(arxiv or title)
        row = rows.setdefault(key, {"title": title, "arxiv": arxiv or None, "url": url, "notes": notes, "used_for": []})
        if use not in row["used_for"]:
            row["used_for"].append(use)

    def add_entry(family: str, name: str, use: str) -> None:
        entry = FAMILIES[family].entries.get(name) if family in FAMILIES else None
        if entry is not None:
            add(entry.paper, entry.arxiv, use)

    paper = recipe.get("paper")
    if isinstance(paper, dict) and (paper.get("title") or paper.get("arxiv")):
        add(str(paper.get("title") or paper.get("arxiv")), paper.get("arxiv"), "the paper this recipe reproduces",
            paper.get("url"), paper.get("notes"))
    command = recipe.get("command")
    if command == "grpo":
        if recipe.get("method"):
            name = entry_name(recipe["method"])
            add_entry("method", name, f"method `{name}`")
        rl = recipe.get("rl")
        if isinstance(rl, dict):
            for part in RL_PARTS:
                values = rl.get(part)
                for value in values if isinstance(values, list) else [values] if values else []:
                    name = entry_name(value)
                    add_entry(PART_FAMILY.get(part, part), name, f"{part.rstrip('s') if part in PART_FAMILY else part} `{name}`")
        else:  # TRL's own GRPO: its loss_type's paper, after GRPO's
            add_entry("method", "grpo", "GRPO, the algorithm of TRL's GRPOTrainer")
            for lt in _loss_types(recipe):
                for entry in _trl_entries(all_variants(), lt):
                    add(entry.paper, entry.arxiv, f"TRL loss_type `{lt}`")
    elif command == "dpo":
        losses = recipe.get("loss") or []
        for e in losses:
            add_entry("preference", entry_name(e), f"loss `{entry_name(e)}`")
        if not losses:
            for lt in _loss_types(recipe):
                for entry in _trl_entries(all_variants("preference"), lt):
                    add(entry.paper, entry.arxiv, f"TRL loss_type `{lt}`")
    return list(rows.values())


def _trl_entries(variants, loss_type: str):
    """Registry entries computing exactly what TRL's `loss_type=<loss_type>` does (their `trl` note is that
    option alone, not that option with further settings)."""
    return [v for v in variants if v.trl and v.trl.split(" (")[0].strip() == f"loss_type={loss_type}"]


def _loss_types(recipe: dict) -> list[str]:
    """TRL's loss_type of a dpo / grpo recipe: the recipe's, else the installed TRL config's default."""
    command = recipe.get("command")
    if command not in ("dpo", "grpo"):
        return []
    value = (recipe.get("trainer") or {}).get("loss_type")
    if value is None:

        field = {f.name: f for f in dataclasses.fields(config_class(command))}.get("loss_type")
        if field is None:
            return []
        value = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return [str(v) for v in ([value] if isinstance(value, str) else value or [])]


def method_section(recipe: dict, papers: list[dict]) -> list[str]:

    command = recipe.get("command")
    lines = ["## Method", ""]
    if command in ("dpo", "grpo", "merge"):
        described = describe_method(command, recipe.get("method"), recipe.get("rl"), recipe.get("loss"),
                                    recipe.get("trainer"), recipe.get("merge"))
        lines += [f"`postrain {command}`: {described}.", ""]
    else:
        lines += [f"`postrain {command}`: supervised fine-tuning ({ENGINES.get(command, command)}).", ""]
    if papers:
        lines += ["| paper | arXiv | what it gives this model |", "|---|---|---|"]
        for p in papers:
            arxiv = f"[{p['arxiv']}](https://arxiv.org/abs/{p['arxiv']})" if p["arxiv"] else "-"
            title = f"[{table_cell(p['title'])}]({p['url']})" if p.get("url") else table_cell(p["title"])
            lines.append(f"| {title} | {arxiv} | {table_cell('; '.join(p['used_for']))} |")
        lines.append("")
        notes = [p for p in papers if p.get("notes")]
        for p in notes:
            lines += [f"Notes on {p['title']}: {str(p['notes']).strip()}", ""]
    return lines


def data_section(recipe: dict) -> list[str]:

    data = recipe.get("data") or {}
    rows = [(f"data.{split}", source_label(data[split])) for split in ("train", "eval") if isinstance(data.get(split), dict)]
    sets = ((recipe.get("eval_during_training") or {}).get("sets") or {})
    rows += [(f"evaluated during training: {name}", source_label(spec)) for name, spec in sets.items() if isinstance(spec, dict)]
    if not rows:
        return []
    return ["## Data", "", *(f"- {label}: {text}" for label, text in rows), ""]


# --- results ------------------------------------------------------------------------------------------------------

def final_metrics(rows: list[dict]) -> tuple[dict | None, dict[str, tuple[float, Any]], dict[str, list[tuple[Any, float]]]]:
    """(the end-of-training summary line, the last logged value and step of each training metric, every logged
    (step, value) of each evaluation metric: eval/<set>/<measure> of evaluation during training, TRL's eval_*)."""
    summary = next((r for r in reversed(rows) if "train_runtime" in r), None)
    last: dict[str, tuple[float, Any]] = {}
    evals: dict[str, list[tuple[Any, float]]] = {}
    for row in rows:
        if "train_runtime" in row:
            continue
        for key, value in row.items():
            value = number(value)
            if key in ("step", "epoch") or value is None:
                continue
            if key.startswith("eval/") or key.startswith("eval_"):
                evals.setdefault(key, []).append((row.get("step"), value))
            else:
                last[key] = (value, row.get("step"))
    return summary, last, evals


def results_section(command: str, rows: list[dict]) -> list[str]:

    lines = ["## Results", ""]
    if command == "merge":
        return lines + ["A merge trains nothing and measures nothing; evaluate the model with `postrain eval`.", ""]
    summary, last, evals = final_metrics(rows)
    if summary is None and not last:
        return lines + ["No metrics were logged (metrics.jsonl is empty).", ""]
    if summary is not None:
        loss = number(summary.get("train_loss"))
        lines += [f"Trained to step {summary.get('step')} (epoch {num(number(summary.get('epoch')))}) in "
                  f"{num(number(summary.get('train_runtime')))} s" +
                  (f", mean training loss {num(loss)}." if loss is not None else "."), ""]
    if last:
        lines += ["Last logged training metrics (metrics.jsonl):", "", "| metric | value | step |", "|---|---|---|"]
        lines += [f"| `{key}` | {num(value)} | {num(step)} |" for key, (value, step) in last.items()]
        lines.append("")
    if evals:
        lines += ["Evaluation during training, first and last logged value:", "",
                  "| metric | first | at step | last | at step |", "|---|---|---|---|---|"]
        for key, points in evals.items():
            (s0, v0), (s1, v1) = points[0], points[-1]
            lines.append(f"| `{key}` | {num(v0)} | {num(s0)} | {num(v1)} | {num(s1)} |")
        lines.append("")
    return lines


# --- reproducing --------------------------------------------------------------------------------------------------

def reproduce_section(recipe: dict, env: dict, recipe_text: str | None) -> list[str]:
    command = recipe.get("command") or env.get("command") or "?"
    text = (recipe_text if recipe_text is not None
            else yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)).rstrip()
    recipe_hash = env.get("recipe_hash") or _header_hash(text)
    versions = env.get("packages") or {}
    shown = [f"{k} {versions[k]}" for k in ("postrain", "trl", "transformers", "torch", "peft", "mergekit")
             if versions.get(k) and (k != "mergekit" or command == "merge") and (k != "trl" or command != "merge")]
    lines = ["## Reproduce", "",
             "Save the recipe below as `recipe.yaml` (every default, inherited recipe and override is resolved in "
             "it) and run:", "", "```bash", f"postrain {command} recipe.yaml", "```", ""]
    local = [r for r in starting_models(recipe) + _reference_models(recipe) if Path(r).expanduser().exists()]
    if local:
        lines += ["It reads the local model(s) " + ", ".join(f"`{r}`" for r in dict.fromkeys(local)) + ".", ""]
    if env.get("command_line"):
        lines += [f"The run was started as `{env['command_line']}`" +
                  (f", at git commit `{env['git_commit']}`." if env.get("git_commit") else "."), ""]
    if shown:
        lines += [f"Versions: {', '.join(shown)}.", ""]
    fence = "`" * max(3, max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    lines += ["## Recipe", "", "The resolved recipe" + (f", hash `{recipe_hash}`" if recipe_hash else "") + ":", "",
              f"{fence}yaml", text, fence, ""]
    return lines


def _reference_models(recipe: dict) -> list[str]:
    ref = recipe.get("ref_model")
    return [str(ref["name_or_path"])] if isinstance(ref, dict) and ref.get("name_or_path") else []


def _header_hash(text: str) -> str | None:
    first = text.split("\n", 1)[0]
    return first.rsplit(" ", 1)[-1] if first.startswith("#") and "hash" in first else None


def table_cell(text: Any) -> str:

    return cell(text)
