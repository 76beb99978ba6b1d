"""`postrain eval` end to end on the embedded tiny model: pass@k / maj@k / mean@n with intervals, per-subset
breakdowns, settings stored once, progress lines, comparison mode, and the load-time refusals."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from postrain.cli import app
from postrain.evaluation.results import generation_of, model_results
from postrain.evaluation.scoring import score_set
from tests.conftest import TINY, postrain, write_recipe

runner = CliRunner()

# A verifier whose outcome on an untrained model's samples is neither all right nor all wrong: a completion is
# "right" when its first character has an even code point; its answer (what votes) is that character.
FIRST_CHAR_VERIFIER = '''
def even_first_char(completions, **columns):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 if text and ord(text[0]) % 2 == 0 else 0.0 for text in texts]


def _first_char(text):
    return text[:1] or None


even_first_char.parse = _first_char
'''


def eval_setup(tmp_path: Path, extra: str = "") -> Path:
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i), "level": i % 3 + 1} for i in range(6)]
    (tmp_path / "levels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "verifier.py").write_text(FIRST_CHAR_VERIFIER)
    return write_recipe(tmp_path / "eval.yaml", f"""
defaults: [base/eval]
model: {{name_or_path: tiny, dtype: float32, tiny: {json.dumps(TINY)}}}
sets:
  sampled:
    source: {tmp_path / 'levels.jsonl'}
    generation: {{do_sample: true, num_samples: 4}}
    metrics: {{pass_at: [1, 2, 4], maj_at: [1, 4], subset_column: level}}
  greedy: {{source: {tmp_path / 'levels.jsonl'}}}
generation: {{max_new_tokens: 3, batch_size: 4}}
rewards: [{{fn: verifier.py:even_first_char}}]
{extra}
""")


def reference_metrics(samples: list[dict], n: int) -> list[dict[str, float]]:
    """Each prompt's metrics recomputed from samples.jsonl with the formulas written out independently."""
    out = []
    for start in range(0, len(samples), n):
        prompt = samples[start : start + n]
        assert len({s["prompt"] for s in prompt}) == 1
        scores = [s["rewards"]["even_first_char"] for s in prompt]
        c = sum(score >= 1.0 for score in scores)
        values = {"mean@4": sum(scores) / n}
        for k in (1, 2, 4):
            values[f"pass@{k}"] = 1 - math.comb(n - c, k) / math.comb(n, k)
        for k in (1, 4):
            votes = [s["parsed"] for s in prompt[:k] if s["parsed"] is not None]
            if not votes:
                values[f"maj@{k}"] = 0.0
                continue
            counts = Counter(votes)
            top = max(counts.values())
            winner = next(v for v in votes if counts[v] == top)  # the earliest of the most voted
            values[f"maj@{k}"] = next(s["rewards"]["even_first_char"] for s in prompt if s["parsed"] == winner)
        out.append(values)
    return out


def test_eval_reports_paper_metrics_consistent_with_its_samples(tmp_path):
    out = tmp_path / "ev"
    console = postrain("eval", str(eval_setup(tmp_path)), f"output_dir={out}")
    results = json.loads((out / "results.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    sampled = results["sets"]["sampled"]
    per_prompt = reference_metrics([s for s in samples if s["set"] == "sampled"], n=4)
    assert len(per_prompt) == 6 and 0.0 < sampled["accuracy"] < 1.0  # neither all right nor all wrong
    assert sorted(sampled["metrics"]) == ["maj@1", "maj@4", "mean@4", "pass@1", "pass@2", "pass@4"]
    for name, metric in sampled["metrics"].items():
        assert metric["value"] == pytest.approx(sum(p[name] for p in per_prompt) / 6), name
        low, high = metric["ci"]
        assert low <= metric["value"] <= high, name
    assert sampled["metrics"]["mean@4"]["value"] == pytest.approx(sampled["accuracy"])
    assert sampled["metrics"]["pass@1"]["value"] == pytest.approx(sampled["accuracy"])  # a 0/1 verifier
    # per level: prompts i with i % 3 + 1 == level
    subsets = sampled["subsets"]
    assert subsets["column"] == "level" and list(subsets["values"]) == ["1", "2", "3"]
    for level, subset in subsets["values"].items():
        members = [p for i, p in enumerate(per_prompt) if i % 3 + 1 == int(level)]
        assert subset["prompts"] == 2 and subset["samples"] == 8
        assert subset["metrics"]["pass@2"]["value"] == pytest.approx(sum(p["pass@2"] for p in members) / 2)
        assert subset["metrics"]["maj@4"]["value"] == pytest.approx(sum(p["maj@4"] for p in members) / 2)
    assert {s["subset"] for s in samples if s["set"] == "sampled"} == {1, 2, 3}
    assert sorted(results["sets"]["greedy"]["metrics"]) == ["mean@1", "pass@1"]

    # shared settings once, each set's differences only
    assert results["generation"]["max_new_tokens"] == 3 and results["generation"]["do_sample"] is False
    assert sampled["generation"] == {"do_sample": True, "num_samples": 4}
    assert "generation" not in results["sets"]["greedy"] and "metric_settings" not in results["sets"]["greedy"]
    assert generation_of(results, "sampled")["num_samples"] == 4
    assert generation_of(results, "greedy")["num_samples"] == 1
    assert results["metric_settings"]["seed"] == 42 and results["metric_settings"]["interval"] == "bootstrap"
    assert sampled["metric_settings"] == {"pass_at": [1, 2, 4], "maj_at": [1, 4], "subset_column": "level"}

    # progress while generating (6 prompts in batches of 4), then the table
    assert "set sampled: batch 1/2" in console and "set sampled: batch 2/2" in console and "ETA" in console
    assert "maj@4" in console and "pass@2" in console and "greedy" in console

    # same seed, same intervals
    again = tmp_path / "again"
    postrain("eval", str(eval_setup(tmp_path)), f"output_dir={again}")
    assert json.loads((again / "results.json").read_text())["sets"] == results["sets"]


def test_comparison_mode_evaluates_every_model_on_the_same_sets(tmp_path):
    from postrain.models.loading import resolve_model_path

    same = resolve_model_path("tiny", TINY)  # the tiny model again, by its local path
    other = resolve_model_path("tiny", {**TINY, "seed": 1})
    recipe = eval_setup(tmp_path, f"models: {{first: tiny, again: {same}, other: {other}}}")
    out = tmp_path / "cmp"
    console = postrain("eval", str(recipe), f"output_dir={out}")
    results = json.loads((out / "results.json").read_text())
    assert "sets" not in results and list(results["models"]) == ["first", "again", "other"]
    assert list(model_results(results)) == ["first", "again", "other"]
    assert results["models"]["again"]["model"] == same
    assert generation_of(results, "sampled", "other")["num_samples"] == 4
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]

    def completions(label):
        return [s["completion"] for s in samples if s["model"] == label and s["set"] == "sampled"]

    assert len(completions("first")) == 24
    assert completions("first") == completions("again")  # every model samples from the same seeded stream
    assert completions("first") != completions("other")
    for label in ("first", "again", "other"):
        assert "model " + label in console and label in console.split("eval results")[-1]
    assert results["models"]["first"]["sets"] == results["models"]["again"]["sets"]


def test_eval_refuses_what_it_cannot_compute_before_writing_anything(tmp_path):
    recipe = eval_setup(tmp_path)
    out = tmp_path / "ev"
    cases = [
        (["sets.sampled.metrics.pass_at=[8]"],
         ["sets.sampled.metrics.pass_at", "k=8", "sets.sampled.generation.num_samples"]),
        (["metrics.maj_at=[2]"],
         ["metrics.maj_at", "set 'greedy'", "generation.num_samples", "sets.<set>.metrics.maj_at"]),
        (["sets.sampled.metrics.subset_column=topic"], ["sets.sampled", "'topic'", "level"]),
        (["sets.greedy.generation.num_samples=2"], ["greedy decoding", "do_sample: true"]),
        (["rewards=[{name: length, args: {max_length: 3}}]"], ["maj_at", "'length'", "exact_match"]),
        (["models=[tiny,tiny]"], ["'models'", "twice"]),
        ([f"models=[tiny,{tmp_path / 'missing'}]"], [f"models ({tmp_path / 'missing'})", "neither an existing"]),
    ]
    for overrides, phrases in cases:
        result = runner.invoke(app, ["eval", str(recipe), f"output_dir={out}", *overrides])
        assert result.exit_code != 0 and "Traceback" not in result.output, overrides
        for phrase in phrases:
            assert phrase in result.output.replace("\n", ""), (overrides, phrase, result.output)
        assert not out.exists()


def test_a_user_verifier_without_parse_cannot_vote(tmp_path):
    recipe = eval_setup(tmp_path)
    (tmp_path / "plain.py").write_text("def right(completions, **kw):\n    return [1.0 for _ in completions]\n")
    override = "rewards=[{fn: plain.py:right}]"
    result = runner.invoke(app, ["eval", str(recipe), f"output_dir={tmp_path / 'ev'}", override])
    assert result.exit_code != 0 and "sets.sampled: maj@k" in result.output and "no parse method" in result.output
    assert not (tmp_path / "ev").exists()


class CharTokenizer:
    """What score_set needs of a tokenizer: token ids to count completion lengths."""

    def __call__(self, text, add_special_tokens=False):
        return type("Encoding", (), {"input_ids": list(text.encode())})()


def test_score_set_votes_by_math_verify_equivalence():
    from postrain.rewards import build_rewards

    rows = [{"prompt": "q1", "answer": "1/2", "level": "easy"}, {"prompt": "q2", "answer": "3", "level": "hard"}]
    completions = [
        ["\\boxed{\\frac{1}{3}}", "\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", "The answer is 1/2"],  # 1/2 has 3 votes
        ["no idea", "\\boxed{4}", "I give up", "\\boxed{3}"],  # 4 and 3 tie, 4 first; 2 do not vote
    ]
    rewards, weights = build_rewards([{"name": "math_verify"}])
    summary, samples = score_set(rows, completions, rewards, weights, CharTokenizer(),
                                 metrics={"pass_at": [1, 2], "maj_at": [1, 4], "subset_column": "level"}, seed=1)
    assert [s["rewards"]["math_verify"] for s in samples] == [0, 1, 1, 1, 0, 0, 0, 1]
    values = {name: metric["value"] for name, metric in summary["metrics"].items()}
    assert values == pytest.approx({
        "mean@4": (3 / 4 + 1 / 4) / 2,
        "pass@1": (3 / 4 + 1 / 4) / 2,
        "pass@2": (1.0 + (1 - 3 / 6)) / 2,  # q1: n-c=1 < 2, so 1; q2: 1 - C(3,2)/C(4,2)
        "maj@1": 0.0,                       # q1's first answer 1/3 is wrong; q2's first does not parse
        "maj@4": (1.0 + 0.0) / 2,
    })
    assert summary["unparsable"] == pytest.approx(2 / 8)
    assert summary["subsets"]["values"]["easy"]["metrics"]["maj@4"]["value"] == 1.0
    assert summary["subsets"]["values"]["hard"]["metrics"]["maj@4"] == {"value": 0.0, "ci": None}  # one prompt

    # the same vote by exact match: "0.5", "\frac{1}{2}" and "1/2" are three different strings, "1/3" came first
    rewards, weights = build_rewards([{"name": "exact_match"}])
    summary, _ = score_set(rows, completions, rewards, weights, CharTokenizer(), metrics={"maj_at": [4]})
    assert summary["metrics"]["maj@4"]["value"] == 0.0


def test_score_set_keeps_its_signature_and_reports_pass_at_1_by_default():
    from postrain.rewards import build_rewards

    rewards, weights = build_rewards([{"name": "exact_match"}])
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}, {"prompt": "c", "answer": "3"}]
    summary, _ = score_set(rows, [["1"], ["5"], ["3"]], rewards, weights, CharTokenizer())
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert set(summary["metrics"]) == {"mean@1", "pass@1"} and "subsets" not in summary
    assert summary["metrics"]["pass@1"]["value"] == pytest.approx(2 / 3)


def test_smoke_keeps_an_eval_recipe_with_metrics_valid(tmp_path):
    from postrain.jobs import load_smoke_recipe

    recipe = eval_setup(tmp_path, "metrics: {maj_at: [3]}\nmodels: [runs/a, runs/b]")
    write_recipe(recipe, recipe.read_text().replace("generation: {do_sample: true, num_samples: 4}",
                                                    "generation: {num_samples: 4}")
                 .replace("generation: {max_new_tokens: 3, batch_size: 4}",
                          "generation: {max_new_tokens: 3, batch_size: 4, do_sample: true, num_samples: 3}"))
    cfg = load_smoke_recipe(recipe, [], "eval").cfg
    assert cfg["generation"]["num_samples"] == 3 and cfg["sets"]["sampled"]["generation"]["num_samples"] == 4
    assert cfg["models"] is None and cfg["sets"]["sampled"]["metrics"]["subset_column"] is None
