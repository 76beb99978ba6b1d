"""Preference methods composed from existing parts (docs/coverage.md "composed"): APO's (Accelerated Preference
Optimization) extrapolation between iterative-DPO iterates. The recipe itself runs under --smoke in
tests/test_smoke_recipes.py (-k apo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from postrain.jobs import load_recipe
from tests.conftest import REPO
from tests.test_merging import _load

APO = REPO / "recipes/papers/apo.yaml"


def _stage_name(reference: str) -> str:
    assert reference.startswith("${stages.") and reference.endswith(".output}"), reference
    return reference.removeprefix("${stages.").removesuffix(".output}")


def _apo_stages() -> dict:
    return yaml.safe_load(APO.read_text())["stages"]


# --- APO: theta_{t+1} = theta_hat_{t+1} + alpha (theta_hat_{t+1} - theta_hat_t) -----------------------------------

def test_apo_merge_stage_is_the_nesterov_extrapolation(tmp_path):
    """The merge stage, with the weights the pipeline gives it, on two tiny models equals
    theta_hat_{t+1} + alpha (theta_hat_{t+1} - theta_hat_t) computed here by hand, with alpha the documented 0.3."""
    from postrain.merging import run_mergekit
    from postrain.models.loading import resolve_model_path
    from postrain.jobs.smoke import SMOKE_TINY

    overrides = _apo_stages()["extrapolate_r2"]["overrides"]
    (entry,) = overrides["merge.models"]
    alpha = entry["parameters"]["weight"] - 1.0
    assert alpha == pytest.approx(0.3)

    previous, current = (resolve_model_path("tiny", {**SMOKE_TINY, "seed": seed}) for seed in (0, 1))
    recipe = load_recipe(REPO / "recipes/papers/apo/merge.yaml", {
        "merge": {"base_model": previous, "models": [{**entry, "model": current}]}}, "merge")
    merged, _ = _load(run_mergekit(recipe.cfg["merge"], tmp_path / "merged"))
    theta_prev, theta_hat = _load(Path(previous))[0], _load(Path(current))[0]
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, theta_hat[key] + alpha * (theta_hat[key] - theta_prev[key]), msg=key)
    # the step goes beyond theta_hat (a plain copy of theta_hat or an average would pass the shapes, not this)
    key = "model.embed_tokens.weight"
    assert not torch.equal(merged[key], theta_hat[key])


def test_apo_pipeline_extrapolates_between_consecutive_dpo_outputs():
    """Nesterov's step is between the proximal (DPO) outputs theta_hat_t, theta_hat_{t+1}, not from the extrapolated
    theta_t; each iteration samples from, trains from and is referenced to the previous extrapolated model."""
    stages = _apo_stages()
    rounds = sorted(int(name.removeprefix("train_r")) for name in stages if name.startswith("train_r"))
    assert rounds == [1, 2, 3]
    weights = set()
    for r in rounds:
        merge = stages[f"extrapolate_r{r}"]
        assert merge["command"] == "merge"
        (entry,) = merge["overrides"]["merge.models"]
        assert _stage_name(entry["model"]) == f"train_r{r}"
        weights.add(entry["parameters"]["weight"])
        if r == 1:  # theta_hat_1 is the starting model: the merge recipe's own base_model
            assert "merge.base_model" not in merge["overrides"]
        else:
            assert _stage_name(merge["overrides"]["merge.base_model"]) == f"train_r{r - 1}"
            for stage in (f"sample_r{r}", f"train_r{r}"):
                assert _stage_name(stages[stage]["overrides"]["model.name_or_path"]) == f"extrapolate_r{r - 1}"
        assert _stage_name(stages[f"train_r{r}"]["overrides"]["data.train.source"].split("/")[0]) == f"sample_r{r}"
    assert len(weights) == 1  # one alpha for all iterations

    train = load_recipe(REPO / "recipes/papers/apo/train.yaml").cfg
    start = load_recipe(REPO / "recipes/papers/apo/merge.yaml").cfg["merge"]["base_model"]
    assert train["ref_model"] is None  # TRL's frozen copy of the stage's start: the reference is pi_t
    assert start == train["model"]["name_or_path"]  # round 1 extrapolates away from the model it started from
