"""`postrain report`: one Markdown page about a run or a pipeline (recipe, lineage, metrics, curves, samples)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from postrain.cli import app
from tests.conftest import TINY, write_recipe
from tests.test_plot import grpo_lines, write_run

runner = CliRunner()


def report(*args) -> str:
    result = runner.invoke(app, ["report", *map(str, args)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def write_eval_run(run_dir: Path, results: dict, samples: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text("# postrain resolved recipe, hash e1\ncommand: eval\nname: ev\n"
                                         "model: {name_or_path: runs/x}\n")
    (run_dir / "status.json").write_text('{"status": "done", "wall_time_s": 2.5}\n')
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return run_dir


def synthetic_pipeline(root: Path) -> Path:
    """A pipeline directory as `postrain run` leaves it: sft -> grpo -> eval, a stage not run yet, and an eval
    results.json with paper metrics ({value, ci}) that a report must show without knowing their names."""
    pipe = root / "pipe"
    sft = write_run(pipe / "sft", [{"step": s, "loss": 4.0 - s, "mean_token_accuracy": 0.25 * s} for s in (1, 2, 3)],
                    "sft")
    grpo = write_run(pipe / "grpo", grpo_lines(1.0))
    samples = [{"set": "heldout", "prompt": f"{i}+1=", "completion": f"{i + 1}" if i else "a|b\nc",
                "answer": str(i + 1), "score": float(i > 0)} for i in range(5)]
    write_eval_run(pipe / "eval_grpo", {
        "model": str(grpo), "sets": {"heldout": {"prompts": 5, "samples": 5, "accuracy": 0.8, "unparsable": 0.2,
                                                 "metrics": {"pass@1": {"value": 0.8, "ci": [0.5, 1.0]}},
                                                 "generation": {"do_sample": False}}}}, samples)
    (pipe / "recipe.yaml").write_text(
        "# postrain resolved recipe, hash p1\ncommand: pipeline\nname: pipe\ndescription: a test pipeline\n"
        "stages: {sft: {command: sft}, grpo: {command: grpo}, eval_grpo: {command: eval}, merge: {command: merge}}\n")
    lineage = [
        {"stage": "sft", "command": "sft", "recipe_hash": "s1", "run_dir": str(sft), "inputs": ["tiny"],
         "upstream": [], "status": "done"},
        {"stage": "grpo", "command": "grpo", "recipe_hash": "g1", "run_dir": str(grpo), "inputs": [str(sft)],
         "upstream": ["sft"], "status": "done"},
        {"stage": "eval_grpo", "command": "eval", "recipe_hash": "e1", "run_dir": str(pipe / "eval_grpo"),
         "inputs": [str(grpo)], "upstream": ["grpo"], "status": "done"},
    ]
    (pipe / "lineage.json").write_text(json.dumps(lineage))
    return pipe


def section(text: str, heading: str) -> str:
    """The lines under `heading` up to the next heading of the same or a higher level (outside code blocks: a
    recipe's `# comment` is no heading)."""
    level = len(heading.split(" ")[0])
    lines = text.splitlines()
    start = lines.index(heading) + 1
    fenced = False
    for end in range(start, len(lines)):
        fenced ^= lines[end].startswith("```")
        hashes = len(lines[end]) - len(lines[end].lstrip("#"))
        if not fenced and 0 < hashes <= level and lines[end][hashes:hashes + 1] == " ":
            return "\n".join(lines[start:end])
    return "\n".join(lines[start:])


def table_row(text: str, first_cell: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_pipeline_report_covers_every_stage_with_a_metrics_table_across_stages(tmp_path):
    pipe = synthetic_pipeline(tmp_path)
    report(pipe)
    text = (pipe / "report.md").read_text()
    assert text.startswith("# Pipeline report: pipe\n") and "a test pipeline" in text

    stages = section(text, "## Stages")
    assert [table_row(stages, f"[{s}](#stage-{s})")[2] for s in ("sft", "grpo", "eval_grpo", "merge")] == \
        ["done", "done", "done", "not run"]
    assert table_row(stages, "[grpo](#stage-grpo)")[4] == "sft"  # lineage: grpo came after sft

    across = section(text, "## Metrics across stages")
    header = table_row(across, "eval stage")
    row = dict(zip(header, table_row(across, "eval_grpo")))
    assert row["model"] == "grpo" and row["accuracy"] == "0.8" and row["pass@1"] == "0.8 [0.5, 1]"
    training = dict(zip(table_row(across, "stage"), table_row(across, "sft")))
    assert training["loss"] == "1" and training["token accuracy"] == "0.75"  # the last logged values
    assert training["reward"] == "-"  # sft logs no reward
    grpo = dict(zip(table_row(across, "stage"), table_row(across, "grpo")))
    assert grpo["reward"] == "4" and grpo["task metric (heldout)"] == "0.5"

    # One section per stage; the one that did not run says so.
    assert "Not run yet" in section(text, "## Stage merge")
    sft = section(text, "## Stage sft")
    assert "```yaml\n# postrain resolved recipe, hash 0\ncommand: sft" in sft
    final = section(sft, "### Final metrics")
    assert table_row(final, "loss")[2:5] == ["3", "1", "1"]  # first, last, min
    # Curves: linked relative to the page, and there.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["report_files/sft.png", "report_files/grpo.png"]
    assert all((pipe / link).is_file() for link in links)
    points = json.loads((pipe / "report_files" / "sft.json").read_text())
    assert [c["values"] for c in points["curves"] if c["key"] == "loss"] == [[3.0, 2.0, 1.0]]

    samples = section(text, "### Sample completions")
    assert "the first 3 of 5" in samples
    # A completion with a column bar and a newline stays in its cell.
    assert table_row(samples, "`0+1=`")[1] == r"`a\|b\nc`"

    # One stage on its own: its page says which pipeline stage it is and what came before it.
    report(pipe / "grpo")
    alone = (pipe / "grpo" / "report.md").read_text()
    assert alone.startswith("# Report: grpo\n") and "Trained to step 4 in 1.0 s" in alone
    assert table_row(alone, "pipeline stage")[1] == "`grpo`, after `sft`"
    assert "![curves of grpo](report_files/grpo.png)" in alone
    assert (pipe / "grpo" / "report_files" / "grpo.png").is_file()


def test_run_report_shows_the_eval_results_of_any_shape(tmp_path):
    # Several models compared in one eval (results under `models`), with a score postrain does not know yet.
    ev = write_eval_run(tmp_path / "ev", {"models": {
        "a": {"model": "a", "sets": {"s": {"accuracy": 0.25, "maj@4": {"value": 0.5, "ci": None}}}},
        "b": {"model": "b", "sets": {"s": {"accuracy": 0.75, "new_score": 3}}}}}, [])
    report(ev)
    results = section((ev / "report.md").read_text(), "## Results")
    assert table_row(results, "measure") == ["measure", "a: s", "b: s"]
    assert table_row(results, "accuracy")[1:] == ["0.25", "0.75"]
    assert table_row(results, "maj@4")[1:] == ["0.5", "-"] and table_row(results, "new_score")[1:] == ["-", "3"]

    odd = write_eval_run(tmp_path / "odd", {"model": "m"}, [])  # no `sets` at all
    report(odd, "-o", tmp_path / "odd.md")
    assert "results.json has no eval sets with scores" in (tmp_path / "odd.md").read_text()


def test_an_existing_report_is_replaced_only_with_overwrite(tmp_path):
    pipe = synthetic_pipeline(tmp_path)
    out = tmp_path / "out" / "r.md"
    report(pipe, "-o", out)
    (out).write_text("my notes")
    again = runner.invoke(app, ["report", str(pipe), "-o", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output and out.read_text() == "my notes"
    # The figures folder counts too: a report whose page was deleted is still not replaced silently.
    out.unlink()
    assert runner.invoke(app, ["report", str(pipe), "-o", str(out)]).exit_code == 2 and not out.exists()
    report(pipe, "-o", out, "--overwrite")
    assert out.read_text().startswith("# Pipeline report: pipe")
    assert "ending in .md" in runner.invoke(app, ["report", str(pipe), "-o", str(tmp_path / "r.html")]).output
    bad = runner.invoke(app, ["report", str(tmp_path / "out")])
    assert bad.exit_code == 2 and "is not a run directory" in bad.output


def test_report_on_a_small_real_pipeline(tmp_path):
    tiny = f"model: {{name_or_path: tiny, dtype: float32, tiny: {json.dumps(TINY)}}}"
    small = "max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1"
    write_recipe(tmp_path / "sft.yaml", f"""defaults: [base/sft]
{tiny}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
trainer: {{{small}, max_length: 32}}
""")
    write_recipe(tmp_path / "grpo.yaml", f"""defaults: [base/grpo]
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}}}}}
trainer: {{{small}, num_generations: 4, max_completion_length: 4, use_vllm: false, activation_checkpointing: false}}
""")
    write_recipe(tmp_path / "eval.yaml", """defaults: [base/eval]
sets: {heldout: {source: "builtin:arithmetic", split: test, task: {n: 6, digits: 1}}}
generation: {max_new_tokens: 4, batch_size: 6}
""")
    pipe = write_recipe(tmp_path / "pipe.yaml", f"""command: pipeline
name: small
output_dir: {tmp_path / 'runs'}
stages:
  sft: {{command: sft, recipe: sft.yaml}}
  grpo: {{command: grpo, recipe: grpo.yaml, overrides: {{model.name_or_path: "${{stages.sft.output}}"}}}}
  eval_grpo: {{command: eval, recipe: eval.yaml, overrides: {{model.name_or_path: "${{stages.grpo.output}}"}}}}
""")
    ran = runner.invoke(app, ["run", str(pipe)])
    assert ran.exit_code == 0, ran.output + repr(ran.exception)
    runs = tmp_path / "runs"
    report(runs)
    text = (runs / "report.md").read_text()
    # The recipe of each stage, resolved, as the run saved it.
    grpo = section(text, "## Stage grpo")
    assert (runs / "grpo" / "recipe.yaml").read_text().strip() in grpo
    assert table_row(grpo, "model")[1] == f"`{runs / 'sft'}`"
    # The metrics table holds what the run logged.
    logged = [json.loads(line) for line in (runs / "grpo" / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward"] for m in logged if "reward" in m]
    row = table_row(section(grpo, "### Final metrics"), "reward")
    assert row[1] == "`reward`" and float(row[3]) == rewards[-1] and row[-1] == str(len(rewards)) == "2"
    accuracy = json.loads((runs / "eval_grpo" / "results.json").read_text())["sets"]["heldout"]["accuracy"]
    across = section(text, "## Metrics across stages")
    assert float(dict(zip(table_row(across, "eval stage"), table_row(across, "eval_grpo")))["accuracy"]) == accuracy
    for stage in ("sft", "grpo"):
        assert f"![curves of {stage}](report_files/{stage}.png)" in text
        assert (runs / "report_files" / f"{stage}.png").is_file()
    assert "### Sample completions" in section(text, "## Stage eval_grpo")


def test_report_on_the_demo_pipeline(tmp_path):
    """Issue #9: `postrain report` on the demo's runs (the demo pipeline under --smoke: every stage, a few steps)
    gives one document with each stage's recipe, the metrics tables and the training curves."""
    runs = tmp_path / "demo"
    ran = runner.invoke(app, ["run", "recipes/demo/pipeline.yaml", "--smoke", f"output_dir={runs}"])
    assert ran.exit_code == 0, ran.output + repr(ran.exception)
    report(runs)
    text = (runs / "report.md").read_text()
    for stage in ("sft", "grpo", "dpo", "merge", "eval_sft", "eval_grpo", "eval_dpo", "eval_merge"):
        assert (runs / stage / "recipe.yaml").read_text().strip() in section(text, f"## Stage {stage}"), stage
    across = section(text, "## Metrics across stages")
    for stage in ("eval_sft", "eval_grpo", "eval_dpo", "eval_merge"):
        accuracy = json.loads((runs / stage / "results.json").read_text())["sets"]
        assert stage in across and accuracy, stage
    for stage in ("sft", "grpo", "dpo"):
        assert f"![curves of {stage}](report_files/{stage}.png)" in text
        assert (runs / "report_files" / f"{stage}.png").read_bytes()[:4] == b"\x89PNG"
