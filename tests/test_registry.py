"""The registries as a user meets them: `postrain variants`, metadata read from signatures, load-time checks."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from postrain.cli import app
from postrain.errors import RecipeError
from postrain.registry import FAMILIES, Registry, all_variants

runner = CliRunner()


def test_variants_json_lists_every_entry_with_paper_metadata():
    result = runner.invoke(app, ["variants", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == len(all_variants())
    for row in rows:
        assert {"name", "family", "paper", "arxiv", "params", "data"} <= set(row)
        assert row["paper"] and row["arxiv"], row["name"]
    names = [(r["family"], r["name"]) for r in rows]
    assert len(names) == len(set(names))
    families = {r["family"] for r in rows}
    assert {"preference", "advantage", "policy_loss", "aggregation", "regularizer", "shaping", "sampler"} <= families


def test_variants_family_filter_and_unknown_family():
    rows = json.loads(runner.invoke(app, ["variants", "--family", "preference", "--json"]).output)
    assert rows and all(r["family"] == "preference" for r in rows)
    assert any(r["name"] == "simpo" and r["params"]["beta"] == 2.0 for r in rows)
    bad = runner.invoke(app, ["variants", "--family", "preferense"])
    assert bad.exit_code == 2 and "did you mean 'preference'" in bad.output
    table = runner.invoke(app, ["variants", "--family", "advantage"]).output
    assert "grpo" in table and "2402.03300" in table


def test_params_and_data_come_from_the_signature():
    reg = Registry("test-only-family")
    try:
        @reg.register("toy", paper="A Toy", arxiv="0000.00000")
        def toy(x, y=None, *, alpha: float = 0.5, gamma: float | None = None):
            """Toy: x·alpha."""
            return x * alpha

        variant = reg.get("toy")
        assert variant.params == {"alpha": 0.5, "gamma": None}
        assert variant.data == {"x": True, "y": False}
        assert variant.description == "Toy: x·alpha."
        assert reg.call("toy", {"x": 2.0, "unused": 1}, {"alpha": 3.0}) == 6.0
        with pytest.raises(RecipeError, match="unknown parameter 'alpah' for test-only-family 'toy'.*alpha"):
            reg.check_params("toy", {"alpah": 1})
        with pytest.raises(RecipeError, match="unknown test-only-family 'tyo'.*did you mean 'toy'"):
            reg.get("tyo")
        with pytest.raises(ValueError, match="needs x"):
            reg.call("toy", {}, {})
        with pytest.raises(ValueError, match="registered twice"):
            reg.register("toy", paper="p", arxiv="a")(toy)
        with pytest.raises(ValueError, match="paper title and arXiv id"):
            reg.register("nometa", paper="", arxiv="")(toy)
    finally:
        del FAMILIES["test-only-family"]


def test_reference_free_preference_losses_take_no_reference_inputs():
    from postrain.preference import PREFERENCE

    for name in ("simpo", "orpo", "repo", "cpl", "contrastive_po"):
        assert not any(d.startswith("ref_") for d in PREFERENCE.get(name).data), name
    assert PREFERENCE.get("dpo").needs("ref_chosen_logps")
