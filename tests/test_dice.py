"""DICE (arXiv 2406.09760) as a pipeline: the implicit reward of each sample (against a plain forward here and against
TRL's DPO trainer), best-vs-worst pairing, the authors' length-penalty sweep, the offline mix, load-time errors, and
recipes/papers/dice's stage files run for two rounds on the embedded tiny model."""

from __future__ import annotations

import hashlib
import inspect
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from postrain.cli import app
from postrain.data.mix import mix_counts, mix_rows
from postrain.data.source_spec import as_source
from postrain.data.sources import load_source
from postrain.data.transforms.implicit_reward_pairs import (
    completion_ids, implicit_reward_pairs, pair_best_worst, summed_logps, sweep_length_penalty,
)
from postrain.errors import DataError, RecipeError
from postrain.models.loading import load_model
from postrain.jobs import load_recipe
from tests.conftest import REPO, TINY, write_recipe

PAPERS = REPO / "recipes" / "papers"


def tiny(seed: int) -> dict:
    return {"name_or_path": "tiny", "dtype": "float32", "tiny": {**TINY, "seed": seed}}


def plain_logp(model, tokenizer, prompt: list, completion: str) -> float:
    """log p(completion | prompt) by hand: the chat template with and without the answer turn, one forward."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    full_ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=True,
                                             return_dict=True)
    prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    assert full_ids[:len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full_ids])).logits[0].float()
    logps = logits.log_softmax(-1)
    return sum(logps[t - 1, full_ids[t]].item() for t in range(len(prompt_ids), len(full_ids)))


# --- the implicit reward ------------------------------------------------------------------------------------------

def test_each_sample_is_scored_beta_log_ratio_minus_length_penalty():
    q1, q2 = [{"role": "user", "content": "1+2="}], [{"role": "user", "content": "7+5="}]
    rows = [{"prompt": q1, "completion": c} for c in ("3", "4 is it", "33")] + \
           [{"prompt": q2, "completion": c} for c in ("12", "twelve")]
    beta, alpha = 0.5, 0.01
    spec = as_source({"source": "x.jsonl", "transform": "implicit_reward_pairs",
                      "implicit_reward": {"policy": tiny(0), "reference": tiny(1), "beta": beta,
                                          "length_penalty": alpha, "min_samples": 2, "batch_size": 2}})
    pairs = implicit_reward_pairs(rows, "data.train", spec, **spec.transform_settings["implicit_reward"])

    policy, tokenizer, _ = load_model(tiny(0))
    reference, _, _ = load_model(tiny(1))
    expected = [beta * (plain_logp(policy, tokenizer, r["prompt"], r["completion"])
                        - plain_logp(reference, tokenizer, r["prompt"], r["completion"])) - alpha * len(r["completion"])
                for r in rows]
    by_prompt = [(rows[:3], expected[:3]), (rows[3:], expected[3:])]
    assert len(pairs) == 2
    for pair, (group, rewards) in zip(pairs, by_prompt):
        best, worst = max(range(len(group)), key=rewards.__getitem__), min(range(len(group)), key=rewards.__getitem__)
        assert pair["chosen"] == group[best]["completion"] and pair["rejected"] == group[worst]["completion"]
        assert pair["score_chosen"] == pytest.approx(rewards[best], abs=1e-4)
        assert pair["score_rejected"] == pytest.approx(rewards[worst], abs=1e-4)
        assert pair["length_penalty"] == alpha


def test_log_probs_equal_what_the_dpo_trainer_computes_for_the_same_pair(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tokenizer, _ = load_model(tiny(0))
    for prompt, chosen, rejected in [
        ([{"role": "user", "content": "2+2="}], [{"role": "assistant", "content": "4"}],
         [{"role": "assistant", "content": "five"}]),
        ("2+2=", " 4", " five"),  # not conversational: TRL appends the EOS token
    ]:
        config = DPOConfig(output_dir=str(tmp_path), report_to="none", max_length=None, bf16=False)
        trainer = DPOTrainer(model=model, args=config,
                             train_dataset=Dataset.from_list([{"prompt": prompt, "chosen": chosen,
                                                               "rejected": rejected}]),
                             processing_class=tokenizer)
        batch = trainer.data_collator([trainer.train_dataset[0]])
        trl_chosen, trl_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
        ours = summed_logps(trainer.model, [completion_ids(tokenizer, prompt, chosen),
                                            completion_ids(tokenizer, prompt, rejected)], batch_size=2)
        assert ours == pytest.approx([trl_chosen.item(), trl_rejected.item()], abs=1e-4)


def test_the_copied_trl_tokenization_is_pinned():
    # completion_ids copies the tokenization of TRL 1.16.0's DPOTrainer._prepare_dataset (add_eos, tokenize_fn).
    # If this fails, TRL changed that method: re-read it, update completion_ids to match, then this digest.
    from trl.trainer.dpo_trainer import DPOTrainer

    source = inspect.getsource(DPOTrainer._prepare_dataset)
    assert hashlib.sha256(source.encode()).hexdigest() == \
        "35e349e8e8266df4a098b8c0b9949729e06d794f67dc24b666863f9f26e1bb55"


# --- pairing and the length sweep --------------------------------------------------------------------------------

def row(prompt: str, completion: str) -> dict:
    return {"prompt": prompt, "completion": completion, "answer": prompt}


def test_pairing_best_against_worst_ties_single_samples_and_min_samples():
    rows = [row("a", "a1"), row("a", "a2"), row("a", "a3"),   # a2 and a3 tie for best: the first wins
            row("b", "b1"),                                     # one sample: no pair
            row("c", "c1"), row("c", "c2"),                     # all equal: no preference
            row("d", "d1"), row("d", "d2")]
    rewards = [0.0, 2.0, 2.0, 5.0, 1.0, 1.0, -1.0, 3.0]
    pairs = pair_best_worst(rows, rewards, min_samples=2)
    assert [(p["chosen"], p["rejected"], p["score_chosen"], p["score_rejected"]) for p in pairs] == \
        [("a2", "a1", 2.0, 0.0), ("d2", "d1", 3.0, -1.0)]
    assert pairs[0]["answer"] == "a"  # the chosen row's other columns are kept
    assert [p["chosen"] for p in pair_best_worst(rows, rewards, min_samples=3)] == ["a2"]


def test_length_sweep_stops_at_the_first_rise_and_takes_the_closest_alpha():
    # Prompt A prefers its 10-character sample by 1.0, prompt B by 0.05: from alpha > 0.00625 B's short sample wins
    # (mean length gap (8 - 8) / 2 = 0), from alpha > 0.125 A's too (gap -8, farther from 0: the sweep stops).
    rows = [row("A", "x" * 10), row("A", "xx"), row("B", "y" * 10), row("B", "yy")]
    alpha = sweep_length_penalty(rows, [1.0, 0.0, 0.05, 0.0], min_samples=2)
    assert alpha == pytest.approx(0.007)
    assert sweep_length_penalty(rows, [0.0, 1.0, 0.0, 1.0], min_samples=2) == 0.0  # already short-preferring


# --- the mix -----------------------------------------------------------------------------------------------------

def test_mix_counts_order_seed_and_new_prompts_only():
    assert mix_counts(10, 8, 0.5) == (4, 4)
    assert mix_counts(3, 8, 0.5) == (3, 3)        # fewer generated pairs: as many offline ones
    assert mix_counts(10, 10, 0.25) == (7, 2)     # int(10·0.75), int(0.25·7/0.75)
    here = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r", "only_here": 1} for i in range(10)]
    there = [{"prompt": f"p{i}", "chosen": "C", "rejected": "R"} for i in range(4, 12)]
    mixed = mix_rows(here, there, 0.5, seed=3, new_prompts_only=True, where="data.train")
    assert [r["chosen"] for r in mixed] == ["c"] * 4 + ["C"] * 4   # this source's draw first
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in mixed)  # the columns both have
    drawn = {r["prompt"] for r in mixed[:4]}
    assert not drawn & {r["prompt"] for r in mixed[4:]} and len({r["prompt"] for r in mixed}) == 8
    assert mix_rows(here, there, 0.5, seed=3, new_prompts_only=True, where="d") == mixed
    assert mix_rows(here, there, 0.5, seed=4, new_prompts_only=True, where="d") != mixed
    same = [{**r, "prompt": "p0"} for r in there[:4]]  # every mixed-in prompt is already drawn here
    with pytest.raises(DataError, match=r"data\.train\.mix: 2 mixed-in rows .* only 0 of its 4 .*new_prompts_only"):
        mix_rows([{**r, "prompt": "p0"} for r in here], same, 0.5, seed=0, new_prompts_only=True, where="data.train")
    assert len(mix_rows([{**r, "prompt": "p0"} for r in here], same, 0.5, seed=0, new_prompts_only=False,
                        where="data.train")) == 4


def test_mix_through_load_source(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(6)))
    ds = load_source({"source": "builtin:arithmetic", "task": {"n": 12, "digits": 1}, "chat": True,
                      "mix": {"source": str(pairs), "chat": True, "fraction": 0.5, "seed": 1}}, "dpo")
    assert len(ds) == 6 and ds["chosen"][3:] == [[{"role": "assistant", "content": "a"}]] * 3
    assert all(p[0]["content"].startswith("q") for p in ds["prompt"][3:])


# --- load-time errors ----------------------------------------------------------------------------------------------

TRAIN_RECIPE = """
command: dpo
model: {name_or_path: tiny, dtype: float32}
data:
  train:
    source: samples.jsonl
    transform: implicit_reward_pairs
    implicit_reward: {policy: {name_or_path: tiny}, reference: {name_or_path: tiny}}
"""


@pytest.mark.parametrize("overrides, message", [
    (["data.train.transform=score_pairs"], r"data\.train\.implicit_reward: set only with transform: "
                                           r"implicit_reward_pairs"),
    (["data.train.implicit_reward=null"], r"data\.train\.implicit_reward: transform 'implicit_reward_pairs' needs"),
    (["data.train.implicit_reward.reference=null"], r"data\.train\.implicit_reward\.reference: a model is needed"),
    (["data.train.implicit_reward.beta=0"], r"data\.train\.implicit_reward\.beta: must be a number > 0"),
    (["data.train.implicit_reward.length_penalty=-1"], r"implicit_reward\.length_penalty: a number >= 0"),
    (["data.train.implicit_reward.min_samples=1"], r"implicit_reward\.min_samples: must be an integer >= 2"),
    (["data.train.implicit_reward.lenght_penalty=0"], r"unknown key 'data\.train\.implicit_reward\.lenght_penalty'"),
    (["+data.train.mix.source=x.jsonl", "+data.train.mix.fraction=1.0"], r"data\.train\.mix\.fraction: .* strictly "
                                                                          r"between 0 and 1"),
    (["+data.train.mix.source=x.jsonl", "+data.train.mix.chunk.index=3", "+data.train.mix.chunk.of=2"],
     r"data\.train\.mix\.chunk\.index"),
    (["+data.train.mix.fraction=0.5"], r"data\.train\.mix: a second source"),
])
def test_bad_settings_fail_at_load_time_naming_the_key(tmp_path, overrides, message):
    path = write_recipe(tmp_path / "dice.yaml", TRAIN_RECIPE)
    overrides = [o.lstrip("+") for o in overrides]
    with pytest.raises(RecipeError, match=message):
        load_recipe(path, overrides)


# --- the pipeline, two rounds on the tiny model --------------------------------------------------------------------

MODEL = {"model.dtype": "float32", "model.tiny": TINY}
TRAIN = {"trainer.max_steps": 2, "trainer.per_device_train_batch_size": 4, "trainer.gradient_accumulation_steps": 1,
         "trainer.logging_steps": 1, "trainer.max_length": 32, "trainer.bf16": False, "trainer.warmup_steps": 0}


def sample(model: str, seed: int) -> dict:
    return {**MODEL, "model.name_or_path": model,
            "sets": {"prompts": {"source": "builtin:arithmetic", "split": "train", "task": {"digits": 1, "n": 12,
                                                                                            "seed": seed}}},
            "generation": {"max_new_tokens": 6, "batch_size": 64, "num_samples": 4, "temperature": 1.0, "top_p": 1.0}}


def train(model: str, samples: str, policy: str, reference: dict) -> dict:
    return {**MODEL, **TRAIN, "model.name_or_path": model, "data.train.source": f"{samples}/samples.jsonl",
            "data.train.implicit_reward": {"policy": {**tiny(0), "name_or_path": policy}, "reference": reference,
                                           "beta": 1.0, "length_penalty": "auto", "min_samples": 2},
            "data.train.mix": {"source": "builtin:arithmetic", "split": "train", "task": {"digits": 2, "n": 40},
                               "chat": True, "fraction": 0.5, "seed": 0, "limit": None}}


def test_dice_pipeline_two_rounds(tmp_path):
    stage = PAPERS / "dice"
    out = tmp_path / "pipe"
    stages = {
        "sample_r1": {"command": "eval", "recipe": str(stage / "sample.yaml"), "report": False,
                      "overrides": sample("tiny", 31)},
        "train_r1": {"command": "dpo", "recipe": str(stage / "train.yaml"),
                     "overrides": train("tiny", "${stages.sample_r1.output}", "tiny", tiny(1))},
        "sample_r2": {"command": "eval", "recipe": str(stage / "sample.yaml"), "report": False,
                      "overrides": sample("${stages.train_r1.output}", 32)},
        "train_r2": {"command": "dpo", "recipe": str(stage / "train.yaml"),
                     "overrides": train("${stages.train_r1.output}", "${stages.sample_r2.output}",
                                        "${stages.train_r1.output}", tiny(0))},
    }
    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text(yaml.safe_dump({"command": "pipeline", "name": "pipe", "output_dir": str(out), "stages": stages},
                                   sort_keys=False))
    result = CliRunner().invoke(app, ["run", str(pipe)])
    assert result.exit_code == 0, result.output + repr(result.exception)

    lineage = {s["stage"]: s for s in json.loads((out / "lineage.json").read_text())}
    assert lineage["sample_r2"]["inputs"] == [str(out / "train_r1")]
    assert lineage["train_r2"]["upstream"] == ["train_r1", "sample_r2"]
    cfg = yaml.safe_load((out / "train_r2" / "recipe.yaml").read_text())
    assert cfg["model"]["name_or_path"] == str(out / "train_r1") and cfg["ref_model"] is None
    assert cfg["data"]["train"]["implicit_reward"]["policy"]["name_or_path"] == str(out / "train_r1")
    for name in ("train_r1", "train_r2"):
        logged = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in logged if "loss" in m] == [1, 2]
    # round 2's training data: its own samples' best-vs-worst pairs, then as many offline pairs
    train_data = load_source(cfg["data"]["train"], "dpo")
    half = len(train_data) // 2
    assert len(train_data) == 2 * half and half > 0
    samples = [json.loads(line) for line in (out / "sample_r2" / "samples.jsonl").read_text().splitlines()]
    sampled_prompts = {json.dumps(s["prompt"]) for s in samples}
    assert all(json.dumps(p) in sampled_prompts for p in train_data["prompt"][:half])
    assert not any(json.dumps(p) in sampled_prompts for p in train_data["prompt"][half:])
