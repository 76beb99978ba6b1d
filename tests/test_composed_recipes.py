"""Methods composed from existing parts (docs/coverage.md "composed"): TON's thought-dropout transform, Preference
Vector's task-arithmetic merge and multi-objective GRPO's weighted rewards. The recipes themselves run under --smoke
in tests/test_smoke_recipes.py (-k "ton or preference_vector or multi_objective")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from postrain.data.sources import check_source_options, load_source
from postrain.data.transforms.thought_dropout import drop_thoughts
from postrain.errors import DataError, RecipeError
from postrain.jobs import load_recipe
from tests.conftest import REPO
from tests.test_merging import _load

THOUGHT = "<think>15+56=71</think><answer>71</answer>"


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"q{i}", "completion": f"<think>step {i}</think><answer>{i}</answer>"} for i in range(n)]


# --- TON: thought dropout --------------------------------------------------------------------------------------

def test_thought_dropout_empties_the_thought_in_the_authors_format():
    out = drop_thoughts([{"prompt": "15+56=", "completion": THOUGHT}], "data.train", p=1.0)
    # kokolerk/TON sft_grpo_data.py: f'<think>\n\n</think><action>{solution}</action>'
    assert out[0]["completion"] == "<think>\n\n</think><answer>71</answer>"
    assert out[0]["thought_dropped"] is True
    kept = drop_thoughts([{"prompt": "15+56=", "completion": THOUGHT}], "data.train", p=0.0)
    assert kept[0]["completion"] == THOUGHT and kept[0]["thought_dropped"] is False


def test_thought_dropout_fraction_and_seed():
    rows = _rows(2000)
    out = drop_thoughts(rows, "data.train", p=0.5, seed=3)
    dropped = [r["thought_dropped"] for r in out]
    assert 0.46 < sum(dropped) / len(dropped) < 0.54  # binomial(2000, 0.5): sd 0.011
    for row, new in zip(rows, out):  # only the thought changes; the answer and other columns stay
        expected = row["completion"].split("<think>")[0] + "<think>\n\n</think>" + row["completion"].split("</think>")[1]
        assert new["completion"] == (expected if new["thought_dropped"] else row["completion"])
        assert new["prompt"] == row["prompt"]
    assert drop_thoughts(rows, "x", p=0.5, seed=3) == out  # seeded: the same rows dropped again
    other = [r["thought_dropped"] for r in drop_thoughts(rows, "x", p=0.5, seed=4)]
    assert other != dropped
    low = [r["thought_dropped"] for r in drop_thoughts(rows, "x", p=0.1, seed=3)]
    assert 0.07 < sum(low) / len(low) < 0.13


def test_thought_dropout_in_a_conversation_and_with_other_tags():
    row = {"prompt": "q", "completion": [{"role": "assistant", "content": "<reason>long</reason> 4"}]}
    out = drop_thoughts([row], "x", p=1.0, open_tag="<reason>", close_tag="</reason>", empty_thought="")
    assert out[0]["completion"] == [{"role": "assistant", "content": "<reason></reason> 4"}]
    assert row["completion"][0]["content"] == "<reason>long</reason> 4"  # the input row is not modified


def test_thought_dropout_refuses_a_target_without_a_thought():
    with pytest.raises(DataError, match=r"row 1: .*thought between '<think>' and '</think>'"):
        drop_thoughts([{"completion": THOUGHT}, {"completion": "71"}], "data.train", p=0.5)
    with pytest.raises(DataError, match="needs column 'completion'"):
        drop_thoughts([{"prompt": "q", "answer": "1"}], "data.train")


def test_thought_dropout_through_load_source():
    spec = {"source": "builtin:arithmetic_thoughts", "task": {"n": 40, "digits": 1}, "transform": "thought_dropout",
            "thought_dropout": {"p": 0.5, "seed": 1}, "chat": True}
    ds = load_source(spec, "sft")
    assert 0 < sum(ds["thought_dropped"]) < len(ds)
    for row in ds:
        content = row["completion"][0]["content"]  # chat: the target became an assistant turn after the transform
        thought = f"<think>{row['prompt'][0]['content']}{row['answer']}</think>"
        assert content == ("<think>\n\n</think>" if row["thought_dropped"] else thought) + f"<answer>{row['answer']}</answer>"


@pytest.mark.parametrize("spec, key", [
    ({"transform": "thought_dropout", "thought_dropout": {"p": 1.5}}, "data.train.thought_dropout.p"),
    ({"transform": "thought_dropout", "thought_dropout": {"open_tag": ""}}, "data.train.thought_dropout.open_tag"),
    ({"transform": "unpair", "thought_dropout": {"p": 0.5}}, "data.train.thought_dropout"),
])
def test_thought_dropout_checked_at_load_time(spec, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        check_source_options(spec, "data.train")


def test_ton_recipe_drops_thoughts_as_the_authors():
    sft = load_recipe(REPO / "recipes/papers/ton/sft.yaml").cfg["data"]["train"]
    assert sft["transform"] == "thought_dropout"
    assert sft["thought_dropout"]["p"] == 0.5 and sft["thought_dropout"]["empty_thought"] == "\n\n"
    grpo = load_recipe(REPO / "recipes/papers/ton/grpo.yaml").cfg
    from postrain.rewards import build_rewards

    rewards, weights = build_rewards(grpo["rewards"])
    fmt = rewards[[r["alias"] for r in grpo["rewards"]].index("think_answer_format")]
    # the format reward accepts both the empty and a full thought, not a missing one
    assert fmt(completions=["<think>\n\n</think><answer>1</answer>", "<think>a\nb</think> <answer>1</answer>",
                            "<answer>1</answer>"]) == [1.0, 1.0, 0.0]


# --- Preference Vector: theta_SFT + sum_i eta_i (theta_i+ - theta_i-) ------------------------------------------

def test_preference_vector_merge_is_base_plus_scaled_differences(tmp_path):
    """The pipeline's merge stage (its weights as the pipeline gives them) on tiny models equals the paper's
    theta_base + eta_h (theta_h+ - theta_h-) + eta_s (theta_s+ - theta_s-), computed here from the weights."""
    from postrain.merging import run_mergekit
    from postrain.models.loading import resolve_model_path
    from postrain.jobs.smoke import SMOKE_TINY

    pipeline = yaml.safe_load((REPO / "recipes/papers/preference_vector.yaml").read_text())
    entries = pipeline["stages"]["merge"]["overrides"]["merge.models"]
    stage_of = {e["model"]: e["parameters"]["weight"] for e in entries}
    eta = {s: stage_of["${stages.%s.output}" % s] for s in ("helpful_pos", "helpful_neg", "harmless_pos", "harmless_neg")}
    assert eta["helpful_neg"] == -eta["helpful_pos"] and eta["harmless_neg"] == -eta["harmless_pos"]

    paths = {name: resolve_model_path("tiny", {**SMOKE_TINY, "seed": seed})
             for seed, name in enumerate(["base", *eta])}
    recipe = load_recipe(REPO / "recipes/papers/preference_vector/merge.yaml", {
        "merge": {"base_model": paths["base"],
                  "models": [{**e, "model": paths[e["model"].removeprefix("${stages.").removesuffix(".output}")]}
                             for e in entries]}}, "merge")
    merged, _ = _load(run_mergekit(recipe.cfg["merge"], tmp_path / "merged"))
    weights = {name: _load(Path(path))[0] for name, path in paths.items()}
    base = weights["base"]
    for key, tensor in merged.items():
        expected = (base[key] + eta["helpful_pos"] * (weights["helpful_pos"][key] - weights["helpful_neg"][key])
                    + eta["harmless_pos"] * (weights["harmless_pos"][key] - weights["harmless_neg"][key]))
        torch.testing.assert_close(tensor, expected, msg=key)
    assert not torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_preference_vector_opposing_stage_swaps_chosen_and_rejected():
    pipeline = yaml.safe_load((REPO / "recipes/papers/preference_vector.yaml").read_text())
    swap = pipeline["stages"]["helpful_neg"]["overrides"]["data.train.columns"]
    ds = load_source({"source": "builtin:arithmetic", "task": {"n": 4}, "columns": swap}, "dpo")
    plain = load_source({"source": "builtin:arithmetic", "task": {"n": 4}}, "dpo")
    assert ds["chosen"] == plain["rejected"] and ds["rejected"] == plain["chosen"]


# --- multi-objective GRPO: one reward per objective, weighted sum ----------------------------------------------

def test_multi_objective_grpo_weights_one_reward_per_objective():
    cfg = load_recipe(REPO / "recipes/papers/multi_objective_grpo.yaml").cfg
    aliases = [r["alias"] for r in cfg["rewards"]]
    assert aliases == ["politeness", "meaningfulness", "actionability", "safety"]
    from postrain.rewards import build_rewards

    rewards, weights = build_rewards(cfg["rewards"])  # the grpo job hands these to TRL as reward_weights
    assert weights == [0.25] * 4 and len({r.reward.prompt for r in rewards}) == 4  # one rubric each
    assert [r.__name__ for r in rewards] == aliases and all("{response}" in r.reward.prompt for r in rewards)
