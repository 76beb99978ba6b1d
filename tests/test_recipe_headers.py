"""A paper recipe is a claim about a paper: its header says where each figure it sets comes from.

Every recipe file directly under recipes/papers/ has the three parts of the header (`# Sources:`, `# Figures set
here, with their source:`, `# Differs from ...:`), and every number the recipe sets appears in its header, where
the line that names it gives its source (a value the header never mentions is a figure with no stated source).
A percentage in the header counts as its fraction ("10% warm-up" is warmup_steps 0.1). Not checked: the pipeline
plumbing under `stages:` (chunk indexes, stage numbers) and postrain's own run-safety settings (`reward_errors`,
`health`), which have no counterpart in a paper.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

PAPERS = Path(__file__).resolve().parent.parent / "recipes" / "papers"
RECIPES = sorted(PAPERS.glob("*.yaml"))
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(%?)")
NOT_FIGURES = ("stages", "reward_errors", "health")


def header_of(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.startswith("#"))


def numbers_in(text: str) -> set[float]:
    found = set()
    for match in NUMBER.finditer(text):
        value = float(match.group(0).rstrip("%"))
        found.add(value / 100 if match.group(1) else value)
    return found


def numeric_leaves(node, path: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from numeric_leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from numeric_leaves(value, f"{path}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


def test_the_paper_recipes_are_found():
    assert len(RECIPES) >= 90


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_the_header_has_sources_figures_and_differences(recipe):
    header = header_of(recipe.read_text())
    for part in (r"^# Sources\b", r"^# Figures set here, with their source:", r"^# Differs from (the )?"):
        assert re.search(part, header, flags=re.M), f"{recipe.name}: no {part!r} part in the header"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_number_the_recipe_sets_is_in_its_header(recipe):
    text = recipe.read_text()
    stated = numbers_in(header_of(text))
    unstated = [f"{path}={value}" for path, value in numeric_leaves(yaml.safe_load(text))
                if not path.startswith(NOT_FIGURES) and float(value) not in stated]
    assert not unstated, f"{recipe.name} sets figures its header does not name: {unstated}"


def test_the_checks_see_a_missing_figure_and_a_percentage():
    assert numbers_in("# lr 5e-7, 10% warm-up, batch 64") == {5e-7, 0.1, 64.0}
    leaves = dict(numeric_leaves({"trainer": {"learning_rate": 5.0e-7, "bf16": True}, "loss": [{"beta": 0.1}]}))
    assert leaves == {"trainer.learning_rate": 5.0e-7, "loss[0].beta": 0.1}
