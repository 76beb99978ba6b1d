"""The README's "Adding a preference loss or an RL part": its own example, run as written, registers a loss and an
advantage estimator that a recipe then names, with no other edit; the registry checks their hyperparameters when
the recipe loads. The values are checked against the formulas written out here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from postrain.errors import RecipeError
from postrain.preference import PREFERENCE, preference_loss
from postrain.jobs import load_recipe
from postrain.rl.advantages import compute_advantages
from postrain.rl.registry import ADVANTAGES
from postrain.variants import all_variants
from tests.conftest import readme_example, write_recipe
from tests.dpo_shapes import TINY_MODEL


@pytest.fixture
def readme_entries(monkeypatch):
    """The README block executed, its registrations undone after the test."""
    monkeypatch.setattr(PREFERENCE, "entries", dict(PREFERENCE.entries))
    monkeypatch.setattr(ADVANTAGES, "entries", dict(ADVANTAGES.entries))
    exec(compile(readme_example("### Adding a preference loss or an RL part"), "README.md", "exec"), {})
    assert "offset_dpo_example" in PREFERENCE and "median_baseline_example" in ADVANTAGES


def test_the_readme_loss_and_advantage_compute_their_formulas(readme_entries):
    torch.manual_seed(0)
    lw, ll, rw, rl = (torch.randn(5) for _ in range(4))
    got = preference_loss("offset_dpo_example", chosen_logps=lw, rejected_logps=ll, ref_chosen_logps=rw,
                          ref_rejected_logps=rl, beta=0.2)
    want = -F.logsigmoid(0.2 * ((lw - rw) - (ll - rl)) - 0.5)
    torch.testing.assert_close(got, want)
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 5.0, 3.0, 4.0, 4.0])
    # medians (lower of the two middle values, as torch.median): group 1 [0, 0, 1, 2] -> 0, group 2 [3, 4, 4, 5] -> 4
    want = torch.tensor([1.0, 0.0, 0.0, 2.0, 1.0, -1.0, 0.0, 0.0]) * 2.0
    torch.testing.assert_close(compute_advantages("median_baseline_example", rewards, 4, scale=2.0), want)
    assert {"offset_dpo_example", "median_baseline_example"} <= {v.name for v in all_variants()}


def test_recipes_name_the_readme_entries_and_their_values_are_checked_at_load(readme_entries, tmp_path):
    dpo = write_recipe(tmp_path / "dpo.yaml", f"defaults: [base/dpo]\n{TINY_MODEL}"
                                              "loss: [{name: offset_dpo_example, beta: 0.2}]\n")
    assert load_recipe(dpo).cfg["loss"][0]["name"] == "offset_dpo_example"
    (tmp_path / "r.py").write_text("def r(completions, **kw):\n    return [0.0 for _ in completions]\n")
    grpo = write_recipe(tmp_path / "grpo.yaml", f"defaults: [base/grpo]\n{TINY_MODEL}rewards: [{{fn: r.py:r}}]\n"
                                                "rl: {advantage: {name: median_baseline_example, scale: 2.0}}\n")
    assert load_recipe(grpo).cfg["rl"]["advantage"]["name"] == "median_baseline_example"
    for bad, message in (("beta: -1", "beta"), ("beta: abc", "beta"), ("ofset: 1", "did you mean 'offset'")):
        write_recipe(dpo, f"defaults: [base/dpo]\n{TINY_MODEL}loss: [{{name: offset_dpo_example, {bad}}}]\n")
        with pytest.raises(RecipeError, match=message):
            load_recipe(dpo)
