"""Every malformed input is one clear error before anything is written: a table of bad recipes, overrides, data
files and environments, each run through the command line as a user runs it. Each must exit with code 2, print
one `error:` line naming the key, file, row or column, show no traceback, and leave the working directory (the
test's tmp folder, which holds the inputs and the run directory) exactly as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from postrain.cli import app
from tests.conftest import TINY

runner = CliRunner()

TINY_MODEL = "{name_or_path: tiny, dtype: float32, tiny: " + json.dumps(TINY) + "}"
RECIPES = {
    "sft": f"defaults: [base/sft]\nname: bad\nmodel: {TINY_MODEL}\n"
           "data: {train: {source: 'builtin:arithmetic', task: {n: 16, digits: 1}}}\n"
           "trainer: {max_steps: 1, per_device_train_batch_size: 4, max_length: 32, logging_steps: 1}\n",
    "dpo": f"defaults: [base/dpo]\nname: bad\nmodel: {TINY_MODEL}\n"
           "data: {train: {source: 'builtin:arithmetic', task: {n: 16, digits: 1}}}\n"
           "trainer: {max_steps: 1, per_device_train_batch_size: 4, max_length: 32, logging_steps: 1}\n",
    "grpo": f"defaults: [base/grpo]\nname: bad\nmodel: {TINY_MODEL}\n"
            "data: {train: {source: 'builtin:arithmetic', task: {n: 16, digits: 1}}}\n"
            "rewards: [{name: exact_match}]\n"
            "trainer: {max_steps: 1, per_device_train_batch_size: 4, num_generations: 2, max_completion_length: 4, "
            "logging_steps: 1}\n",
}


def recipe(command: str, extra: str = "") -> callable:
    """A case whose input is a good recipe for `command` (with `extra` YAML lines appended) plus overrides."""
    def setup(tmp: Path, *overrides: str) -> list[str]:
        path = tmp / f"{command}.yaml"
        path.write_text(RECIPES[command] + extra)
        return [command, str(path), *overrides]
    return setup


def recipe_file(text: bytes | str, command: str = "sft", name: str = "r.yaml") -> callable:
    def setup(tmp: Path) -> list[str]:
        path = tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return [command, str(path)]
    return setup


def override(command: str, *overrides: str) -> callable:
    return lambda tmp: recipe(command)(tmp, *overrides)


def data(command: str, filename: str, content: bytes | str | list, *overrides: str) -> callable:
    """A good recipe reading `filename` (written with `content`: bytes, text, or rows for parquet)."""
    def setup(tmp: Path) -> list[str]:
        path = tmp / filename
        if isinstance(content, list):
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(content), path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return recipe(command)(tmp, f"data.train.source={path}", *overrides)
    return setup


def jsonl(*rows) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


GOOD = {"prompt": "1+1=", "answer": "2"}
PAIR = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
SFT_ROW = {"prompt": "1+1=", "completion": "2"}


def model_folder(damage: str) -> callable:
    """A copy of the tiny model, damaged: its weights truncated, its config cut, a shard its index names gone, or
    no model files at all."""
    def setup(tmp: Path) -> list[str]:
        from postrain.models.loading import resolve_model_path

        source = Path(resolve_model_path("tiny", TINY))
        folder = tmp / "model_copy"
        shutil.copytree(source, folder)
        weights = folder / "model.safetensors"
        if damage == "truncated":
            os.truncate(weights, weights.stat().st_size - 64)
        elif damage == "config":
            (folder / "config.json").write_text('{"model_type": "qwen2", ')
        elif damage == "index":
            (folder / "model.safetensors.index.json").write_text(json.dumps(
                {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
        elif damage == "tiny_header":
            weights.write_bytes(b"\x05\x00")
        elif damage == "empty":
            for path in folder.iterdir():
                path.unlink()
            (folder / "notes.txt").write_text("no model here")
        return recipe("sft")(tmp, f"model.name_or_path={folder}")
    return setup


def merge_of_depths(tmp: Path) -> list[str]:
    from postrain.models.loading import resolve_model_path

    two = resolve_model_path("tiny", {**TINY, "num_layers": 2})
    one = resolve_model_path("tiny", TINY)
    path = tmp / "merge.yaml"
    path.write_text("command: merge\nname: m\nmerge: {merge_method: linear, dtype: float32, models: ["
                    f"{{model: {one}, parameters: {{weight: 0.5}}}}, {{model: {two}, parameters: {{weight: 0.5}}}}]}}\n")
    return ["merge", str(path)]


def output_dir(kind: str) -> callable:
    def setup(tmp: Path) -> list[str]:
        (tmp / "a_file").write_text("not a directory")
        target = {"file": tmp / "a_file", "below_file": tmp / "a_file" / "run", "unwritable": "/sys/postrain-test-run"}
        return recipe("sft")(tmp, f"output_dir={target[kind]}")
    return setup


def cycle(tmp: Path) -> list[str]:
    (tmp / "a.yaml").write_text("defaults: [b]\ncommand: sft\n")
    (tmp / "b.yaml").write_text("defaults: [a]\n")
    return ["sft", str(tmp / "a.yaml")]


def directory_recipe(tmp: Path) -> list[str]:
    (tmp / "folder.yaml").mkdir()
    return ["sft", str(tmp / "folder.yaml")]


CASES = {
    # -- recipe files -----------------------------------------------------------------------------------------
    "empty recipe": (recipe_file(""), ["r.yaml", "is empty"]),
    "comments-only recipe": (recipe_file("# nothing here\n"), ["r.yaml", "is empty"]),
    "binary recipe": (recipe_file(bytes(range(256)) * 4), ["r.yaml", "not a text"]),
    "recipe with NUL bytes": (recipe_file("command: sft\x00\n"), ["r.yaml", "NUL"]),
    "invalid YAML": (recipe_file("command: sft\ntrainer: {learning_rate: 1\n"), ["r.yaml", "line 3", "not valid YAML"]),
    "duplicate top-level key": (recipe_file("command: sft\ntrainer: {max_steps: 1}\ntrainer: {max_steps: 2}\n"),
                                ["r.yaml", "line 3", "duplicate key 'trainer'"]),
    "duplicate nested key": (recipe_file("command: sft\ntrainer:\n  max_steps: 1\n  max_steps: 2\n"),
                             ["r.yaml", "line 4", "duplicate key 'max_steps'"]),
    "top-level list": (recipe_file("- command: sft\n"), ["r.yaml", "mapping at the top level"]),
    "unknown top-level key": (recipe("sft", "traner: {max_steps: 1}\n"), ["'traner'", "sft.yaml"]),
    "unknown trainer key": (recipe_file("defaults: [base/sft]\ntrainer: {lerning_rate: 0.1}\n"),
                            ["trainer.lerning_rate", "r.yaml", "learning_rate"]),
    "unknown model key": (recipe_file("defaults: [base/sft]\nmodel: {nme_or_path: tiny}\n"),
                          ["model.nme_or_path", "r.yaml"]),
    "defaults cycle": (cycle, ["cycle"]),
    "defaults naming a missing recipe": (recipe_file("defaults: [no_such_base]\ncommand: sft\n"), ["no_such_base"]),
    "defaults not a list": (recipe_file("defaults: {a: 1}\ncommand: sft\n"), ["'defaults'"]),
    "recipe is a directory": (directory_recipe, ["folder.yaml", "directory"]),
    "recipe not found": (lambda tmp: ["sft", str(tmp / "missing.yaml")], ["missing.yaml", "not found"]),
    "command mismatch": (lambda tmp: ["sft", recipe("dpo")(tmp)[1]],
                         ["dpo.yaml", "`dpo` recipe"]),
    "unknown command": (recipe_file("command: train\n"), ["unknown command 'train'"]),
    "wrong type: seed": (recipe("sft", "seed: abc\n"), ["'seed'", "int"]),
    "wrong literal: model.dtype": (recipe_file("defaults: [base/sft]\nmodel: {dtype: float64}\n"), ["model.dtype"]),
    "trainer.output_dir": (override("sft", "trainer.output_dir=elsewhere"), ["output_dir"]),
    # -- overrides: ranges and types ------------------------------------------------------------------------------
    "override without =": (override("sft", "trainer.learning_rate"), ["trainer.learning_rate", "key=value"]),
    "misspelt override": (override("sft", "trainer.lerning_rate=0.1"), ["trainer.lerning_rate", "command line"]),
    "learning rate text": (override("sft", "trainer.learning_rate=abc"), ["trainer.learning_rate"]),
    "negative learning rate": (override("sft", "trainer.learning_rate=-1"), ["trainer.learning_rate", ">= 0"]),
    "batch size 0": (override("sft", "trainer.per_device_train_batch_size=0"),
                     ["trainer.per_device_train_batch_size", ">= 1"]),
    "accumulation 0": (override("sft", "trainer.gradient_accumulation_steps=0"), ["trainer.gradient_accumulation_steps"]),
    "negative max_length": (override("sft", "trainer.max_length=-3"), ["trainer.max_length", ">= 1"]),
    "negative epochs": (override("sft", "trainer.num_train_epochs=-1"), ["trainer.num_train_epochs"]),
    "negative weight decay": (override("sft", "trainer.weight_decay=-0.1"), ["trainer.weight_decay"]),
    "negative warmup": (override("sft", "trainer.warmup_steps=-5"), ["trainer.warmup_steps"]),
    "adam beta1 above 1": (override("sft", "trainer.adam_beta1=1.5"), ["trainer.adam_beta1"]),
    "logging steps 0": (override("sft", "trainer.logging_steps=0"), ["trainer.logging_steps"]),
    "negative seed": (override("sft", "trainer.seed=-1"), ["trainer.seed"]),
    "negative max_grad_norm": (override("sft", "trainer.max_grad_norm=-1"), ["trainer.max_grad_norm"]),
    "LoRA r < 0": (override("sft", "peft.r=-1"), ["peft.r", ">= 1"]),
    "LoRA r = 0": (override("sft", "peft.r=0"), ["peft.r"]),
    "LoRA alpha < 0": (override("sft", "peft.lora_alpha=-2"), ["peft.lora_alpha"]),
    "LoRA dropout 1.5": (override("sft", "peft.lora_dropout=1.5"), ["peft.lora_dropout"]),
    "LoRA unknown key": (override("sft", "peft.rank=8"), ["peft.rank"]),
    "GRPO one generation": (override("grpo", "trainer.num_generations=1"), ["num_generations"]),
    "GRPO temperature 0": (override("grpo", "trainer.temperature=0"), ["trainer.temperature", "> 0"]),
    "GRPO top_p 1.5": (override("grpo", "trainer.top_p=1.5"), ["trainer.top_p"]),
    "GRPO negative epsilon": (override("grpo", "trainer.epsilon=-0.2"), ["trainer.epsilon"]),
    "GRPO negative beta": (override("grpo", "trainer.beta=-0.1"), ["trainer.beta"]),
    "GRPO completion length 0": (override("grpo", "trainer.max_completion_length=0"),
                                 ["trainer.max_completion_length"]),
    "GRPO batch not divisible": (override("grpo", "trainer.num_generations=3"), ["num_generations (3)"]),
    "DPO beta 0": (override("dpo", "trainer.beta=0"), ["trainer.beta", "> 0"]),
    "loss parameter text": (override("dpo", "loss=[{name: simpo, beta: abc}]"), ["'beta'", "simpo", "loss[0]"]),
    "loss parameter out of range": (override("dpo", "loss=[{name: simpo, beta: -1}]"), ["'beta'", "> 0"]),
    "loss parameter misspelt": (override("dpo", "loss=[{name: simpo, betta: 1}]"), ["'betta'", "beta"]),
    "unknown loss": (override("dpo", "loss=[{name: simpoo}]"), ["'simpoo'", "simpo"]),
    "label smoothing 0.9": (override("dpo", "loss=[{name: cdpo, label_smoothing: 0.9}]"), ["'label_smoothing'"]),
    "method epsilon -1": (override("grpo", "method={name: dapo, epsilon: -1}"), ["'epsilon'", "dapo", "> 0"]),
    "method epsilon text": (override("grpo", "method={name: dapo, epsilon: abc}"), ["'epsilon'", "dapo"]),
    "unknown method": (override("grpo", "method=dappo"), ["'dappo'", "dapo"]),
    "policy loss epsilon -1": (override("grpo", "rl.policy_loss={name: ppo_clip, epsilon: -1}"),
                               ["'epsilon'", "ppo_clip", "rl.policy_loss"]),
    "dual clip c below 1": (override("grpo", "rl.policy_loss={name: dual_clip, dual_clip_c: 0.5}"),
                            ["'dual_clip_c'", "must exceed 1"]),
    "reward timeout 0": (override("grpo", "reward_errors.timeout=0"), ["reward_errors.timeout"]),
    "reward failure score NaN": (override("grpo", "reward_errors.score=.nan"), ["reward_errors.score"]),
    "reward policy unknown": (override("grpo", "reward_errors.policy=ignore"), ["reward_errors.policy"]),
    "unknown reward": (override("grpo", "rewards=[{name: exact_matc}]"), ["'exact_matc'", "rewards[0]"]),
    "code_exec bad limit": (override("grpo", "rewards=[{name: code_exec, args: {timeout_s: 0}}]"),
                            ["code_exec", "timeout_s"]),
    "reward arg of the wrong type": (override("grpo", "rewards=[{name: exact_match, args: {answer_column: 3}}]"),
                                     ["'answer_column'", "'exact_match'", "rewards[0]", "must be str"]),
    "task key misspelt": (override("sft", "data.train.task.digit=2"), ["'digit'", "'arithmetic'", "digits"]),
    "task key of the wrong type": (override("sft", "data.train.task.n=ten"),
                                   ["'n'", "builtin:arithmetic", "must be int"]),
    "chunk index out of range": (override("sft", "data.train.chunk={index: 3, of: 2}"), ["data.train.chunk.index"]),
    "model path missing": (lambda tmp: recipe("sft")(tmp, f"model.name_or_path={tmp / 'nowhere'}"),
                           ["model.name_or_path", "nowhere"]),
    # -- data files -----------------------------------------------------------------------------------------------
    "null prompt": (data("grpo", "d.jsonl", jsonl(GOOD, {**GOOD, "prompt": None})),
                    ["d.jsonl", "line 2", "'prompt'", "null"]),
    "NaN prompt": (data("grpo", "d.jsonl", jsonl(GOOD, '{"prompt": NaN, "answer": "2"}')),
                   ["d.jsonl", "line 2", "'prompt'", "NaN"]),
    "number prompts": (data("grpo", "d.jsonl", jsonl({**GOOD, "prompt": 5})), ["d.jsonl", "line 1", "'prompt'"]),
    "number prompt among text": (data("grpo", "d.jsonl", jsonl(GOOD, GOOD, {**GOOD, "prompt": 7})),
                                 ["d.jsonl", "line 3", "'prompt'", "line 1 holds text"]),
    "list-of-strings prompt": (data("grpo", "d.jsonl", jsonl({**GOOD, "prompt": ["a", "b"]})),
                               ["d.jsonl", "line 1", "'prompt'", "chat turns"]),
    "row missing prompt": (data("grpo", "d.jsonl", jsonl(GOOD, {"answer": "3"})),
                           ["d.jsonl", "line 2", "no column 'prompt'"]),
    "JSON array as a row": (data("grpo", "d.jsonl", jsonl(GOOD, "[1, 2]")), ["d.jsonl", "line 2", "JSON object"]),
    "invalid JSON line": (data("grpo", "d.jsonl", jsonl(GOOD, GOOD, '{"prompt": ')), ["d.jsonl", "line 3", "JSON"]),
    "non-UTF-8 line": (data("grpo", "d.jsonl", jsonl(GOOD).encode() + b'{"prompt": "\xff\xfe", "answer": "1"}\n'),
                       ["d.jsonl", "line 2", "UTF-8"]),
    "blank lines counted": (data("grpo", "d.jsonl", jsonl(GOOD) + "\n\n" + jsonl({**GOOD, "prompt": None})),
                            ["d.jsonl", "line 4", "'prompt'"]),
    "DPO null chosen": (data("dpo", "p.jsonl", jsonl(PAIR, {**PAIR, "chosen": None})),
                        ["p.jsonl", "line 2", "'chosen'", "null"]),
    "DPO number rejected": (data("dpo", "p.jsonl", jsonl({**PAIR, "rejected": 3})), ["p.jsonl", "line 1", "'rejected'"]),
    "DPO row missing rejected": (data("dpo", "p.jsonl", jsonl(PAIR, {"prompt": "a", "chosen": "b"})),
                                 ["p.jsonl", "line 2", "no column 'rejected'"]),
    "SFT null completion": (data("sft", "s.jsonl", jsonl(SFT_ROW, {**SFT_ROW, "completion": None})),
                            ["s.jsonl", "line 2", "'completion'"]),
    "SFT messages of strings": (data("sft", "m.jsonl", jsonl({"messages": ["hi", "there"]})),
                                ["m.jsonl", "line 1", "'messages'"]),
    "SFT empty messages": (data("sft", "m.jsonl", jsonl({"messages": [{"role": "user", "content": "hi"}]},
                                                        {"messages": []})), ["m.jsonl", "line 2", "'messages'"]),
    "SFT null text": (data("sft", "t.jsonl", jsonl({"text": "abc"}, {"text": None})), ["t.jsonl", "line 2", "'text'"]),
    "CSV extra field": (data("grpo", "d.csv", "prompt,answer\n1+1=,2\n2+2=,4,extra\n"),
                        ["d.csv", "line 3", "3 fields", "2 columns"]),
    "CSV missing field": (data("grpo", "d.csv", "prompt,answer\n1+1=,2\n2+2=\n"), ["d.csv", "line 3", "fewer"]),
    "CSV non-UTF-8": (data("grpo", "d.csv", b"prompt,answer\n1+1=,2\n\xff,4\n"), ["d.csv", "line 3", "UTF-8"]),
    "CSV duplicate header": (data("grpo", "d.csv", "prompt,prompt\n1,2\n"), ["d.csv", "line 1", "'prompt' twice"]),
    "CSV quoted newline row number": (data("grpo", "d.csv", 'prompt,answer\n"a\nb",1\n2+2=,4,5\n'),
                                      ["d.csv", "line 4", "3 fields"]),
    "corrupt parquet": (data("grpo", "d.parquet", b"PAR1 this is not parquet"), ["d.parquet", "parquet"]),
    "parquet null prompt": (data("grpo", "d.parquet", [GOOD, {"prompt": None, "answer": "2"}]),
                            ["d.parquet", "row 1", "'prompt'", "null"]),
    "JSON record not an object": (data("grpo", "d.json", json.dumps([GOOD, "text"])), ["d.json", "record 1"]),
    "invalid JSON file": (data("grpo", "d.json", "[{"), ["d.json", "JSON"]),
    "JSON mapping without the split": (data("grpo", "d.json", json.dumps({"test": [GOOD]})), ["d.json", "list"]),
    "empty data file": (data("grpo", "d.jsonl", ""), ["d.jsonl", "empty"]),
    "data file missing": (lambda tmp: recipe("grpo")(tmp, f"data.train.source={tmp / 'none.jsonl'}"),
                          ["none.jsonl", "not found"]),
    "mapped column absent": (data("grpo", "d.jsonl", jsonl(GOOD), "data.train.columns={prompt: question}"),
                             ["'question'", "mapped to 'prompt'"]),
    "mapped column null": (data("grpo", "d.jsonl", jsonl({"q": "1+1=", "answer": "2"}, {"q": None, "answer": "2"}),
                                "data.train.columns={prompt: q}"), ["d.jsonl", "line 2", "'q'", "mapped to 'prompt'"]),
    "unsupported file type": (data("grpo", "d.txt", "hello"), ["d.txt", "unsupported file type"]),
    "reward column missing": (data("grpo", "d.jsonl", jsonl({"prompt": "1+1="})), ["'answer'", "exact_match"]),
    "SFT prompt past max_length": (data("sft", "s.jsonl", jsonl(SFT_ROW, {**SFT_ROW, "prompt": "1+2=" * 20}),
                                        "trainer.max_length=32"),
                                   ["data.train", "1 of 2 rows", "trainer.max_length=32", "too_long"]),
    "DPO prompt past max_length": (data("dpo", "p.jsonl", jsonl({**PAIR, "prompt": "1+2=" * 20}), "trainer.max_length=32"),
                                   ["data.train", "trainer.max_length=32", "too_long"]),
    "GRPO prompt past the model's positions": (data("grpo", "d.jsonl", jsonl(GOOD, {**GOOD, "prompt": "1+2=" * 70}),
                                                    "data.train.too_long=refuse"),
                                               ["data.train", "row 1", "max_position_embeddings=256"]),
    "too_long unknown": (override("sft", "data.train.too_long=cut"), ["data.train.too_long"]),
    "code_exec tests malformed": (data("grpo", "c.jsonl", jsonl({"prompt": "p", "tests": ["assert 1"]},
                                                              {"prompt": "q", "tests": None}),
                                       "rewards=[{name: code_exec}]"), ["data.train", "row 1", "'tests'", "code_exec"]),
    "code_exec call-based tests": (data("grpo", "c.jsonl", jsonl({"prompt": "p", "tests": json.dumps(
        {"inputs": [[1]], "outputs": [2], "fn_name": "f"})}), "rewards=[{name: code_exec}]"), ["row 0", "fn_name"]),
    "data file is a directory": (lambda tmp: (tmp / "dir.jsonl").mkdir() or
                                 recipe("grpo")(tmp, f"data.train.source={tmp / 'dir.jsonl'}"), ["dir.jsonl"]),
    # -- environment ----------------------------------------------------------------------------------------------
    "output_dir is a file": (output_dir("file"), ["a_file", "is a file"]),
    "output_dir below a file": (output_dir("below_file"), ["a_file", "not a directory"]),
    "output_dir not writable": (output_dir("unwritable"), ["/sys", "cannot be written"]),
    "truncated safetensors": (model_folder("truncated"), ["model.safetensors", "truncated"]),
    "safetensors shorter than its header": (model_folder("tiny_header"), ["model.safetensors", "damaged"]),
    "damaged config.json": (model_folder("config"), ["config.json", "not valid JSON"]),
    "shard missing from index": (model_folder("index"), ["model-00002-of-00002.safetensors"]),
    "model folder without a model": (model_folder("empty"), ["model_copy", "holds no model"]),
    "merge of models of different depth": (merge_of_depths, ["num_hidden_layers", "merge"]),
}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its kind and, for files, size and content digest."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = ("file", path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def test_the_table_has_at_least_80_inputs():
    assert len(CASES) >= 80


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error_and_writes_nothing(case, tmp_path, monkeypatch):
    if case == "output_dir not writable" and (not sys.platform.startswith("linux") or os.access("/sys", os.W_OK)
                                              and os.getuid() != 0):
        pytest.skip("needs a folder this user cannot create files in (/sys on Linux)")
    setup, expected = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative paths (runs/...) land here too
    args = setup(work)
    if not any(a.startswith("output_dir=") for a in args):
        args.append(f"output_dir={work / 'run'}")
    before = snapshot(work)
    result = runner.invoke(app, args)
    output = result.output
    assert result.exit_code == 2, f"{args}\n{output}\n{result.exception!r}"
    assert "Traceback" not in output, output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    for text in expected:
        assert text in errors[0], f"{text!r} not in: {errors[0]}"
    assert snapshot(work) == before, "the run created or changed files"
