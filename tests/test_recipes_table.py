"""`postrain recipes`: the table of recipes (paper recipes with --papers): file, command, method or losses,
model, paper title and arXiv id, from each recipe and its `defaults:` chain."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from postrain.cli import app
from tests.conftest import REPO, write_recipe

runner = CliRunner()


def rows(*args: str) -> list[dict]:
    result = runner.invoke(app, ["recipes", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_columns_come_from_the_recipe_or_its_defaults(tmp_path):
    root = tmp_path / "recipes"
    write_recipe(root / "base" / "grpo.yaml", "command: grpo\nmodel: {name_or_path: base/model}\n")
    write_recipe(root / "base" / "dpo.yaml", "command: dpo\ntrainer: {beta: 0.1, loss_type: [sigmoid]}\n")
    paper = "paper: {title: A Paper, arxiv: '2401.00001'}\n"
    write_recipe(root / "papers" / "m.yaml", "defaults: [../base/grpo]\n" + paper +
                 "method: {name: dapo, epsilon_high: 0.3}\nrl: {shaping: [{name: dapo_overlong}], "
                 "policy_loss: {epsilon: 0.1}}\n")
    write_recipe(root / "papers" / "l.yaml", "defaults: [../base/dpo]\n" + paper +
                 "model: {name_or_path: org/m-7b}\nloss: [{name: simpo, beta: 2.0}, {name: dpo_nll, weight: 0.5}]\n")
    write_recipe(root / "papers" / "t.yaml", "defaults: [../base/dpo]\n" + paper +
                 "trainer: {learning_rate: 1.0e-6}\n")  # TRL's loss, set in the base recipe's trainer
    write_recipe(root / "plain.yaml", "defaults: [base/grpo]\nrl: {advantage: rloo}\n")
    by_path = {r["path"]: r for r in rows("--root", str(root))}
    m, l, t, plain = (by_path[f"recipes/{p}.yaml"] for p in ("papers/m", "papers/l", "papers/t", "plain"))
    assert (m["command"], m["model"], m["paper"], m["arxiv"]) == ("grpo", "base/model", "A Paper", "2401.00001")
    assert m["method"] == "dapo; rl: shaping=dapo_overlong, policy_loss.epsilon=0.1"
    assert (l["command"], l["model"], l["method"]) == ("dpo", "org/m-7b", "simpo + dpo_nll x0.5")
    assert t["method"] == "TRL loss_type sigmoid"
    assert plain["method"] == "rl: advantage=rloo" and plain["paper"] is None

    papers = rows("--root", str(root), "--papers")
    assert sorted(r["path"] for r in papers) == ["recipes/papers/l.yaml", "recipes/papers/m.yaml",
                                                 "recipes/papers/t.yaml"]
    table = runner.invoke(app, ["recipes", "--papers", "--root", str(root)]).output
    assert "paper recipes (3)" in table and "simpo + dpo_nll x0.5" in table and "org/m-7b" in table
    assert "plain.yaml" not in table


def test_every_paper_recipe_has_its_paper_model_and_method():
    papers = {r["path"]: r for r in rows("--papers")}
    files = sorted(f"recipes/papers/{p.name}" for p in (REPO / "recipes" / "papers").glob("*.yaml"))
    assert sorted(papers) == files
    for path, row in papers.items():
        raw = yaml.safe_load((REPO / path).read_text())
        assert row["paper"] == raw["paper"]["title"] and row["arxiv"] == str(raw["paper"]["arxiv"]), path
        if raw.get("command") == "pipeline":  # a paper reproduced as stages: its stage recipes name model and method
            assert row["method"] == "pipeline" and raw["stages"], path
            continue
        assert row["model"] == raw["model"]["name_or_path"], path
        # The method column names what the recipe itself chooses: its method, its losses or its rl: parts.
        chosen = raw.get("method") or raw.get("loss") or raw.get("rl")
        first = chosen if isinstance(chosen, str) else (chosen[0] if isinstance(chosen, list) else chosen)
        name = first if isinstance(first, str) else first.get("name") or next(iter(first))
        assert str(name) in row["method"], (path, row["method"])
    assert papers["recipes/papers/dapo.yaml"]["method"] == "dapo; rl: policy_loss=dual_clip, shaping=dapo_overlong"
    assert papers["recipes/papers/simpo.yaml"]["method"] == "simpo"
