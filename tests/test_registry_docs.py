"""docs/registry/: one page per registry family, generated from the registry metadata and kept up to date."""

from __future__ import annotations

import re

import pytest

from postrain import registry_docs
from postrain.registry import FAMILIES
from postrain.variants import all_variants


@pytest.fixture(scope="module")
def pages():
    return registry_docs.pages()


def test_docs_registry_is_up_to_date(pages):
    assert registry_docs.stale(pages, registry_docs.DOCS) == [], "run `python -m postrain.registry_docs`"


def test_one_page_per_family_with_a_section_per_entry(pages):
    families = {v.family for v in all_variants()}
    assert set(pages) == {registry_docs.INDEX} | {f"{f}.md" for f in families}
    assert families == set(FAMILIES)
    for v in all_variants():
        assert f"\n## {v.name}\n" in pages[f"{v.family}.md"], (v.family, v.name)
        assert f"[{v.family}]({v.family}.md)" in pages[registry_docs.INDEX]


def entry(page: str, name: str) -> dict[str, str]:
    """The `| key | value |` rows of an entry's section."""
    body = page.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| ([^|]+?) \| (.+) \|$", body, flags=re.M))


def test_pages_carry_the_papers_defaults_and_how_a_recipe_names_an_entry(pages):
    # SimPO's paper defaults (the authors' Llama-3-8B-Base config: beta 2.0, gamma/beta 0.5).
    simpo = entry(pages["preference.md"], "simpo")
    assert simpo["hyperparameters (paper defaults)"] == "`beta=2.0`, `gamma=1.0`"
    assert simpo["in a recipe"] == "`loss: [{name: simpo, beta: 2.0, gamma: 1.0}]`"
    assert "2405.14734" in simpo["paper"] and "recipes/papers/simpo.yaml" in simpo["recipes (same paper)"]
    assert entry(pages["preference.md"], "dpo")["TRL equivalent"] == "`loss_type=sigmoid`"
    assert entry(pages["regularizer.md"], "kl_k1")["TRL equivalent"] == "none"
    # DAPO's clip-higher (0.2 / 0.28) and overlong shaping, as the named method expands.
    dapo = entry(pages["method.md"], "dapo")
    assert "epsilon: 0.2, epsilon_high: 0.28" in dapo["expands to"] and "dapo_overlong" in dapo["expands to"]
    assert dapo["in a recipe"].startswith("`method: {name: dapo,")
    assert entry(pages["advantage.md"], "grpo")["in a recipe"] == "`rl: {advantage: grpo}`"


def test_check_reports_stale_missing_and_left_over_pages(tmp_path, pages):
    for name, text in pages.items():
        (tmp_path / name).write_text(text)
    assert registry_docs.main(["--check", "--output", str(tmp_path)]) == 0
    (tmp_path / "preference.md").write_text(pages["preference.md"].replace("`beta=2.0`", "`beta=3.0`"))
    (tmp_path / "sampler.md").unlink()
    (tmp_path / "old_family.md").write_text("# gone\n")
    problems = registry_docs.stale(pages, tmp_path)
    assert problems == [f"{tmp_path / 'preference.md'} is stale", f"{tmp_path / 'sampler.md'} is missing",
                        f"{tmp_path / 'old_family.md'} is not a page of any registry family (remove it)"]
    assert registry_docs.main(["--check", "--output", str(tmp_path)]) == 1
