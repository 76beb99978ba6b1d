"""The registries as a user meets them: `postrain variants`, metadata read from signatures, load-time checks."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from postrain.cli import app
from postrain.errors import RecipeError
from postrain.registry import FAMILIES, REGISTRIES, Registry
from postrain.variants import all_variants

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
        del FAMILIES["test-only-family"], REGISTRIES["test-only-family"]


def test_a_family_of_building_blocks_allows_entries_without_a_paper_and_is_not_a_method_part():
    reg = Registry("test-block-family", papers=False)
    try:
        @reg.register("block")
        def block(rows, *, k: int = 2):
            """Keeps k rows."""
            return rows[:k]

        assert reg.get("block").paper == "" and reg.call("block", {"rows": [1, 2, 3]}, {}) == [1, 2]
        assert "test-block-family" in REGISTRIES and "test-block-family" not in FAMILIES
        assert all(v.family != "test-block-family" for v in all_variants())
        with pytest.raises(RecipeError, match="parameter 'k'"):
            reg.check_params("block", {"k": "two"})
    finally:
        del REGISTRIES["test-block-family"]


def test_reference_free_preference_losses_take_no_reference_inputs():
    from postrain.preference import PREFERENCE

    for name in ("simpo", "orpo", "repo", "cpl", "contrastive_po"):
        assert not any(d.startswith("ref_") for d in PREFERENCE.get(name).data), name
    assert PREFERENCE.get("dpo").needs("ref_chosen_logps")


def test_parameters_are_typed_by_their_annotations_and_ranged_by_declarations():
    reg = Registry("test-ranged-family", ranges={"epsilon": "> 0", "unused": ">= 0"})
    try:
        @reg.register("toy", paper="A Toy", arxiv="0000.00000", ranges={"p": "in [0, 1)"})
        def toy(x, *, epsilon: float = 0.2, p: float = 0.5, k: int = 3, mode: str = "a", flag: bool = False,
                high: float | None = None):
            return x

        assert reg.get("toy").ranges == {"epsilon": "> 0", "p": "in [0, 1)"}  # the family's, for its parameters
        reg.check_params("toy", {"epsilon": 1, "p": 0.0, "k": 2, "mode": "b", "flag": True, "high": None})
        for params, message in [
            ({"epsilon": "abc"}, "parameter 'epsilon' of test-ranged-family 'toy' .* must be float, got str 'abc'"),
            ({"epsilon": 0}, "'epsilon' .* must be > 0, got 0"),
            ({"epsilon": float("nan")}, "'epsilon' .* must be > 0, got nan"),
            ({"p": 1.0}, r"'p' .* must be in \[0, 1\), got 1.0"),
            ({"k": 2.5}, "'k' .* must be int, got float 2.5"),
            ({"flag": "yes"}, "'flag' .* must be bool"),
            ({"high": "x"}, r"'high' .* must be float \| null"),
        ]:
            with pytest.raises(RecipeError, match=message):
                reg.check_params("toy", params, where="loss[0]")
        assert reg.call("toy", {"x": 7}, {"epsilon": -1}) == 7  # trainers pass computed values: not checked here
        with pytest.raises(ValueError, match="declares a range for 'gamma'"):
            reg.register("bad", paper="p", arxiv="a", ranges={"gamma": "> 0"})(toy)
        with pytest.raises(ValueError, match="is not of the form"):
            reg.register("bad2", paper="p", arxiv="a", ranges={"p": "positive"})(toy)
    finally:
        del FAMILIES["test-ranged-family"], REGISTRIES["test-ranged-family"]


def test_every_entry_default_fits_its_own_types_and_ranges():
    from postrain.value_types import check_value

    for variant in all_variants():
        types = variant.param_types
        for name, default in variant.params.items():
            if default is None:
                continue
            value = list(default) if isinstance(default, tuple) else default  # a recipe writes a list
            check_value(value, types[name], variant.ranges.get(name), f"{variant.family} {variant.name} {name}")


def test_a_class_entry_takes_its_hyperparameters_from_its_init():
    """Rewards register classes: the keyword-only parameters of __init__ are the entry's hyperparameters, typed by
    their annotations there (the class's own annotations are its attributes')."""
    reg = Registry("test-class-family", papers=False)
    try:
        @reg.register("counter")
        class Counter:
            """Counts to k."""

            label: str = "x"

            def __init__(self, *, k: int = 2, step: float | None = None):
                self.k, self.step = k, step

        variant = reg.get("counter")
        assert variant.params == {"k": 2, "step": None} and variant.data == {}
        assert variant.param_types == {"k": int, "step": float | None}
        assert variant.description == "Counts to k." and Counter.variant is variant
        with pytest.raises(RecipeError, match="parameter 'k' of test-class-family 'counter' must be int, got str"):
            reg.check_params("counter", {"k": "two"})
        with pytest.raises(RecipeError, match="unknown parameter 'label'"):
            reg.check_params("counter", {"label": "y"})
    finally:
        del REGISTRIES["test-class-family"]


def test_rewards_and_tasks_are_building_blocks_not_listed_as_method_parts():
    import postrain.data.sources  # noqa: F401  (registers the built-in tasks, arithmetic_thoughts included)
    import postrain.rewards  # noqa: F401  (registers the built-in rewards)

    assert {"reward", "task"} <= set(REGISTRIES) and not {"reward", "task"} & set(FAMILIES)
    assert len(REGISTRIES["reward"]) >= 6 and len(REGISTRIES["task"]) >= 4
    rows = json.loads(runner.invoke(app, ["variants", "--json"]).output)
    assert not {"reward", "task"} & {r["family"] for r in rows}
