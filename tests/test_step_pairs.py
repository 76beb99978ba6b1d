"""Step-DPO, Step-Controlled DPO, RS-DPO, GSHF and RAFT as data transforms and pipelines: step_pairs, step_prefixes,
step_controlled_pairs and best_of_k against hand-computed rows (postrain.data.transforms), RS-DPO's pair rule as
score_pairs' margin, the load-time checks of `steps:` / `best_of_k:`, and RAFT's and SCDPO's stage files run end to end
on the embedded tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from postrain.data.sources import load_source
from postrain.data.transforms.best_of_k import best_of_k
from postrain.data.transforms.pairing import score_pairs
from postrain.data.transforms.steps import split_steps, step_controlled_pairs, step_pairs, step_prefixes
from postrain.errors import DataError, RecipeError
from postrain.jobs import load_recipe
from tests.conftest import REPO, write_recipe
from tests.test_iterative_methods import GRADED, MODEL, TRAIN, resolved, run_pipeline, sample

PAPERS = REPO / "recipes" / "papers"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- step_pairs (Step-DPO) -----------------------------------------------------------------------------------------

STEP_ROWS = [
    {"prompt": "2+3*4?", "initial_reason_steps": "Step 1: 3*4=12.\n", "chosen": "Step 2: 2+12=14.",
     "rejected": "Step 2: 2+12=15.", "answer": "14"},
    {"prompt": "1+1?", "initial_reason_steps": "", "chosen": "Step 1: 2.", "rejected": "Step 1: 3.", "answer": "2"},
]


def test_step_pairs_put_the_templated_question_and_the_correct_steps_in_the_prompt():
    pairs = step_pairs(STEP_ROWS, "data.train", prefix_separator="\n", prompt_template="Q: {prompt}\nA:")
    assert pairs[0]["prompt"] == "Q: 2+3*4?\nA:\nStep 1: 3*4=12.\n"
    assert (pairs[0]["chosen"], pairs[0]["rejected"], pairs[0]["answer"]) == ("Step 2: 2+12=14.", "Step 2: 2+12=15.", "14")
    assert pairs[1]["prompt"] == "Q: 1+1?\nA:"  # no steps yet: no separator either (the authors' len(...) == 0 case)
    # deepseek-math's separator is a space; no template leaves the question as it is.
    assert step_pairs(STEP_ROWS, "x", prefix_separator=" ")[0]["prompt"] == "2+3*4? Step 1: 3*4=12.\n"


def test_step_pairs_errors_name_the_column():
    with pytest.raises(DataError, match="'steps_so_far' \\(steps.prefix_column\\)"):
        step_pairs(STEP_ROWS, "x", prefix_column="steps_so_far")
    with pytest.raises(DataError, match="column 'missing'"):
        step_pairs(STEP_ROWS, "x", prompt_template="{missing}")


def test_load_source_templates_the_question_once_before_the_steps(tmp_path):
    data = write_jsonl(tmp_path / "steps.jsonl", STEP_ROWS)
    ds = load_source({"source": str(data), "transform": "step_pairs", "prompt_template": "Q: {prompt}\nA:"}, "dpo")
    assert ds["prompt"] == ["Q: 2+3*4?\nA:\nStep 1: 3*4=12.\n", "Q: 1+1?\nA:"]  # not templated again around the steps


# --- step_prefixes / step_controlled_pairs (SCDPO) -----------------------------------------------------------------

def test_split_steps_keeps_the_text_whole():
    assert split_steps("a\nb\nc", "\n") == ["a\n", "b\n", "c"]
    assert split_steps("a\nb\n", "\n") == ["a\n", "b\n"]  # a trailing separator ends the last step
    assert split_steps("abc", "\n") == ["abc"]
    assert split_steps("", "\n") == []


SOLUTIONS = [  # an eval run's samples.jsonl: Q1's first correct solution is its second sample
    {"prompt": "Q1:", "completion": "x=1\nno", "answer": "5", "score": 0.0},
    {"prompt": "Q1:", "completion": "a=2\nb=3\n5", "answer": "5", "score": 1.0},
    {"prompt": "Q1:", "completion": "c\n5", "answer": "5", "score": 1.0},
    {"prompt": "Q2:", "completion": "7", "answer": "6", "score": 0.0},  # never right: no prefixes
    {"prompt": "Q3:", "completion": "6", "answer": "6", "score": None},  # unscored: not a correct sample
]


def test_step_prefixes_cut_the_first_correct_solution_after_every_step_but_the_last():
    rows = step_prefixes(SOLUTIONS, "sets.prefixes")
    assert rows == [{"prompt": "Q1:", "answer": "5", "prefix_steps": 0},
                    {"prompt": "Q1:a=2\n", "answer": "5", "prefix_steps": 1},
                    {"prompt": "Q1:a=2\nb=3\n", "answer": "5", "prefix_steps": 2}]
    # correct means score >= correct_score: at 0.0 Q1's first sample and Q2's only one count
    loose = step_prefixes(SOLUTIONS, "x", correct_score=0.0)
    assert [r["prompt"] for r in loose] == ["Q1:", "Q1:x=1\n", "Q2:"]


def test_step_prefixes_need_text_prompts():
    chat = [{**SOLUTIONS[1], "prompt": [{"role": "user", "content": "Q1"}]}]
    with pytest.raises(DataError, match="prompts must be text"):
        step_prefixes(chat, "x")


CONTINUATIONS = [  # the continue stage's samples.jsonl: prompts are question + k steps
    {"prompt": "Q1:", "completion": "a=2\nb=3\n5", "score": 1.0},  # k = 0: no wrong continuation, no pair
    {"prompt": "Q1:a=2\n", "completion": "b=9\n11", "score": 1.0},  # verifier says right: not a negative
    {"prompt": "Q1:a=2\n", "completion": "b=4\n6", "score": 0.0},  # the first wrong one at k = 1
    {"prompt": "Q1:a=2\n", "completion": "b=5\n7", "score": 0.0},
    {"prompt": "Q1:a=2\nb=3\n", "completion": "4", "score": 0.0},  # k = 2
]


def test_step_controlled_pairs_by_hand():
    pairs = step_controlled_pairs(CONTINUATIONS, "data.train", SOLUTIONS, solutions="s.jsonl")
    assert [(p["prompt"], p["chosen"], p["rejected"], p["prefix_steps"]) for p in pairs] == [
        ("Q1:a=2\n", "b=3\n5", "b=4\n6", 1),  # chosen: the correct solution's own remaining steps
        ("Q1:a=2\nb=3\n", "5", "4", 2),
    ]
    assert (pairs[0]["score_chosen"], pairs[0]["score_rejected"], pairs[0]["answer"]) == (1.0, 0.0, "5")
    limited = step_controlled_pairs(CONTINUATIONS, "x", SOLUTIONS, solutions="s", max_pairs_per_prompt=1)
    assert [p["prefix_steps"] for p in limited] == [1]  # fewest prefix steps first
    assert step_controlled_pairs(CONTINUATIONS[:2], "x", SOLUTIONS, solutions="s") == []  # no wrong step


def test_step_controlled_pairs_refuse_continuations_of_other_solutions():
    stray = CONTINUATIONS + [{"prompt": "Q1:b=3\n", "completion": "1", "score": 0.0}]
    with pytest.raises(DataError, match="1 continuation prompt\\(s\\) are no prefix.*steps.solutions"):
        step_controlled_pairs(stray, "data.train", SOLUTIONS, solutions="s")


def test_load_source_reads_the_solutions_file(tmp_path):
    solutions = write_jsonl(tmp_path / "solve.jsonl", SOLUTIONS)
    continuations = write_jsonl(tmp_path / "continue.jsonl", CONTINUATIONS)
    spec = {"source": str(continuations), "transform": "step_controlled_pairs", "steps": {"solutions": str(solutions)}}
    assert load_source(spec, "dpo")["rejected"] == ["b=4\n6", "4"]
    all_right = write_jsonl(tmp_path / "all_right.jsonl", CONTINUATIONS[:2])
    with pytest.raises(DataError, match="made no rows: no continuation is wrong"):
        load_source({**spec, "source": str(all_right)}, "dpo")


# --- best_of_k (RAFT) ----------------------------------------------------------------------------------------------

def scored(prompt: str, scores: list) -> list[dict]:
    return [{"prompt": prompt, "completion": f"{prompt}-{i}", "score": s, "answer": "a", "parsed": None}
            for i, s in enumerate(scores)]


def test_best_of_k_by_hand():
    rows = scored("p", [0.2, 0.9, 0.9, 0.1]) + scored("single", [-1.0]) + scored("none", [None, None])
    best = best_of_k(rows, "x")
    assert [(r["prompt"], r["completion"], r["score"]) for r in best] == [("p", "p-1", 0.9), ("single", "single-0", -1.0)]
    assert set(best[0]) == {"prompt", "completion", "score", "answer"}  # SFT rows, no sample bookkeeping
    assert [r["completion"] for r in best_of_k(rows, "x", keep=3)] == ["p-1", "p-2", "p-0", "single-0"]
    assert [r["completion"] for r in best_of_k(rows, "x", min_score=0.0)] == ["p-1"]  # single's best is < 0
    every_positive = best_of_k(rows, "x", keep=None, min_score=0.2)
    assert [r["completion"] for r in every_positive] == ["p-1", "p-2", "p-0"]


def test_best_of_k_reads_one_reward(tmp_path):
    rows = [{"prompt": "p", "completion": c, "score": 0.0, "rewards": {"judge": j}} for c, j in (("a", 1), ("b", 4))]
    assert best_of_k(rows, "x", score="rewards.judge")[0]["completion"] == "b"
    data = write_jsonl(tmp_path / "samples.jsonl", rows)
    with pytest.raises(DataError, match="made no rows"):
        load_source({"source": str(data), "transform": "best_of_k", "best_of_k": {"min_score": 9}}, "sft")


# --- RS-DPO: sigmoid((r_j - r_l) / tau) > eta is score_pairs' margin tau * logit(eta) --------------------------------

def rs_dpo_pairs(rewards: list[float], eta: float, tau: float) -> set[tuple[int, int]]:
    """Algorithm 1 of arXiv 2402.10038 for one prompt, pair by pair: (chosen j, rejected l) when sigmoid((r_j - r_l) /
    tau) > eta."""
    return {(j, l) for j in range(len(rewards)) for l in range(len(rewards))
            if j != l and 1 / (1 + math.exp(-(rewards[j] - rewards[l]) / tau)) > eta}


@pytest.mark.parametrize("eta, tau", [(0.85, 1.0), (0.6, 2.0), (0.95, 0.5)])
def test_rs_dpo_pairs_are_score_pairs_with_a_margin(eta, tau):
    rewards = [3.1, -0.4, 1.7, 1.7, 0.2, 2.9]
    rows = [{"prompt": "p", "completion": str(i), "score": r} for i, r in enumerate(rewards)]
    margin = tau * math.log(eta / (1 - eta))
    pairs = score_pairs(rows, "x", all_pairs=True, min_margin=margin)
    assert {(int(p["chosen"]), int(p["rejected"])) for p in pairs} == rs_dpo_pairs(rewards, eta, tau)
    assert pairs  # the example keeps some pairs and drops others
    assert len(pairs) < len(rewards) * (len(rewards) - 1) / 2


def test_rs_dpo_recipe_margin_is_its_eta_and_tau():
    cfg = yaml.safe_load((PAPERS / "rs_dpo" / "train.yaml").read_text())
    assert cfg["data"]["train"]["pairing"]["min_margin"] == pytest.approx(1.0 * math.log(0.85 / 0.15), abs=1e-4)


# --- load-time checks ----------------------------------------------------------------------------------------------

BASE = {"dpo": "defaults: [base/dpo]\nmodel: {name_or_path: tiny}\n",
        "sft": "defaults: [base/sft]\nmodel: {name_or_path: tiny}\n",
        "eval": "defaults: [base/eval]\nmodel: {name_or_path: tiny}\n"}


@pytest.mark.parametrize("command, section, key", [
    ("dpo", "data: {train: {source: x.jsonl, transform: score_pairs, steps: {separator: x}}}", "data.train.steps"),
    ("dpo", "data: {train: {source: x.jsonl, transform: step_pairs, steps: {solutions: s.jsonl}}}",
     "data.train.steps.solutions"),
    ("dpo", "data: {train: {source: x.jsonl, transform: step_pairs, chat: true}}", "data.train.chat"),
    ("dpo", "data: {train: {source: x.jsonl, transform: step_controlled_pairs}}", "data.train.steps.solutions"),
    ("dpo", "data: {train: {source: x.jsonl, transform: step_controlled_pairs, steps: {solutions: s, "
            "max_pairs_per_prompt: 0}}}", "data.train.steps.max_pairs_per_prompt"),
    ("dpo", "data: {train: {source: x.jsonl, transform: step_controlled_pairs, prompt_template: 'Q {prompt}', "
            "steps: {solutions: s}}}", "data.train.prompt_template"),
    ("dpo", "data: {train: {source: x.jsonl, transform: step_pairs, steps: {prefix_colum: a}}}",
     "data.train.steps.prefix_colum"),
    ("eval", "sets: {p: {source: x.jsonl, transform: step_prefixes, steps: {separator: ''}}}", "sets.p.steps.separator"),
    ("eval", "sets: {p: {source: x.jsonl, transform: step_prefixes, system_prompt: hi}}", "sets.p.system_prompt"),
    ("sft", "data: {train: {source: x.jsonl, transform: best_of_k, best_of_k: {keep: 0}}}", "data.train.best_of_k.keep"),
    ("sft", "data: {train: {source: x.jsonl, transform: best_of_k, best_of_k: {keep: null}}}", "data.train.best_of_k"),
    ("sft", "data: {train: {source: x.jsonl, best_of_k: {keep: 1}}}", "data.train.best_of_k"),
    ("sft", "data: {train: {source: x.jsonl, transform: best_of_k, best_of_k: {score: 'rewards.'}}}",
     "data.train.best_of_k.score"),
])
def test_bad_settings_fail_at_load_time_naming_the_key(tmp_path, command, section, key):
    recipe = write_recipe(tmp_path / "bad.yaml", BASE[command] + section + "\n")
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        load_recipe(recipe, [], command)


# --- pipelines on the tiny model -----------------------------------------------------------------------------------

CPU = {"trainer.bf16": False, "trainer.gradient_checkpointing": False}


def test_raft_pipeline_two_stages_sft_on_each_prompts_best_sample(tmp_path):
    stage = PAPERS / "raft"
    best = {"data.train.best_of_k": {"score": "score", "keep": 1}}

    def sft(model: str, samples: str) -> dict:
        return {**MODEL, **TRAIN, **CPU, **best, "model.name_or_path": model,
                "data.train.source": f"{samples}/samples.jsonl"}

    out = run_pipeline(tmp_path, {
        "sample_r1": {"command": "eval", "recipe": str(stage / "sample.yaml"), "report": False,
                      "overrides": sample("tiny", 41, GRADED)},
        "sft_r1": {"command": "sft", "recipe": str(stage / "sft.yaml"),
                   "overrides": sft("tiny", "${stages.sample_r1.output}")},
        "sample_r2": {"command": "eval", "recipe": str(stage / "sample.yaml"), "report": False,
                      "overrides": sample("${stages.sft_r1.output}", 42, GRADED)},
        "sft_r2": {"command": "sft", "recipe": str(stage / "sft.yaml"),
                   "overrides": sft("${stages.sft_r1.output}", "${stages.sample_r2.output}")},
    })
    lineage = {s["stage"]: s for s in json.loads((out / "lineage.json").read_text())}
    assert lineage["sample_r2"]["inputs"] == [str(out / "sft_r1")]  # stage 2 samples the stage-1 model
    assert lineage["sft_r2"]["inputs"] == [str(out / "sft_r1")]  # and fine-tunes it
    cfg = resolved(out / "sft_r2")
    assert cfg["data"]["train"]["transform"] == "best_of_k"
    samples = [json.loads(line) for line in (out / "sample_r2" / "samples.jsonl").read_text().splitlines()]
    by_prompt: dict[str, list[dict]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt"], []).append(s)
    expected = [max(group, key=lambda s: s["score"]) for group in by_prompt.values()]  # max(): the first of ties
    rows = load_source(cfg["data"]["train"], "sft")
    assert rows["completion"] == [s["completion"] for s in expected]
    assert rows["score"] == pytest.approx([s["score"] for s in expected])
    logged = [json.loads(line) for line in (out / "sft_r2" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "loss" in m] == [1, 2]


def test_scdpo_pipeline_continues_correct_prefixes_and_pairs_them(tmp_path):
    stage = PAPERS / "scdpo"
    # The untrained tiny model is never right: "correct" here is a graded score (exact match + length) of -1.5 or more,
    # and a step ends at U+FFFD, the character its undecodable bytes come out as (frequent in its samples).
    steps = {"separator": "\ufffd", "score": "score", "correct_score": -1.5}
    solve = {**sample("tiny", 51, GRADED), "generation": {"max_new_tokens": 6, "batch_size": 64, "num_samples": 4,
                                                           "temperature": 1.0, "top_p": 1.0}}
    cont = {**MODEL, "model.name_or_path": "tiny", "rewards": GRADED,
            "sets.prefixes.source": "${stages.solve.output}/samples.jsonl",
            "sets.prefixes.steps": steps, "sets.prefixes.prompt_template": None,
            "generation": {"max_new_tokens": 6, "batch_size": 64, "num_samples": 4, "temperature": 1.25, "top_p": 1.0}}
    train = {**MODEL, **TRAIN, **CPU, "model.name_or_path": "tiny",
             "data.train.source": "${stages.continue.output}/samples.jsonl",
             "data.train.steps": {**steps, "solutions": "${stages.solve.output}/samples.jsonl",
                                  "max_pairs_per_prompt": 3}}
    out = run_pipeline(tmp_path, {
        "solve": {"command": "eval", "recipe": str(stage / "solve.yaml"), "report": False,
                  "overrides": {**solve, "sets": {"questions": {
                      "source": "builtin:arithmetic", "split": "train", "task": {"digits": 1, "n": 8, "seed": 51},
                      "columns": {"prompt": "prompt", "answer": "answer"}, "prompt_template": None}}}},
        "continue": {"command": "eval", "recipe": str(stage / "continue.yaml"), "report": False, "overrides": cont},
        "train": {"command": "dpo", "recipe": str(stage / "train.yaml"), "overrides": train},
    })
    solutions = [json.loads(line) for line in (out / "solve" / "samples.jsonl").read_text().splitlines()]
    continuations = [json.loads(line) for line in (out / "continue" / "samples.jsonl").read_text().splitlines()]
    # every continuation prompt is a question followed by a prefix of one of its sampled solutions
    assert all(any(c["prompt"] == s["prompt"] + s["completion"][: len(c["prompt"]) - len(s["prompt"])]
                   for s in solutions) for c in continuations)
    pairs = load_source(resolved(out / "train")["data"]["train"], "dpo")
    assert len(pairs) > 0 and max(pairs["prefix_steps"]) > 0  # pairs after a shared prefix of correct steps, too
    for prompt, chosen, rejected in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]):
        full = next(s for s in solutions if s["prompt"] + s["completion"] == prompt + chosen)
        assert full["score"] >= -1.5  # chosen: the rest of a correct solution
        assert any(c["prompt"] == prompt and c["completion"] == rejected and c["score"] < -1.5 for c in continuations)
    logged = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "loss" in m] == [1, 2]
