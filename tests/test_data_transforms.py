"""The data transforms' registry (postrain.data.transforms): a transform is one registered function, found by
`transform: <name>`, its settings checked against its signature when the recipe loads, its facts on its entry."""

from __future__ import annotations

import dataclasses

import pytest

from postrain.data.source_spec import SourceSpec
from postrain.data.sources import check_source_options, load_source, source_size
from postrain.data.transforms import TRANSFORMS, keys_besides_fields
from postrain.errors import DataError, RecipeError
from postrain.jobs import load_recipe
from tests.conftest import write_recipe

SFT = "defaults: [base/sft]\nmodel: {name_or_path: tiny}\n"
ARITHMETIC = {"source": "builtin:arithmetic", "task": {"n": 12, "digits": 1}}


@pytest.fixture
def truncate():
    """README's "Adding a data transform" example, registered for one test, then removed."""

    @TRANSFORMS.register("truncate", section="pairing", rows_per_row=1, ranges={"max_chars": ">= 1"})
    def truncate(rows: list[dict], where: str, *, max_chars: int = 100) -> list[dict]:
        """Each completion cut to its first `max_chars` characters."""
        return [{**row, "completion": row["completion"][:max_chars]} for row in rows]

    try:
        yield truncate
    finally:
        del TRANSFORMS.entries["truncate"]


def test_a_registered_transform_loads_with_no_other_edit(tmp_path, truncate):
    plain = load_source(ARITHMETIC, "sft", where="data.train")
    spec = {**ARITHMETIC, "transform": "truncate", "pairing": {"max_chars": 1}}
    cut = load_source(spec, "sft", where="data.train")
    assert cut["completion"] == [c[:1] for c in plain["completion"]]
    assert any(len(c) > 1 for c in plain["completion"])  # the cut cuts something
    assert cut["prompt"] == plain["prompt"]
    assert source_size(spec) == len(plain)  # rows_per_row=1: the size is known before it runs
    assert load_source({**spec, "pairing": None}, "sft")["completion"] == plain["completion"]  # its default, 100
    # a recipe naming it loads, its keys checked against its signature
    recipe = write_recipe(tmp_path / "toy.yaml", SFT + "data: {train: {source: builtin:arithmetic, "
                                                       "transform: truncate, pairing: {max_chars: 20}}}\n")
    assert load_recipe(recipe, [], "sft").cfg["data"]["train"]["pairing"] == {"max_chars": 20}
    with pytest.raises(RecipeError, match=r"data\.train\.pairing\.max_chars: must be int, got str"):
        load_recipe(recipe, ["data.train.pairing.max_chars=many"], "sft")
    with pytest.raises(RecipeError, match=r"data\.train\.pairing\.max_chars: must be >= 1, got 0"):
        load_recipe(recipe, ["data.train.pairing.max_chars=0"], "sft")
    with pytest.raises(RecipeError, match=r"unknown key 'data\.train\.pairing\.max_char': did you mean 'max_chars'"):
        load_recipe(recipe, ["data.train.pairing.max_char=1"], "sft")
    with pytest.raises(RecipeError, match=r"pairing\.min_margin: read by transform score_pairs only, not by 'trunc"):
        load_recipe(recipe, ["data.train.pairing.min_margin=1"], "sft")


def test_a_transform_with_a_section_of_its_own_needs_no_schema_edit(tmp_path):
    """A new section name is a source key as soon as an entry owns it: the schema reads the source's keys from the
    registry (no SourceSpec field), and the registry's checks apply to it."""
    @TRANSFORMS.register("clip", section="clipping", rows_per_row=1, ranges={"max_chars": ">= 1"})
    def clip(rows: list[dict], where: str, *, max_chars: int = 100) -> list[dict]:
        return [{**row, "completion": row["completion"][:max_chars]} for row in rows]

    recipe = write_recipe(tmp_path / "toy.yaml", SFT + "data: {train: {source: builtin:arithmetic, "
                                                       "transform: clip, clipping: {max_chars: 1}}}\n")
    try:
        loaded = load_recipe(recipe, [], "sft")
        assert loaded.cfg["data"]["train"]["clipping"] == {"max_chars": 1}
        cut = load_source(loaded.cfg["data"]["train"], "sft", where="data.train")
        assert set(map(len, cut["completion"])) == {1}
        with pytest.raises(RecipeError, match=r"data\.train\.clipping\.max_chars: must be >= 1, got 0"):
            load_recipe(recipe, ["data.train.clipping.max_chars=0"], "sft")
        typo = write_recipe(tmp_path / "typo.yaml", SFT + "data: {train: {source: builtin:arithmetic, "
                                                          "transform: clip, cliping: {max_chars: 1}}}\n")
        with pytest.raises(RecipeError, match=r"unknown key 'data\.train\.cliping' .*did you mean 'clipping'"):
            load_recipe(typo, [], "sft")
        with pytest.raises(RecipeError, match=r"data\.train\.clipping: set only with transform: clip"):
            load_recipe(recipe, ["data.train.transform=null"], "sft")
    finally:
        del TRANSFORMS.entries["clip"]
    with pytest.raises(RecipeError, match=r"unknown key 'data\.train\.clipping'"):  # no entry owns it any more
        load_recipe(recipe, ["data.train.transform=null"], "sft")


def test_the_package_imports_every_transform_module():
    """A transform file is found by being in the folder: no import list to extend."""
    import pkgutil
    import sys

    import postrain.data.transforms as package

    modules = [m.name for m in pkgutil.iter_modules(package.__path__)]
    assert {"pairing", "steps", "best_of_k", "registry"} <= set(modules)
    assert all(f"postrain.data.transforms.{name}" in sys.modules for name in modules)
    # each module but the registry's registers entries, and every shipped entry comes from one of them
    assert {variant.fn.__module__ for variant in TRANSFORMS} == \
        {f"postrain.data.transforms.{name}" for name in modules if name != "registry"}


def test_an_empty_result_says_why(tmp_path):
    @TRANSFORMS.register("drop_all", rows_per_row=None, empty="it drops every row")
    def drop_all(rows: list[dict], where: str) -> list[dict]:
        return []

    try:
        with pytest.raises(DataError, match=r"data\.train: transform 'drop_all' made no rows: it drops every row "
                                            r"\(in builtin:arithmetic \[train\]\)"):
            load_source({**ARITHMETIC, "transform": "drop_all"}, "sft", where="data.train")
    finally:
        del TRANSFORMS.entries["drop_all"]


def test_an_unknown_transform_is_refused_with_the_closest_names(tmp_path):
    recipe = write_recipe(tmp_path / "bad.yaml", SFT + "data: {train: {source: x.jsonl, transform: best_of_kk}}\n")
    with pytest.raises(RecipeError, match=r"unknown data transform 'best_of_kk' \(data\.train\.transform\): "
                                          r"did you mean 'best_of_k'"):
        load_recipe(recipe, [], "sft")


@pytest.mark.parametrize("spec, message", [
    # a key the transform does not read, read by another transform of the same section
    ({"transform": "step_prefixes", "steps": {"prefix_column": "a"}},
     r"data\.train\.steps\.prefix_column: read by transform step_pairs only, not by 'step_prefixes'"),
    # types from the annotation, ranges from the entry
    ({"transform": "score_pairs", "pairing": {"all_pairs": "yes"}}, r"data\.train\.pairing\.all_pairs: must be bool"),
    ({"transform": "score_pairs", "pairing": {"min_margin": -1}}, r"data\.train\.pairing\.min_margin: must be >= 0"),
    ({"transform": "thought_dropout", "thought_dropout": {"seed": 1.5}}, r"data\.train\.thought_dropout\.seed: must be int"),
    # a section read by no transform of the source
    ({"transform": "score_lists", "pairing": {"score": "s"}},
     r"data\.train\.pairing: set only with transform: score_pairs or win_rate_pairs \(transform is 'score_lists'\)"),
])
def test_settings_are_checked_against_the_signature(spec, message):
    with pytest.raises(RecipeError, match=message):
        check_source_options({"source": "x.jsonl", **spec}, "data.train")


def test_every_entry_states_its_facts_and_keys_a_source_has():
    # the keys a transform owns are a source's keys besides SourceSpec's own fields (the schema is handed them from
    # the registry: keys_besides_fields), never one of those fields
    source_fields = {f.name for f in dataclasses.fields(SourceSpec)}
    accepted = keys_besides_fields(SourceSpec)
    for variant in TRANSFORMS:
        assert "rows_per_row" in variant.extra, f"{variant.name}: say whether its size is known before it runs"
        owned = variant.extra.get("section") or None
        keys = [owned] if owned else list(variant.params)
        assert set(keys) <= set(accepted), f"{variant.name} reads {keys}, not all of them source keys"
        assert not set(keys) & source_fields, f"{variant.name} reads {keys}: a SourceSpec field is not its to read"
        assert set(variant.data) <= {"rows", "dataset", "where", "source", "prompt_template", "solution_rows"}
        for model_key in variant.extra.get("models", ()):
            assert model_key in variant.params


def test_source_size_follows_the_entry(tmp_path):
    pairs = {"source": "builtin:arithmetic", "task": {"n": 12, "digits": 1}}
    n = len(load_source(pairs, "dpo"))
    assert source_size({**pairs, "transform": "unpair"}) == 2 * n == len(load_source({**pairs, "transform": "unpair"},
                                                                                      "dpo"))
    assert source_size({**pairs, "transform": "score_pairs"}) is None  # known once scored


def test_model_settings_of_a_transform_are_checked_as_model_is(tmp_path):
    """implicit_reward_pairs' `models=("policy", "reference")`: their keys and types are ModelSpec's."""
    recipe = write_recipe(tmp_path / "dice.yaml", "defaults: [base/dpo]\nmodel: {name_or_path: tiny}\ndata: {train: "
                          "{source: x.jsonl, transform: implicit_reward_pairs, implicit_reward: {policy: "
                          "{name_or_path: tiny}, reference: {name_or_path: tiny}}}}\n")
    assert load_recipe(recipe, [], "dpo").cfg["data"]["train"]["implicit_reward"]["policy"] == {"name_or_path": "tiny"}
    with pytest.raises(RecipeError, match=r"unknown key 'data\.train\.implicit_reward\.policy\.dtyp'.*'dtype'"):
        load_recipe(recipe, ["data.train.implicit_reward.policy.dtyp=float32"], "dpo")
    with pytest.raises(RecipeError, match=r"data\.train\.implicit_reward\.reference\.dtype"):
        load_recipe(recipe, ["data.train.implicit_reward.reference.dtype=float33"], "dpo")
