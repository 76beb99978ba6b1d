"""An eval run's results.json read back: each model's results whichever shape the file has, a set's full
generation settings, and the comparison table (model per column, metric per row) as plain strings. No I/O: the eval
job prints the table (postrain.jobs.evaluate.print_results_table), pipelines and reports read the results."""

from __future__ import annotations


def model_results(results: dict) -> dict[str, dict]:
    """Name -> {"model", "model_path", "sets"} for every model of a results.json, whichever shape it has
    (one model: "sets" at the top; comparison mode: under "models")."""
    if "models" in results:
        return results["models"]
    return {results["model"]: {key: results[key] for key in ("model", "model_path", "sets")}}


def generation_of(results: dict, set_name: str, model: str | None = None) -> dict:
    """A set's full generation settings from a results.json: the shared ones with the set's differences."""
    runs = model_results(results)
    one = runs[model] if model is not None else next(iter(runs.values()))
    return {**results["generation"], **one["sets"][set_name].get("generation", {})}


def results_table(results: dict) -> tuple[list[str], list[list[list[str]]]]:
    """The comparison table of a results.json: a column per model, per set a row per metric ("61.0% [55.2, 66.8]":
    value and interval) and one for the unparsable fraction. Returns the header and each set's rows."""
    runs = model_results(results)
    set_names = list(dict.fromkeys(name for run in runs.values() for name in run["sets"]))
    header = ["set", "metric", *runs]
    sections = []
    for set_name in set_names:
        evaluated = {label: run["sets"].get(set_name) or {} for label, run in runs.items()}
        prompts = next(one["prompts"] for one in evaluated.values() if one)
        metric_names = list(dict.fromkeys(m for one in evaluated.values() for m in one.get("metrics", {})))
        rows = [[metric_cell(one.get("metrics", {}).get(metric)) for one in evaluated.values()]
                for metric in metric_names]
        rows.append(["-" if one.get("unparsable") is None else f"{100 * one['unparsable']:.1f}%"
                     for one in evaluated.values()])
        labels = [*metric_names, "unparsable"]
        sections.append([[f"{set_name} ({prompts} prompts)" if i == 0 else "", label, *cells]
                         for i, (label, cells) in enumerate(zip(labels, rows))])
    return header, sections


def metric_cell(metric: dict | None) -> str:
    """One metric as a table cell: "61.0% [55.2, 66.8]" (value and interval), "61.0%" without one, "-" for none."""
    if metric is None or metric["value"] is None:
        return "-"
    cell = f"{100 * metric['value']:.1f}%"
    if metric.get("ci"):
        low, high = metric["ci"]
        cell += f" [{100 * low:.1f}, {100 * high:.1f}]"
    return cell
