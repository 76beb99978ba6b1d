"""Built-in tasks, file sources, column mapping and the errors that name what is missing."""

from __future__ import annotations

import csv
import json

import pytest

from postrain.data.sources import load_source
from postrain.data.tasks import build_task
from postrain.errors import DataError


def test_arithmetic_answers_are_exact():
    rows = build_task("arithmetic", "train", {"n": 200, "digits": 3, "ops": "+-*"})
    assert len(rows) == 200
    for r in rows:
        a, op, b = r["prompt"][:3], r["prompt"][3], r["prompt"][4:7]
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert r["answer"] == r["completion"] == r["chosen"] == str(expected)
        assert r["rejected"] != r["answer"]
        assert len(a) == len(b) == 3 and r["prompt"].endswith("=")


def test_splits_are_disjoint_and_deterministic():
    train = {r["prompt"] for r in build_task("arithmetic", "train", {"n": 3000})}
    test = {r["prompt"] for r in build_task("arithmetic", "test", {"n": 300})}
    assert train and test and not train & test
    assert train == {r["prompt"] for r in build_task("arithmetic", "train", {"n": 3000})}


def test_unknown_task_parameter_is_named():
    with pytest.raises(DataError, match="no parameter 'digit'.*digits"):
        build_task("arithmetic", "train", {"digit": 2})


def test_task_keys_are_typed_and_an_unknown_task_is_named():
    with pytest.raises(DataError, match=r"^parameter 'n' of built-in task 'arithmetic' \(source 'builtin:arithmetic', "
                                        r"task:\) must be int, got str 'ten'$"):
        build_task("arithmetic", "train", {"n": "ten"})
    with pytest.raises(DataError, match=r"'ops' of built-in task 'arithmetic_code'.*must be str"):
        build_task("arithmetic_code", "train", {"ops": 3})
    with pytest.raises(DataError, match=r"^unknown built-in task 'revrse' \(source 'builtin:revrse'\): "
                                        r"did you mean 'reverse'\? valid: arithmetic, .*reverse"):
        build_task("revrse", "train", {})


def test_every_task_takes_the_split_and_its_defaults_fit_its_types():
    from postrain.data.tasks import TASKS
    from postrain.value_types import check_value

    for variant in TASKS:
        assert variant.data == {"split": False}, variant.name  # the split, then the task: keys (keyword-only)
        types = variant.param_types
        for name, default in variant.params.items():
            check_value(default, types[name], variant.ranges.get(name), f"task {variant.name} {name}")


def test_a_task_added_with_one_decorator_is_read_by_a_recipe(monkeypatch):
    """The README's "Adding a built-in task" example, as written there: registered, then read through a recipe's
    data source (load_source, the jobs' path), nothing else edited."""
    from postrain.data.tasks import TASKS
    from tests.conftest import readme_example

    monkeypatch.setattr(TASKS, "entries", dict(TASKS.entries))  # the registration is undone after the test
    exec(readme_example("### Adding a built-in task"), {"TASKS": TASKS})
    train = load_source({"source": "builtin:countdown", "task": {"n": 3, "start": 20}}, "sft", where="data.train")
    assert train["prompt"] == ["20-1=", "22-1=", "24-1="] and train["completion"] == ["19", "21", "23"]
    test = load_source({"source": "builtin:countdown", "split": "test", "task": {"n": 2}}, "grpo")
    assert test["prompt"] == ["11-1=", "13-1="] and test["answer"] == ["10", "12"]
    for task, message in [({"nn": 3}, "no parameter 'nn'.*did you mean 'n'"),
                          ({"n": "fifty"}, "parameter 'n' of built-in task 'countdown'.*must be int")]:
        with pytest.raises(DataError, match=message):
            load_source({"source": "builtin:countdown", "task": task}, "sft")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_file_sources_with_column_mapping(tmp_path, suffix):
    rows = [{"question": f"q{i}", "gold": str(i)} for i in range(5)]
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["question", "gold"])
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    ds = load_source({"source": str(path), "columns": {"prompt": "question", "answer": "gold"}}, "grpo")
    assert ds["prompt"] == [f"q{i}" for i in range(5)] and ds["answer"] == [str(i) for i in range(5)]


def test_missing_column_names_dataset_wanted_and_present(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q", "response": "r"}) + "\n")
    with pytest.raises(DataError) as e:
        load_source({"source": str(path)}, "dpo", where="data.train")
    msg = str(e.value)
    assert str(path) in msg and "'prompt'" in msg and "question, response" in msg and "data.train" in msg
    with pytest.raises(DataError, match="no column 'questoin'.*question, response"):
        load_source({"source": str(path), "columns": {"prompt": "questoin"}}, "grpo")


def test_chat_wrapping_and_template():
    ds = load_source({"source": "builtin:arithmetic", "task": {"n": 3}, "chat": True, "system_prompt": "be exact",
                      "prompt_template": "Q: {prompt}"}, "sft")
    row = ds[0]
    assert row["prompt"][0] == {"role": "system", "content": "be exact"}
    assert row["prompt"][1]["role"] == "user" and row["prompt"][1]["content"].startswith("Q: ")
    assert row["completion"] == [{"role": "assistant", "content": row["answer"]}]


def test_score_pairs_pairs_best_with_worst(tmp_path):
    samples = [
        {"prompt": "1+1=", "completion": "2", "score": 1.0},
        {"prompt": "1+1=", "completion": "3", "score": 0.0},
        {"prompt": "2+2=", "completion": "4", "score": 1.0},
        {"prompt": "2+2=", "completion": "4", "score": 1.0},  # no contrast: no pair
    ]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    ds = load_source({"source": str(path), "transform": "score_pairs"}, "dpo")
    assert len(ds) == 1 and ds[0]["chosen"] == "2" and ds[0]["rejected"] == "3"


def test_hub_name_is_passed_through(monkeypatch):
    import datasets

    seen = {}

    def fake_load(name, config, split):
        seen.update(name=name, config=config, split=split)
        return datasets.Dataset.from_list([{"problem": "p", "answer": "a"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ds = load_source({"source": "org/some-data", "config": "main", "split": "test", "columns": {"prompt": "problem"}}, "grpo")
    assert seen == {"name": "org/some-data", "config": "main", "split": "test"} and ds[0]["prompt"] == "p"


@pytest.mark.parametrize("task", ["arithmetic", "reverse"])
def test_label_noise_replaces_only_the_sft_target_by_the_wrong_answer(task):
    from postrain.data.tasks import TASKS

    clean = TASKS.get(task).fn(n=400)
    noisy = TASKS.get(task).fn(n=400, label_noise=0.3)
    assert [r["prompt"] for r in clean] == [r["prompt"] for r in noisy]
    flipped = [n for c, n in zip(clean, noisy) if n["completion"] != c["completion"]]
    assert 0.2 < len(flipped) / len(noisy) < 0.4  # about the asked fraction
    for row in noisy:
        assert row["answer"] == row["chosen"] and row["completion"] in (row["answer"], row["rejected"])
    assert all(r["completion"] == r["rejected"] != r["answer"] for r in flipped)
    assert TASKS.get(task).fn(n=400, label_noise=0.3) == noisy  # deterministic
    with pytest.raises(DataError, match="label_noise must be in"):
        TASKS.get(task).fn(n=4, label_noise=1.0)


def test_answers_that_repeat_the_prompt_turns_keep_only_the_answer(tmp_path):
    """UltraFeedback-style rows (prompt a string, chosen/rejected [user, assistant]) must not render the user turn
    twice: once as the prompt and again inside the answer."""
    row = {"prompt": "2+2?", "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
           "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}
    path = tmp_path / "uf.jsonl"
    path.write_text(json.dumps(row) + "\n")
    out = load_source({"source": str(path), "chat": True}, "dpo")[0]
    assert out["prompt"] == [{"role": "user", "content": "2+2?"}]
    assert out["chosen"] == [{"role": "assistant", "content": "4"}]
    assert out["rejected"] == [{"role": "assistant", "content": "5"}]
    plain = {"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    path.write_text(json.dumps(plain) + "\n")
    assert load_source({"source": str(path)}, "dpo")[0]["chosen"] == plain["chosen"]  # answers alone are kept as is


def test_prompts_that_do_not_fit_are_refused_dropped_or_kept(caplog):
    """SFT/DPO: a prompt of max_length tokens or more leaves no completion token after TRL's truncation; GRPO: a
    prompt plus max_completion_length past the model's positions. Counted with the policy's own tokenizer."""
    import types

    import datasets

    from postrain.data.lengths import fit_lengths
    from postrain.models.loading import load_tokenizer, resolve_model_path
    from tests.conftest import TINY

    path = resolve_model_path("tiny", TINY)
    tokenizer = load_tokenizer(path)
    prompts = ["1+1=", "9" * 40, "2+2=", "8" * 31, "7" * 32]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    rows = datasets.Dataset.from_list([{"prompt": p, "completion": "abc"} for p in prompts])
    sft = types.SimpleNamespace(max_length=32, packing=False, truncation_mode="keep_start")
    expected = [i for i, n in enumerate(lengths) if n < 32]
    with pytest.raises(DataError, match=r"data.train: \d of 5 rows .*trainer.max_length=32.*row 1 of data.train"):
        fit_lengths(rows, "sft", sft, tokenizer, path, "refuse", "data.train")
    kept = fit_lengths(rows, "sft", sft, tokenizer, path, "drop", "data.train")
    assert kept["prompt"] == [prompts[i] for i in expected] and len(expected) < 5
    assert len(fit_lengths(rows, "sft", sft, tokenizer, path, "keep", "data.train")) == 5
    assert "kept" in caplog.text and "dropped" in caplog.text
    grpo = types.SimpleNamespace(max_completion_length=256 - 32)  # the tiny model has 256 positions
    assert fit_lengths(rows, "grpo", grpo, tokenizer, path, "drop", "data.train")["prompt"] == \
        [p for p, n in zip(prompts, lengths) if n <= 32]
