"""docs/coverage.md: generated from the catalogs, the registries, the recipes and docs/coverage_exclusions.yaml."""

from __future__ import annotations

import re

import pytest
import yaml

from postrain import coverage
from postrain.variants import all_variants

CATALOG_DIR = coverage.find_catalog_dir()
pytestmark = pytest.mark.skipif(CATALOG_DIR is None, reason="method catalogs (shared/methods) not found; "
                                                             "set POSTRAIN_CATALOGS")


@pytest.fixture(scope="module")
def catalog_rows():
    return {name: coverage.parse_summary_table((CATALOG_DIR / fname).read_text(), name)
            for name, fname in coverage.CATALOG_FILES.items()}


@pytest.fixture(scope="module")
def built():
    return coverage.build(CATALOG_DIR)


def test_parser_finds_every_row_numbered_consecutively(catalog_rows):
    # The counts observed in the catalogs' summary tables; a change in a catalog should be a deliberate update.
    assert {k: len(v) for k, v in catalog_rows.items()} == {"preference": 110, "rl": 87}
    for rows in catalog_rows.values():
        assert [r.number for r in rows] == list(range(1, len(rows) + 1))
    pref = {r.number: r for r in catalog_rows["preference"]}
    assert pref[5].name == "SimPO" and "CPOTrainer" in pref[5].trl
    # `\|` inside a cell is part of the cell, not a column separator.
    assert pref[12].name == "iLR-DPO / R-DPO (length-regularized)" and pref[12].trl == "No"
    assert catalog_rows["rl"][86].name.startswith("Classic PG")


def test_parser_reads_columns_by_header_and_stops_at_the_next_section():
    text = """# Cat
## Summary table
intro
| Name | # | In TRL? |
|---|---|---|
| A \\| B | 1 | Yes `x` |
| C | 2 | No |

## Details
| 3 | not a summary row | |
"""
    rows = coverage.parse_summary_table(text, "t")
    assert [(r.number, r.name, r.trl) for r in rows] == [(1, "A | B", "Yes `x`"), (2, "C", "No")]
    with pytest.raises(ValueError, match="Summary table"):
        coverage.parse_summary_table("# no table here\n| 1 | x |\n", "t")


def test_every_row_is_accounted_for_and_every_tag_names_a_row(built):
    assert built.problems == []
    assert all(c.status in coverage.STATUSES for c in built.rows)
    numbers = {(c.row.catalog, c.row.number) for c in built.rows}
    for v in all_variants():
        for tag in coverage.entry_tags(v):
            catalog, _, row = tag.partition(":")
            assert row in coverage.OUTSIDE_TAGS or (catalog, int(row)) in numbers, (v.name, tag)


def test_rows_carry_their_entries(built):
    by_row = {(c.row.catalog, c.row.number): c for c in built.rows}
    assert by_row["preference", 5].status == "implemented"
    assert by_row["preference", 5].entries == ["preference:simpo"]
    # One entry implementing rows of both catalogs.
    assert "preference:rebel" in by_row["preference", 81].entries and "preference:rebel" in by_row["rl", 64].entries
    assert by_row["rl", 24].status == "not_reproducible" and "α" in by_row["rl", 24].reason


def test_docs_coverage_md_is_up_to_date(built):
    assert coverage.DOC.read_text() == coverage.render(built), "run `python -m postrain.coverage`"


def _exclusions(tmp_path, edit):
    data = yaml.safe_load(coverage.EXCLUSIONS.read_text())
    edit(data)
    path = tmp_path / "exclusions.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def test_a_row_without_reason_or_a_stale_exclusion_is_a_problem(tmp_path):
    def edit(data):
        del data["preference"][22]  # ASFT: no entry, no recipe, now no reason
        data["preference"][5] = {"status": "not_yet", "reason": "x"}  # SimPO is implemented
        data["rl"][999] = {"status": "not_yet", "reason": "no such row"}
        data["rl"][24]["reasn"] = "typo"

    problems = coverage.build(CATALOG_DIR, _exclusions(tmp_path, edit)).problems
    text = "\n".join(problems)
    assert "preference row 22 (ASFT) is unaccounted for" in text
    assert "preference row 5 (SimPO) is implemented now (preference:simpo): remove its status" in text
    assert "rl row 999 is not in rl-methods.md" in text
    assert "unknown key 'reasn'" in text
    assert len(problems) == 4


def test_recipes_match_rows_by_arxiv_and_make_a_row_composed(tmp_path):
    recipes = tmp_path / "recipes"
    (recipes / "papers").mkdir(parents=True)
    (recipes / "papers" / "simpo.yaml").write_text(
        "command: dpo\npaper: {title: SimPO, arxiv: 'arXiv:2405.14734v2'}\n")
    (recipes / "papers" / "pre_dpo.yaml").write_text("command: dpo\npaper: {title: Pre-DPO, arxiv: '2504.00001'}\n")

    def edit(data):
        data["preference"][27]["arxiv"] = "2504.00001"
        data["preference"][27]["status"] = "not_yet"  # as the row read before recipes/papers/pre_dpo.yaml

    cov = coverage.build(CATALOG_DIR, _exclusions(tmp_path, edit), recipes)
    by_row = {(c.row.catalog, c.row.number): c for c in cov.rows}
    assert by_row["preference", 5].recipes == ["recipes/papers/simpo.yaml"]
    assert by_row["preference", 5].status == "implemented"
    assert by_row["preference", 27].status == "composed"
    assert by_row["preference", 27].recipes == ["recipes/papers/pre_dpo.yaml"]
    # Row 27 carrying `status: not_yet` in the exclusions is stale once a recipe composes it.
    assert any("preference row 27" in p and "composed now" in p for p in cov.problems)
    assert re.search(r"\| 27 \| Pre-DPO \|.*\| composed \|", coverage.render(cov))


def test_check_fails_on_a_stale_document(tmp_path, built, capsys):
    doc = tmp_path / "coverage.md"
    doc.write_text(coverage.render(built))
    assert coverage.main(["--check", "--output", str(doc), "--catalogs", str(CATALOG_DIR)]) == 0
    doc.write_text(coverage.render(built).replace("| 5 | SimPO |", "| 5 | SimPO (edited) |"))
    assert coverage.main(["--check", "--output", str(doc), "--catalogs", str(CATALOG_DIR)]) == 1
    assert "is stale" in capsys.readouterr().err


def test_a_not_reproducible_row_must_name_its_searches(tmp_path):
    def edit(data):
        del data["preference"][35]["searched"]  # BVPO: the claim without the look-ups behind it
        data["rl"][24]["searched"] = "one string, not a list"
        data["rl"][30]["searched"] = ["find_string: 'x'", ""]

    problems = coverage.build(CATALOG_DIR, _exclusions(tmp_path, edit)).problems
    text = "\n".join(problems)
    assert "preference row 35 (BVPO) is not_reproducible without the searches that support it" in text
    assert "rl row 24 (SEED-GRPO): `searched` must be a list" in text
    assert "rl row 30" in text and len(problems) == 3
    # a not_yet row needs no searches (it may still carry them)
    by_row = {(c.row.catalog, c.row.number): c for c in coverage.build(CATALOG_DIR).rows}
    assert by_row["preference", 42].status == "not_yet" and not by_row["preference", 42].searched


def test_every_not_reproducible_row_shows_its_searches_in_the_document(built):
    rows = [c for c in built.rows if c.status == "not_reproducible"]
    assert rows and all(c.searched for c in rows)
    text = coverage.render(built)
    for c in rows:
        line = next(line for line in text.splitlines() if line.startswith(f"| {c.row.number} | "
                                                                          f"{coverage._md(c.row.name)} |"))
        assert "| not reproducible |" in line and "Searched: " in line, line[:120]
    # rows re-examined against the authors' code (issue 17) and implemented since
    by_row = {(c.row.catalog, c.row.number): c for c in built.rows}
    assert by_row["preference", 16].entries == ["preference:mipo"]
    assert by_row["rl", 31].entries == ["shaping:hapo_length"]
    assert by_row["rl", 87].entries == ["policy_loss:discovered_po"]
    assert by_row["rl", 15].entries == by_row["preference", 104].entries == ["policy_loss:trpa"]
    assert by_row["preference", 23].entries == ["preference:sgdpo"]
    assert by_row["preference", 67].entries == ["preference:selm"]
    assert by_row["preference", 87].entries == ["preference:sdpo_segment"]
    for number, recipe in ((23, "sgdpo"), (67, "selm"), (87, "sdpo_segment")):
        assert by_row["preference", number].recipes == [f"recipes/papers/{recipe}.yaml"]


def test_an_efficiency_row_is_composed_by_a_recipe_that_turns_the_trainer_option_on(built):
    # Prefix Grouper (rl 76) changes how the numbers are computed, never which: no registry entry computes it, so
    # the row is `composed` by the recipe that switches the trainer's shared-prefix forward on; that recipe must
    # really switch it on, and the module named in the row's note must exist.
    from postrain.jobs import load_recipe
    from postrain.trainers import shared_prefix

    by_row = {(c.row.catalog, c.row.number): c for c in built.rows}
    row = by_row["rl", 76]
    assert row.status == "composed" and row.recipes == ["recipes/papers/prefix_grouper.yaml"]
    assert "trainer.shared_prefix" in row.reason and "postrain/trainers/shared_prefix.py" in row.reason
    assert shared_prefix.__file__.endswith("postrain/trainers/shared_prefix.py")
    recipe = load_recipe(coverage.REPO / row.recipes[0], command="grpo", liveness=False)
    assert recipe.cfg["trainer"]["shared_prefix"] is True
