"""`postrain eval` with `eval.backend: lm_eval`: lm-eval (used as a library) on local task YAMLs (no hub), the tiny
model loaded by postrain. lm-eval's numbers are checked against the same quantities computed here by hand: a
multiple-choice task's acc / acc_norm from a plain forward pass, a generation task's exact_match on data whose
answers are (for half the rows) the model's own greedy continuation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from postrain.cli import app
from tests.conftest import REPO, TINY, postrain, read_jsonl, write_recipe

runner = CliRunner()
TASKS = REPO / "tests" / "lm_eval_tasks"
MODEL = {"name_or_path": "tiny", "dtype": "float32", "tiny": TINY}


def lm_eval_recipe(path: Path, lm_eval: str, extra: str = "") -> Path:
    return write_recipe(path, f"""
defaults: [base/eval]
model: {json.dumps(MODEL)}
eval: {{backend: lm_eval}}
lm_eval: {lm_eval}
{extra}
""")


def choice_log_likelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """log p(" " + choice | context) summed over the choice's tokens, from one forward pass per choice."""
    import torch

    out = []
    for choice in choices:
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        ids = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
        assert ids[: len(context_ids)] == context_ids  # one token per character: the split is exact
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        out.append(sum(log_probs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids))))
    return out


def greedy_continuation(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy continuation up to the first newline (what the generation task's `until` keeps)."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]


def test_lm_eval_backend_scores_local_tasks_as_computed_by_hand(tmp_path):
    from postrain.models.loading import load_model

    model, tokenizer, _ = load_model(MODEL)
    model.eval()

    # generation data: even rows ask for the model's own greedy continuation (right by construction), odd rows for
    # the sum (which an untrained model does not write)
    rows = read_jsonl(TASKS / "arith_gen.jsonl")
    for i, row in enumerate(rows):
        own = greedy_continuation(model, tokenizer, row["prompt"], max_new_tokens=4)
        if i % 2 == 0:
            row["answer"] = own
        assert (row["answer"] == own) == (i % 2 == 0), (row, own)
    (tmp_path / "own.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a task YAML given by path, built on the checked-in one (lm-eval's `include:`) with other data
    (tmp_path / "own_gen.yaml").write_text(
        f"include: {TASKS / 'arith_gen.yaml'}\ntask: own_gen\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'own.jsonl'}\n")

    recipe = lm_eval_recipe(tmp_path / "eval.yaml",
                            f"{{include_path: {TASKS}, tasks: [postrain_arith_mc, own_gen.yaml], batch_size: 4}}")
    out = tmp_path / "ev"
    console = postrain("eval", str(recipe), f"output_dir={out}")
    results = json.loads((out / "results.json").read_text())
    assert results["backend"] == "lm_eval" and list(results["sets"]) == ["postrain_arith_mc", "own_gen"]
    assert results["lm_eval"]["tasks"] == ["postrain_arith_mc", str(tmp_path / "own_gen.yaml")]
    mc, gen = results["sets"]["postrain_arith_mc"], results["sets"]["own_gen"]
    mc_rows = read_jsonl(TASKS / "arith_mc.jsonl")
    assert (mc["prompts"], gen["prompts"]) == (len(mc_rows), len(rows)) == (12, 10)
    assert sorted(mc["metrics"]) == ["acc", "acc_norm"] and list(gen["metrics"]) == ["exact_match"]
    for summary in (mc, gen):
        for name, metric in summary["metrics"].items():
            assert 0.0 <= metric["value"] <= 1.0 and metric["stderr"] is not None, name
            low, high = metric["ci"]
            assert 0.0 <= low <= metric["value"] <= high <= 1.0, name

    # acc and acc_norm by hand: the choice with the largest log-likelihood (acc), per character of the choice
    # (acc_norm), against the label
    acc = acc_norm = 0
    for row in mc_rows:
        lls = choice_log_likelihoods(model, tokenizer, row["question"], row["choices"])
        acc += max(range(len(lls)), key=lambda i: lls[i]) == row["label"]
        acc_norm += max(range(len(lls)), key=lambda i: lls[i] / len(row["choices"][i])) == row["label"]
    assert acc != acc_norm  # the two metrics are told apart on this data
    assert mc["metrics"]["acc"]["value"] == pytest.approx(acc / len(mc_rows))
    assert mc["metrics"]["acc_norm"]["value"] == pytest.approx(acc_norm / len(mc_rows))
    assert mc["accuracy"] == mc["metrics"]["acc"]["value"]
    assert gen["metrics"]["exact_match"]["value"] == pytest.approx(0.5)
    assert gen["generation"] == {"until": ["\n"], "do_sample": False, "max_gen_toks": 4}

    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 22 and {s["set"] for s in samples} == {"postrain_arith_mc", "own_gen"}
    first = next(s for s in samples if s["set"] == "postrain_arith_mc" and s["doc_id"] == 0)
    assert first["answer"] == " " + mc_rows[0]["choices"][mc_rows[0]["label"]]
    assert first["score"] == first["metrics"]["acc"] and len(first["loglikelihoods"]) == 3
    assert [s["score"] for s in samples if s["set"] == "own_gen"] == [1.0, 0.0] * 5
    assert "acc_norm" in console and "exact_match" in console and "own_gen (10 prompts)" in console


def test_lm_eval_backend_compares_models_and_limits_documents(tmp_path):
    from postrain.models.loading import resolve_model_path

    other = resolve_model_path("tiny", {**TINY, "seed": 1})
    recipe = lm_eval_recipe(tmp_path / "eval.yaml", f"{{include_path: {TASKS}, tasks: [postrain_arith_mc], limit: 5}}",
                            f"models: {{base: tiny, other: {other}}}")
    out = tmp_path / "cmp"
    console = postrain("eval", str(recipe), f"output_dir={out}")
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["base", "other"] and "sets" not in results
    for label in ("base", "other"):
        summary = results["models"][label]["sets"]["postrain_arith_mc"]
        assert summary["prompts"] == 5 and summary["task_documents"] == 12
        assert "model " + label in console
    samples = read_jsonl(out / "samples.jsonl")
    assert [s["model"] for s in samples] == ["base"] * 5 + ["other"] * 5
    # two different models: their log-likelihoods differ
    assert [s["loglikelihoods"] for s in samples[:5]] != [s["loglikelihoods"] for s in samples[5:]]


def test_lm_eval_settings_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "ev"
    good = f"{{include_path: {TASKS}, tasks: [postrain_arith_mc]}}"
    cases = [
        (f"{{include_path: {TASKS}, taks: [postrain_arith_mc]}}", "", [], ["unknown key 'lm_eval.taks'", "tasks"]),
        ("{num_fewshot: 0}", "", [], ["eval.backend is lm_eval", "lm_eval.tasks is empty"]),
        (good, "", ["eval.backend=postrain"], ["'lm_eval'", "eval.backend is 'postrain'"]),
        (good, "", ["eval.backend=lm_evl"], ["eval.backend", "lm_eval"]),
        ("{include_path: no_such_folder, tasks: [x]}", "", [], ["lm_eval.include_path", "not a folder"]),
        ("{tasks: [missing.yaml]}", "", [], ["task file 'missing.yaml' does not exist"]),
        (good, "sets: {a: {source: 'builtin:arithmetic'}}", [], ["'sets'", "postrain backend"]),
        (good, "", ["lm_eval.batch_size=big"], ["lm_eval.batch_size", "'auto'"]),
        (good, "", ["lm_eval.limit=0"], ["lm_eval.limit"]),
    ]
    for lm_eval, extra, overrides, phrases in cases:
        recipe = lm_eval_recipe(tmp_path / "eval.yaml", lm_eval, extra)
        result = runner.invoke(app, ["eval", str(recipe), f"output_dir={out}", *overrides])
        assert result.exit_code != 0 and "Traceback" not in result.output, (lm_eval, overrides, result.output)
        for phrase in phrases:
            assert phrase in result.output.replace("\n", ""), (lm_eval, overrides, phrase, result.output)
        assert not out.exists()


def test_an_unknown_task_name_is_refused_with_the_nearest_name(tmp_path):
    out = tmp_path / "ev"
    recipe = lm_eval_recipe(tmp_path / "eval.yaml", f"{{include_path: {TASKS}, tasks: [postrain_arith_mcq]}}")
    result = runner.invoke(app, ["eval", str(recipe), f"output_dir={out}"])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert "'postrain_arith_mcq' is not one of lm-eval's tasks" in result.output.replace("\n", "")
    assert "did you mean 'postrain_arith_mc'" in result.output.replace("\n", "")
    assert not out.exists()


def test_task_metrics_names_filters_and_intervals():
    from postrain.evaluation.lm_eval_backend import task_metrics

    reported = {
        "alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
        "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": "N/A",
        "acc,none": 0.02, "acc_stderr,none": 0.05, "bleu,none": 30.0, "bleu_stderr,none": 2.0,
    }
    metrics = task_metrics(reported, {"exact_match": True, "bleu": True}, 0.95,
                           unit={("exact_match", "strict-match"), ("acc", "none")})
    assert list(metrics) == ["exact_match/strict-match", "exact_match/flexible-extract", "acc", "bleu"]
    strict = metrics["exact_match/strict-match"]
    assert strict["ci"] == pytest.approx([0.25 - 1.959964 * 0.1, 0.25 + 1.959964 * 0.1])
    assert strict["stderr"] == 0.1 and strict["higher_is_better"] is True
    assert metrics["exact_match/flexible-extract"] == {"value": 0.5, "ci": None, "stderr": None,
                                                       "higher_is_better": True}
    assert metrics["acc"]["ci"] == pytest.approx([0.0, 0.02 + 1.959964 * 0.05])  # clipped at 0: a 0/1 metric
    assert metrics["bleu"]["ci"] == pytest.approx([30.0 - 1.959964 * 2.0, 30.0 + 1.959964 * 2.0])  # not clipped
