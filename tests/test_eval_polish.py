"""Eval polish (#9): lm-eval under --dry-run and --smoke, completions kept by evaluation during training (and shown by
`postrain report`), eval sets formatted as data.train, completion lengths counted as TRL counts them, and the DPO
plan's batch unit."""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import pytest

from postrain.errors import DataError, RecipeError
from postrain.jobs import load_recipe, load_smoke_recipe
from tests.conftest import REPO, TINY, postrain, read_jsonl, write_recipe

MODEL = {"name_or_path": "tiny", "dtype": "float32", "tiny": TINY}
TINY_MODEL = f"model: {json.dumps(MODEL)}"
LM_EVAL_RECIPE = "recipes/examples/lm_eval_local.yaml"


# --- 1. lm-eval under --dry-run ----------------------------------------------------------------------------------

def test_lm_eval_dry_run_lists_tasks_and_settings_without_model_or_catalogue(monkeypatch):
    """The plan names each task (where it comes from), include_path, num_fewshot and limit; it loads no model and
    indexes only include_path, never lm-eval's own catalogue (seconds of YAML parsing)."""
    import lm_eval.tasks

    from postrain.jobs.plan import plan

    indexed = []
    real_init = lm_eval.tasks.TaskManager.__init__

    def spy(self, *args, include_defaults=True, **kwargs):
        indexed.append(include_defaults)
        real_init(self, *args, include_defaults=include_defaults, **kwargs)

    def no_model(*args, **kwargs):
        raise AssertionError("--dry-run loaded a model")

    monkeypatch.setattr(lm_eval.tasks.TaskManager, "__init__", spy)
    monkeypatch.setattr("postrain.models.loading.load_model", no_model)
    recipe = load_recipe(LM_EVAL_RECIPE, ["lm_eval.tasks=[postrain_arith_mc,postrain_arith_gn,hellaswag]",
                                          "lm_eval.num_fewshot=2", "lm_eval.limit=5"])
    lines = plan(recipe)
    include = str((REPO / "tests" / "lm_eval_tasks").resolve())
    assert lines["task postrain_arith_mc"] == f"task in {include}"
    assert lines["task hellaswag"].startswith("lm-eval task or group (name checked when the run starts")
    assert "did you mean 'postrain_arith_gen'" in lines["task postrain_arith_gn"]  # a typo of a local task is named
    assert lines["include_path"] == include
    assert lines["num_fewshot"] == 2 and lines["limit"] == "5 documents per task"
    assert not any(key.startswith("set ") for key in lines)  # no postrain eval sets in an lm-eval plan
    assert indexed == [False]  # include_path alone

    defaults = plan(load_recipe(LM_EVAL_RECIPE, ["lm_eval.limit=0.25"]))
    assert defaults["num_fewshot"] == "each task's default" and defaults["limit"] == "0.25 of each task's documents"


def test_lm_eval_dry_run_from_the_command_line():
    out = postrain("eval", LM_EVAL_RECIPE, "--dry-run")
    assert "postrain_arith_mc" in out and "postrain_arith_gen" in out and "recipe is valid" in out
    assert "all documents" in out  # the checked-in recipe scores every document


# --- 2. lm-eval under --smoke ------------------------------------------------------------------------------------

def test_smoke_shrinks_lm_eval_and_keeps_smaller_settings(tmp_path):
    from postrain.jobs.smoke import smoke_lm_eval as _smoke_lm_eval

    smoke = load_smoke_recipe(LM_EVAL_RECIPE, [], "eval").cfg["lm_eval"]
    assert smoke["limit"] == 4 and smoke["gen_kwargs"] == {"max_gen_toks": 8} and smoke["bootstrap_iters"] == 100
    assert smoke["tasks"] == ["postrain_arith_mc", "postrain_arith_gen"]  # the recipe's own tasks
    assert load_recipe(LM_EVAL_RECIPE).cfg["lm_eval"].get("limit") is None  # not without --smoke
    smaller = write_recipe(tmp_path / "smaller.yaml", f"""
defaults: [{REPO / LM_EVAL_RECIPE}]
lm_eval: {{limit: 2, gen_kwargs: {{max_gen_toks: 3, do_sample: false}}, bootstrap_iters: 0}}
""")
    kept = load_smoke_recipe(str(smaller), [], "eval").cfg["lm_eval"]
    assert kept["limit"] == 2 and kept["gen_kwargs"] == {"max_gen_toks": 3, "do_sample": False}
    assert kept["bootstrap_iters"] == 0
    assert _smoke_lm_eval({"limit": 0.5})["limit"] == 4  # a fraction of a large task is no smoke size


def test_lm_eval_recipe_is_smoked_by_the_recipe_suite_and_scores_a_few_documents(tmp_path):
    from tests.test_smoke_recipes import RECIPES

    assert LM_EVAL_RECIPE in RECIPES  # tests/test_smoke_recipes.py runs it under --smoke
    postrain("eval", LM_EVAL_RECIPE, "--smoke", f"output_dir={tmp_path / 'run'}")
    sets = json.loads((tmp_path / "run" / "results.json").read_text())["sets"]
    assert {name: s["prompts"] for name, s in sets.items()} == {"postrain_arith_mc": 4, "postrain_arith_gen": 4}


# --- 3 and 4. evaluation during training: samples kept, prompts formatted as data.train ---------------------------

def sft_recipe(tmp_path: Path, section: str, train_extra: str = "") -> Path:
    return write_recipe(tmp_path / "sft.yaml", f"""
defaults: [base/sft]
{TINY_MODEL}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 16, digits: 1}}{train_extra}}}}}
trainer: {{max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1, report_to: none, max_length: 48}}
eval_during_training: {section}
""")


HELDOUT = '{source: "builtin:arithmetic", split: test, task: {n: 5, digits: 1}}'


def test_in_training_eval_saves_samples_per_point_formats_prompts_as_training_and_report_shows_them(tmp_path):
    plain = '{source: "builtin:arithmetic", split: test, task: {n: 5, digits: 1}, chat: false, system_prompt: null}'
    section = (f"{{every_steps: 1, save_samples: 3, rewards: [{{name: exact_match}}], "
               f"generation: {{max_new_tokens: 6}}, sets: {{fmt: {HELDOUT}, plain: {plain}, all: {HELDOUT}}}}}")
    recipe = sft_recipe(tmp_path, section, ', chat: true, system_prompt: "Add."')
    out = tmp_path / "run"
    postrain("sft", str(recipe), f"output_dir={out}", "eval_during_training.sets.all.task.n=2")
    files = sorted(p.name for p in (out / "eval_samples").iterdir())
    assert files == ["step_0.jsonl", "step_1.jsonl", "step_2.jsonl"]
    logged = {m["step"]: m for m in read_jsonl(out / "metrics.jsonl") if "eval/fmt/accuracy" in m}
    for step in (0, 1, 2):
        samples = read_jsonl(out / "eval_samples" / f"step_{step}.jsonl")
        by_set = {name: [s for s in samples if s["set"] == name] for name in ("fmt", "plain", "all")}
        assert [len(v) for v in by_set.values()] == [3, 3, 2]  # save_samples per set; a smaller set in full
        assert all(s["step"] == step and {"prompt", "completion", "answer", "rewards", "score"} <= s.keys()
                   for s in samples)
        # data.train's chat settings reach the set that names none, not the one that names its own
        assert by_set["fmt"][0]["prompt"] == [{"role": "system", "content": "Add."},
                                              {"role": "user", "content": by_set["plain"][0]["prompt"]}]
        assert isinstance(by_set["plain"][0]["prompt"], str)
        # a set saved in full: its mean completion length is the logged one
        lengths = [s["completion_tokens"] for s in by_set["all"]]
        assert logged[step]["eval/all/mean_length_tokens"] == pytest.approx(sum(lengths) / len(lengths))
    postrain("report", str(out))
    report = (out / "report.md").read_text()
    assert "Evaluation samples during training" in report and "3 evaluation points saved" in report
    last = read_jsonl(out / "eval_samples" / "step_2.jsonl")[0]
    assert "**fmt**, step 2" in report and "**fmt**, step 0" in report
    from postrain.reports.report import _code

    assert _code(last["completion"]) in report


def test_save_samples_zero_writes_nothing_and_a_negative_count_is_refused(tmp_path):
    section = f"{{every_steps: 2, save_samples: 0, rewards: [{{name: exact_match}}], sets: {{h: {HELDOUT}}}}}"
    out = tmp_path / "run"
    postrain("sft", str(sft_recipe(tmp_path, section)), f"output_dir={out}", "trainer.max_steps=1",
             "eval_during_training.generation.max_new_tokens=2")
    assert not (out / "eval_samples").exists()
    assert any("eval/h/accuracy" in m for m in read_jsonl(out / "metrics.jsonl"))
    with pytest.raises(RecipeError, match=r"'eval_during_training.save_samples' .* got -1"):
        load_recipe(sft_recipe(tmp_path, section), ["eval_during_training.save_samples=-1"])


def test_eval_sets_inherit_prompt_format_from_data_train_unless_they_set_their_own(tmp_path):
    from postrain.jobs.train_eval import load_set, set_spec

    train = {"source": "builtin:arithmetic", "chat": True, "system_prompt": "S", "prompt_template": "Q: {prompt}"}
    cfg = {"data": {"train": train}}
    bare = {"source": "builtin:arithmetic", "split": "test", "task": {"n": 3, "digits": 1}}
    spec, inherited = set_spec(cfg, bare)
    assert inherited == ["chat", "system_prompt", "prompt_template"] and spec["prompt_template"] == "Q: {prompt}"
    plain_rows = load_set({"data": {"train": {}}}, bare, "s").to_list()
    rows = load_set(cfg, bare, "s").to_list()
    assert rows[0]["prompt"] == [{"role": "system", "content": "S"},
                                 {"role": "user", "content": f"Q: {plain_rows[0]['prompt']}"}]
    own = {**bare, "prompt_template": None, "system_prompt": "Mine"}
    assert load_set(cfg, own, "s")[0]["prompt"] == [{"role": "system", "content": "Mine"},
                                                     {"role": "user", "content": plain_rows[0]["prompt"]}]
    # an inherited template that needs a column the set lacks: the error says where it came from and the way out
    with pytest.raises(DataError, match=r"prompt_template is data.train's.*s.prompt_template: null"):
        load_set({"data": {"train": {"prompt_template": "{question}"}}}, bare, "s")
    assert set_spec({"data": {"train": None}}, bare) == (bare, [])  # no data.train (a dry-run of a partial recipe)


# --- 5. completion length as TRL counts it -------------------------------------------------------------------------

TRL_GENERATE_SINGLE_TURN = "e0f02e4fc094cefd"


def test_trl_completion_mask_rule_is_the_one_pinned():
    """postrain.models.generation.completion_token_ids follows GRPOTrainer._generate_single_turn's EOS mask (trl 1.16):
    a change there is a reason to re-check it."""
    from trl import GRPOTrainer

    digest = hashlib.sha256(inspect.getsource(GRPOTrainer._generate_single_turn).encode()).hexdigest()[:16]
    assert digest == TRL_GENERATE_SINGLE_TURN, "TRL's GRPOTrainer._generate_single_turn changed: re-check " \
                                               "postrain.models.generation.completion_token_ids against its EOS mask"


def trl_completion_lengths(completion_ids, eos_token_ids: list[int]) -> list[int]:
    """The reference: TRL 1.16's own lines (GRPOTrainer._generate_single_turn, "Mask everything after the first EOS
    token"), applied to a batch of generated ids; a completion's length is its mask's sum."""
    import torch

    device = completion_ids.device
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=device))
    eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long, device=device)
    eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
    sequence_indices = torch.arange(is_eos.size(1), device=device).expand(is_eos.size(0), -1)
    completion_mask = (sequence_indices <= eos_idx.unsqueeze(1)).int()
    return completion_mask.sum(dim=1).tolist()


def test_mean_length_counts_generated_tokens_up_to_and_including_eos():
    """The tiny model, its EOS output row scaled up so that sampling ends some completions at once while the rest of
    the batch runs on (their rows padded after EOS): mean_length_tokens is the number of generated tokens up to and
    including EOS, as TRL's mask counts the same generated batch, not the decoded text re-tokenized (EOS gone)."""
    import torch

    from postrain.data.sources import load_source
    from postrain.models.generation import completion_token_ids, generate_with_ids
    from postrain.evaluation.scoring import score_set
    from postrain.models.loading import load_model
    from postrain.rewards import build_rewards

    assert completion_token_ids([5, 7, 256, 257, 257], {256}) == [5, 7, 256]
    assert completion_token_ids([5, 7, 8], {256}) == [5, 7, 8]

    model, tokenizer, _ = load_model(MODEL)
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # "=" is what the untrained model writes most; EOS becomes a likelier "="
        model.lm_head.weight[eos] = 14 * model.lm_head.weight[tokenizer.convert_tokens_to_ids("=")]
    heldout = {"source": "builtin:arithmetic", "split": "test", "task": {"n": 16, "digits": 1}}
    rows = load_source(heldout, "eval").to_list()
    prompts = [row["prompt"] for row in rows]
    assert len({len(p) for p in prompts}) == 1  # one length: the batch has no left padding
    gen = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "num_samples": 1,
           "batch_size": 64}
    torch.manual_seed(0)
    completions, ids = generate_with_ids(model, tokenizer, prompts, gen)

    torch.manual_seed(0)  # the same batch through transformers directly, then TRL's mask
    batch = tokenizer(prompts, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        raw = model.generate(**batch, max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0, top_k=None,
                             num_return_sequences=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                             use_cache=True)
    lengths = trl_completion_lengths(raw[:, batch["input_ids"].shape[1]:], [eos])
    assert [len(one) for (one,) in ids] == lengths
    ended = [n for n in lengths if n < 8]
    assert ended and len(ended) < len(lengths) and raw.shape[1] - batch["input_ids"].shape[1] == 8
    assert all(one[-1] == eos for (one,) in ids if len(one) < 8)

    rewards, weights = build_rewards([{"name": "exact_match"}])
    summary, _ = score_set(rows, completions, rewards, weights, tokenizer, completion_ids=ids)
    assert summary["mean_length_tokens"] == pytest.approx(sum(lengths) / len(lengths))
    # the old count, the decoded text tokenized again, is off both ways: EOS is dropped, and a byte that is not
    # valid UTF-8 on its own decodes to U+FFFD, three bytes (tokens) when encoded again
    retokenized, _ = score_set(rows, completions, rewards, weights, tokenizer)
    assert retokenized["mean_length_tokens"] != pytest.approx(summary["mean_length_tokens"])


# --- 6. the DPO plan's batch unit ----------------------------------------------------------------------------------

def dpo_recipe(tmp_path: Path, task: str, loss: str) -> Path:
    return write_recipe(tmp_path / "dpo.yaml", f"""
defaults: [base/dpo]
{TINY_MODEL}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 8, digits: 1{task}}}}}}}
trainer: {{max_steps: 2, per_device_train_batch_size: 2, gradient_accumulation_steps: 3, report_to: none,
           max_length: 32}}
{loss}
""")


@pytest.mark.parametrize("task, loss, label", [
    ("", "", "global batch (preference pairs per optimizer step)"),
    (", shape: lists, list_size: 3", "loss: [{name: lipo_lambda}]",
     "global batch (lists of 3 completions per optimizer step)"),
    (", shape: unpaired", "loss: [{name: kto}]", "global batch (unpaired completions per optimizer step)"),
])
def test_dpo_plan_names_what_a_batch_row_is(tmp_path, task, loss, label):
    from postrain.jobs.plan import plan

    lines = plan(load_recipe(dpo_recipe(tmp_path, task, loss)))
    assert lines[label] == "2 per device x 3 accumulation x 1 processes = 6"
    assert not any("sequences" in key for key in lines)


def test_dpo_plan_says_k_when_the_lists_are_not_at_hand(tmp_path):
    from postrain.jobs.plan import _list_sizes

    assert _list_sizes({"source": "org/hub-lists"}) == "K"
    rows = tmp_path / "lists.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "p", "completions": ["a"] * k, "scores": list(range(k))}) + "\n"
                            for k in (2, 4)))
    assert _list_sizes({"source": str(rows)}) == "2 to 4"


def test_sft_plan_still_counts_sequences(tmp_path):
    from postrain.jobs.plan import plan

    recipe = write_recipe(tmp_path / "sft.yaml", f"""
defaults: [base/sft]
{TINY_MODEL}
data: {{train: {{source: "builtin:arithmetic", task: {{n: 8, digits: 1}}}}}}
trainer: {{max_steps: 2, per_device_train_batch_size: 4, report_to: none}}
""")
    assert "global batch (sequences per optimizer step)" in plan(load_recipe(recipe))
