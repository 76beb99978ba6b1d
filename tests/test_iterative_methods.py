"""SPPO (soft), DNO-Prct and Self-Rewarding as pipelines: the pair builders (win_rate_pairs, score_pairs' pairing
filters), the LLM-as-a-judge reward's score parser, and each paper pipeline's stage files run for two rounds on the
embedded tiny model, round 2 starting from (and referenced to) round 1's output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from postrain.cli import app
from postrain.data.sources import load_source
from postrain.data.transforms.pairing import score_pairs, win_rate_pairs
from postrain.errors import DataError, RecipeError
from postrain.jobs import load_recipe
from postrain.rewards import build_rewards
from postrain.rewards.judge import LLMJudge, parse_judge_score
from tests.conftest import REPO, TINY, write_recipe

PAPERS = REPO / "recipes" / "papers"


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def rows(prompt: str, scores: list, key: str = "score") -> list[dict]:
    out = []
    for i, s in enumerate(scores):
        row = {"prompt": prompt, "completion": f"{prompt}-{i}"}
        row.update({"rewards": {"judge": s}, "score": 0.0} if key != "score" else {"score": s})
        out.append(row)
    return out


# --- win_rate_pairs (SPPO) -----------------------------------------------------------------------------------------

def test_win_rates_by_hand_with_ties_k1_and_all_equal_prompts():
    data = rows("a", [1.0, 0.0, 0.0]) + rows("single", [3.0]) + rows("flat", [2.0, 2.0, 2.0])
    pairs = win_rate_pairs(data, "data.train")
    assert [p["prompt"] for p in pairs] == ["a"]  # K = 1 and all-equal prompts give no pair
    (pair,) = pairs
    # j runs over all K samples, the sample itself included at 1/2 (compute_prob.py's row sum / K).
    assert pair["chosen_probs"] == pytest.approx((0.5 + 2 * sigmoid(1.0)) / 3)
    assert pair["rejected_probs"] == pytest.approx((sigmoid(-1.0) + 0.5 + 0.5) / 3)
    # Of the two tied lowest, the first is rejected (numpy's argmin).
    assert (pair["chosen"], pair["rejected"]) == ("a-0", "a-1")
    assert (pair["score_chosen"], pair["score_rejected"]) == (1.0, 0.0)


def test_win_rate_settings_change_the_probabilities():
    data = rows("a", [1.0, 0.0, 0.0])
    (others,) = win_rate_pairs(data, "x", include_self=False)
    assert others["chosen_probs"] == pytest.approx(sigmoid(1.0))
    assert others["rejected_probs"] == pytest.approx((sigmoid(-1.0) + 0.5) / 2)
    (hard,) = win_rate_pairs(data, "x", win_rate="hard")
    assert (hard["chosen_probs"], hard["rejected_probs"]) == pytest.approx((5 / 6, 1 / 3))
    (warm,) = win_rate_pairs(data, "x", temperature=2.0)
    assert warm["chosen_probs"] == pytest.approx((0.5 + 2 * sigmoid(0.5)) / 3)
    # K = 2 without the sample itself still pairs; K = 1 cannot (no opponent).
    assert len(win_rate_pairs(rows("b", [1.0, 0.0]), "x", include_self=False)) == 1
    assert win_rate_pairs(rows("b", [1.0]), "x", include_self=False) == []


def test_unscored_samples_are_left_out_not_scored_zero():
    data = rows("a", [3.0, None, 1.0], key="rewards.judge")
    (pair,) = win_rate_pairs(data, "x", score="rewards.judge")
    assert (pair["chosen"], pair["rejected"]) == ("a-0", "a-2")  # the unscored a-1 is neither (0 would reject it)
    assert pair["chosen_probs"] == pytest.approx((0.5 + sigmoid(2.0)) / 2)  # K = 2 once a-1 is out
    (best_worst,) = score_pairs(data, "x", score="rewards.judge")
    assert best_worst["rejected"] == "a-2"
    with pytest.raises(DataError, match="no 'missing'"):
        score_pairs(data, "x", score="rewards.missing")


# --- score_pairs filters (DNO) -------------------------------------------------------------------------------------

def test_margin_and_chosen_score_filters():
    data = rows("a", [5.0, 4.0, 2.0, 1.0]) + rows("tie", [3.0, 3.0])
    assert [(p["chosen"], p["rejected"]) for p in score_pairs(data, "x")] == [("a-0", "a-3")]  # default: best vs worst
    assert score_pairs(data, "x", min_margin=4.5) == []
    assert len(score_pairs(data, "x", min_margin=4.0)) == 1  # the margin is inclusive
    every = score_pairs(data, "x", all_pairs=True, min_margin=2.0)
    assert sorted((p["chosen"], p["rejected"]) for p in every) == [("a-0", "a-2"), ("a-0", "a-3"), ("a-1", "a-2"),
                                                                     ("a-1", "a-3")]
    strict = score_pairs(data, "x", all_pairs=True, min_margin=2.0, min_chosen_score=5.0)
    assert sorted((p["chosen"], p["rejected"]) for p in strict) == [("a-0", "a-2"), ("a-0", "a-3")]
    assert all(p["score_chosen"] - p["score_rejected"] >= 2.0 for p in every)


def test_load_source_reports_filters_and_checks_pairing_at_load_time(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows("a", [2.0, 1.0])))
    spec = {"source": str(samples), "transform": "score_pairs", "pairing": {"min_margin": 2.0}}
    with pytest.raises(DataError, match="by at least 2.0"):
        load_source(spec, "dpo")
    base = "defaults: [base/dpo]\nmodel: {name_or_path: tiny}\n"
    for data, key in [
        ("{source: x.jsonl, transform: unpair, pairing: {min_margin: 1}}", "data.train.pairing"),
        ("{source: x.jsonl, transform: win_rate_pairs, pairing: {min_margin: 1}}", "data.train.pairing.min_margin"),
        ("{source: x.jsonl, transform: score_pairs, pairing: {temperature: 2}}", "data.train.pairing.temperature"),
        ("{source: x.jsonl, transform: win_rate_pairs, pairing: {temperature: 0}}", "data.train.pairing.temperature"),
        ("{source: x.jsonl, transform: score_pairs, pairing: {min_margn: 1}}", "data.train.pairing.min_margn"),
        ("{source: x.jsonl, transform: win_rate_pairs, pairing: {win_rate: soft}}", "data.train.pairing.win_rate"),
    ]:
        recipe = write_recipe(tmp_path / "bad.yaml", base + f"data: {{train: {data}}}\n")
        with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
            load_recipe(recipe, [], "dpo")


# --- the judge -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("judgment, score", [
    ("The response is relevant... Score: 4", 4.0),
    ("Score: 2\nOn reflection, Score: 3", 3.0),  # the last one counts
    ("**Score:** 5", 5.0),
    ("score = 1", 1.0),
    ("Score: 0", 0.0),
    ("Score: 2.5", 2.5),
    ("I would give it four points.", None),  # no score
    ("", None),
    ("Score: 6", None),  # out of range on a 5-point rubric
    ("Score: -1", None),
    ("Score: many", None),
])
def test_judge_score_parser(judgment, score):
    assert parse_judge_score(judgment, max_score=5) == score


def test_judge_reward_runs_the_judge_model_on_prompt_and_response():
    (reward,), _ = build_rewards([{"name": "llm_judge", "args": {
        "model": {"name_or_path": "tiny", "dtype": "float32", "tiny": TINY}, "max_new_tokens": 6,
        "prompt": "Q: {prompt}\nA: {response}\nScore:"}}])
    judge = reward.reward
    assert judge._judge is None  # building the reward (a dry run) loads nothing
    inputs = judge.judge_inputs([[{"role": "user", "content": "1+2="}]], ["3"])
    assert inputs == [[{"role": "user", "content": "Q: 1+2=\nA: 3\nScore:"}]]
    extra, metrics = {}, {}
    scores = reward(["3", "4"], prompts=["1+2=", "1+2="], log_extra=lambda k, v: extra.setdefault(k, v),
                    log_metric=lambda k, v: metrics.setdefault(k, v))
    assert len(scores) == 2 and all(s is None or 0 <= s <= 5 for s in scores)
    assert scores == [parse_judge_score(j) for j in extra["llm_judge_judgment"]]
    assert metrics["llm_judge/unparsable"] == sum(s is None for s in scores) / 2
    with pytest.raises(Exception, match="placeholders"):
        LLMJudge(model="tiny", prompt="{question} {response}")


# --- the pipelines, two rounds each on the tiny model --------------------------------------------------------------

MODEL = {"model.dtype": "float32", "model.tiny": TINY}
TRAIN = {"trainer.max_steps": 2, "trainer.per_device_train_batch_size": 4, "trainer.gradient_accumulation_steps": 1,
         "trainer.logging_steps": 1, "trainer.max_length": 32, "trainer.num_train_epochs": 1}
# Rewards with graded scores, so a barely trained model's samples of one prompt score differently.
GRADED = [{"name": "exact_match", "args": {"extract": "full"}}, {"name": "length", "args": {"target": 2}}]


def sample(model: str, seed: int, rewards: list) -> dict:
    return {**MODEL, "model.name_or_path": model, "rewards": rewards,
            "sets": {"prompts": {"source": "builtin:arithmetic", "split": "train", "chunk": None,
                                 "task": {"digits": 1, "n": 16, "seed": seed}}},
            "generation": {"max_new_tokens": 6, "batch_size": 64, "num_samples": 4, "temperature": 1.0, "top_p": 1.0}}


def train(model: str, samples: str, **data) -> dict:
    return {**MODEL, **TRAIN, "model.name_or_path": model, "data.train.source": f"{samples}/samples.jsonl",
            **{f"data.train.{k}": v for k, v in data.items()}}


def two_rounds(stage: Path, start: str, seeds: tuple[int, int], rewards: list, data: dict) -> dict:
    """Pipeline stages of two rounds: sample from the round's starting model (first `start`), score, train from it."""
    stages = {}
    model = start
    for r, seed in enumerate(seeds, 1):
        stages[f"sample_r{r}"] = {"command": "eval", "recipe": str(stage / "sample.yaml"), "report": False,
                                  "overrides": sample(model, seed, rewards)}
        stages[f"train_r{r}"] = {"command": "dpo", "recipe": str(stage / "train.yaml"),
                                 "overrides": train(model, f"${{stages.sample_r{r}.output}}", **data)}
        model = f"${{stages.train_r{r}.output}}"
    return stages


def run_pipeline(tmp_path: Path, stages: dict) -> Path:
    out = tmp_path / "pipe"
    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text(yaml.safe_dump({"command": "pipeline", "name": "pipe", "output_dir": str(out), "stages": stages}, sort_keys=False))
    result = CliRunner().invoke(app, ["run", str(pipe)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def resolved(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "recipe.yaml").read_text())


def assert_round_two_continues_round_one(out: Path) -> None:
    lineage = {s["stage"]: s for s in json.loads((out / "lineage.json").read_text())}
    assert lineage["sample_r2"]["inputs"] == [str(out / "train_r1")]  # round 2 samples pi_1
    assert lineage["train_r2"]["inputs"] == [str(out / "train_r1")]  # and trains it
    assert lineage["train_r2"]["upstream"] == ["train_r1", "sample_r2"]  # on round 2's own samples
    cfg = resolved(out / "train_r2")
    assert cfg["model"]["name_or_path"] == str(out / "train_r1")
    assert cfg["ref_model"] is None  # the reference is TRL's frozen copy of that starting model: pi_1
    for stage in ("train_r1", "train_r2"):
        logged = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in logged if "loss" in m] == [1, 2]


def test_sppo_pipeline_two_rounds(tmp_path):
    stage = PAPERS / "sppo_iterative"
    score = {"pairing": {"score": "score"}}  # the graded rewards' sum (the paper recipe reads its judge's score)
    out = run_pipeline(tmp_path, two_rounds(stage, "tiny", (11, 12), GRADED, score))
    assert_round_two_continues_round_one(out)
    cfg = resolved(out / "train_r2")
    assert cfg["loss"][0]["name"] == "sppo" and cfg["data"]["train"]["transform"] == "win_rate_pairs"
    pairs = load_source(cfg["data"]["train"], "dpo")
    assert all(0 < r < c < 1 for c, r in zip(pairs["chosen_probs"], pairs["rejected_probs"]))


def test_dno_pipeline_two_rounds_keeps_large_margin_pairs_only(tmp_path):
    stage = PAPERS / "dno"
    # Graded scores in [-3, 1]; the paper recipe's rubric thresholds (4 of 5, margin 1) scaled to them.
    dno = {"pairing": {"score": "score", "all_pairs": True, "min_margin": 0.5, "min_chosen_score": -1.0}}
    out = run_pipeline(tmp_path, two_rounds(stage, "tiny", (21, 22), GRADED, dno))
    assert_round_two_continues_round_one(out)
    spec = resolved(out / "train_r2")["data"]["train"]
    kept = load_source(spec, "dpo")
    assert all(c - r >= 0.5 and c >= -1.0 for c, r in zip(kept["score_chosen"], kept["score_rejected"]))
    unfiltered = load_source({**spec, "pairing": {"score": "score", "all_pairs": True}}, "dpo")
    assert len(kept) < len(unfiltered)  # the filter removed some pairs of these very samples


def test_self_rewarding_pipeline_two_rounds_judged_by_the_model_itself(tmp_path):
    stage = PAPERS / "self_rewarding"
    # The paper recipe's own judge entry (model: ${model.name_or_path}, escaped so that the stage, not the pipeline,
    # resolves it), shortened; the tiny model's judgments are meaningless, so a graded reward next to it makes the
    # pairs (the judge's own scores are checked to be recorded).
    judge = {"name": "llm_judge", "args": {"model": {"name_or_path": "\\${model.name_or_path}", "dtype": "float32",
                                                     "tiny": TINY}, "max_new_tokens": 6}}
    rewards = [judge, {"name": "length", "args": {"target": 2}}]
    sft = {**MODEL, **TRAIN, "model.name_or_path": "tiny", "trainer.max_steps": 3,
           "data.train": {"source": "builtin:arithmetic", "split": "train", "task": {"digits": 1, "n": 16}}}
    score = {"pairing": {"score": "score"}}
    out = run_pipeline(tmp_path, {"sft": {"command": "sft", "recipe": str(stage / "sft.yaml"), "overrides": sft},
                                  **two_rounds(stage, "${stages.sft.output}", (31, 32), rewards, score)})
    assert_round_two_continues_round_one(out)
    for stage_name, model in (("sample_r1", out / "sft"), ("sample_r2", out / "train_r1")):
        judge_cfg = resolved(out / stage_name)["rewards"][0]
        assert judge_cfg["name"] == "llm_judge" and judge_cfg["args"]["model"]["name_or_path"] == str(model)
        samples = [json.loads(line) for line in (out / stage_name / "samples.jsonl").read_text().splitlines()]
        assert all("llm_judge" in s["rewards"] and isinstance(s["llm_judge_judgment"], str) for s in samples)
        assert all(s["rewards"]["llm_judge"] == parse_judge_score(s["llm_judge_judgment"]) for s in samples)
