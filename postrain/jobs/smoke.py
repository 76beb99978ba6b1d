"""`--smoke`: run any recipe for a few steps on the embedded tiny model and built-in data.

The smoke layer sits above the recipe and below command-line overrides. It swaps every model for the tiny
model, every dataset for the built-in arithmetic task (whose rows carry every column a job reads, so column
mappings are dropped; a DPO recipe whose losses read K-response lists or unpaired rows gets the task's rows of
that shape), and shrinks the schedule. Everything else in the recipe (loss types, rewards, generation
settings) is kept, so a smoke run exercises the recipe's own method. Trackers (`report_to`) and the push to the
hub (`hub.repo_id`) are switched off.

`POSTRAIN_SMOKE_MODEL=smollm2-135m-instruct` smokes sft, dpo, grpo and eval on that built-in pretrained model
instead of the tiny one (postrain.models.packaged): a real BPE tokenizer, chat template and module names, at tens
of seconds a job. Merges keep the tiny models (see `smoke_merge`).

Each job builds its own layer (`smoke_layer(cfg)` in postrain.jobs.sft, dpo, grpo, evaluate, merge, pipeline) from
the parts here; `smoke_layer(command, cfg)` reaches it through the per-command table (postrain.jobs.JOB_MODULES).
"""

from __future__ import annotations

import os
from typing import Any

from postrain.errors import RecipeError
from postrain.jobs.table import job_module
from postrain.models.loading import resolve_model_path
from postrain.models.packaged import PACKAGED_MODELS

SMOKE_TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}

# Every training job's trainer settings under --smoke; each job adds its own (SMOKE_TRAINER in postrain.jobs.sft,
# dpo, grpo).
SMOKE_TRAINER_COMMON: dict[str, Any] = {
    "max_steps": 2,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "logging_steps": 1,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "bf16": False,
    "fp16": False,
    "activation_checkpointing": False,
    "use_liger_kernel": False,
}


SMOKE_MODEL_ENV = "POSTRAIN_SMOKE_MODEL"


def smoke_model_name() -> str | None:
    """The packaged model `POSTRAIN_SMOKE_MODEL` names, or None (smoke on the tiny model)."""
    name = os.environ.get(SMOKE_MODEL_ENV, "").strip()
    if name in ("", "tiny"):
        return None
    if name not in PACKAGED_MODELS:
        raise RecipeError(f"{SMOKE_MODEL_ENV}={name!r}: --smoke runs on the tiny model or a built-in pretrained "
                          f"model ({', '.join(PACKAGED_MODELS)})")
    return name


def smoke_model(seed: int = 0) -> dict:
    name = smoke_model_name()
    if name is None:
        return _tiny_model(seed)
    # One pretrained model has no seeds: a reference model is another copy of the same weights.
    return {"name_or_path": name, "revision": None, "dtype": "float32", "trust_remote_code": False,
            "attn_implementation": None}


def _tiny_model(seed: int = 0) -> dict:
    return {
        "name_or_path": "tiny",
        "revision": None,
        "dtype": "float32",
        "trust_remote_code": False,
        "attn_implementation": None,
        "tiny": {**SMOKE_TINY, "seed": seed},
    }


def builtin_source(spec: dict | None, split: str, n: int = 32, shape: str = "pairs") -> dict | None:
    """A small built-in dataset in place of `spec`. Layers merge mappings key by key, so a column mapping cannot
    be removed, only made the identity (built-in rows carry every standard column under its own name).
    `shape`: the rows a DPO recipe's losses train on (built-in tasks' `shape`: pairs, lists, unpaired); a recipe
    that unpairs pairs itself (`transform: unpair`) keeps its transform and gets pairs."""
    if spec is None:
        return None
    keeps_unpair = spec.get("transform") == "unpair"
    task_shape = {"shape": shape} if shape != "pairs" and not keeps_unpair else {}
    if spec.get("transform") == "curriculum_pairs":  # Curry-DPO pairs itself from K-response lists: give it lists
        return _curriculum_source(spec, split, n)
    if spec.get("transform") == "win_rate_pairs":  # SPPO: pairs with win rates, see _win_rate_source
        return _win_rate_source(spec, split, n)
    if spec.get("transform") == "thought_dropout":  # TON: targets with a <think> thought, the transform kept
        return {"source": "builtin:arithmetic_thoughts", "config": None, "split": split, "limit": None,
                "task": {"n": n, "digits": 1}, "prompt_template": None,
                "columns": {target: target for target in (spec.get("columns") or {})}}
    if str(spec.get("source", "")).startswith("builtin:"):
        return {"split": split, "task": {"n": n, **task_shape}, "limit": None}
    return {
        "source": "builtin:arithmetic",
        "config": None,
        "split": split,
        "columns": {target: target for target in (spec.get("columns") or {})},
        "limit": None,
        "task": {"n": n, "digits": 1, **task_shape},
        "prompt_template": None,
        "transform": "unpair" if keeps_unpair else None,
        "pairing": None,  # score_pairs' settings go with its transform
        "steps": None, "best_of_k": None,  # so do the step transforms' and best_of_k's
        # DICE: its implicit-reward models go with the transform, and the offline mix names a real dataset
        "implicit_reward": None, "mix": None,
        # chat / system_prompt are kept: they exercise the chat-template path the recipe uses.
    }


def _curriculum_source(spec: dict, split: str, n: int) -> dict:
    """Built-in K = 4 lists (graded scores) for `transform: curriculum_pairs`; the recipe's stage and chunk stay."""
    lists = {"n": n, "digits": 1, "shape": "lists", "list_size": 4}
    if str(spec.get("source", "")).startswith("builtin:"):
        return {"split": split, "task": lists, "limit": None}
    return {"source": "builtin:arithmetic", "config": None, "split": split, "limit": None, "task": lists,
            "columns": {target: target for target in (spec.get("columns") or {})}, "prompt_template": None}


def _win_rate_source(spec: dict, split: str, n: int) -> dict:
    """Built-in pairs for `transform: win_rate_pairs` (SPPO): the verifier's 1 and 0 for chosen and rejected stand in
    for their win rates (chosen_probs / rejected_probs), so the soft `sppo` loss trains on them."""
    columns = {target: target for target in (spec.get("columns") or {})}
    return {"source": "builtin:arithmetic", "config": None, "split": split, "limit": None,
            "task": {"n": n, "digits": 1}, "prompt_template": None, "transform": None, "pairing": None,
            "columns": {**columns, "chosen_probs": "score_chosen", "rejected_probs": "score_rejected"}}


def _smoke_reward(entry: Any, own_model: Any) -> Any:
    """A model-backed reward (`llm_judge`) judges briefly with the smoke model; a judge that is the recipe's own model
    (self-rewarding) stays the recipe's model, whatever that becomes (a pipeline stage's input). `code_exec` reads
    no setup column (the built-in code task has none). Other rewards are kept as they are."""
    if isinstance(entry, dict) and entry.get("name") == "code_exec" and (entry.get("args") or {}).get("setup_column"):
        return {**entry, "args": {**entry["args"], "setup_column": None}}  # the built-in code rows need no setup
    if not (isinstance(entry, dict) and entry.get("name") == "llm_judge"):
        return entry
    args = entry.get("args") or {}
    judge = args.get("model")
    judge = judge.get("name_or_path") if isinstance(judge, dict) else judge
    model = {"name_or_path": "${model.name_or_path}", "dtype": "${model.dtype}", "tiny": "${model.tiny}"} \
        if judge is not None and judge == own_model else smoke_model()
    return {**entry, "args": {**args, "model": model, "max_new_tokens": 8}}


def smoke_layer(command: str, cfg: dict) -> dict:
    """The `--smoke` layer of a read recipe: its job's `smoke_layer(cfg)`, reached through the per-command table
    (postrain.jobs.JOB_MODULES)."""
    return job_module(command).smoke_layer(cfg)


def training_layer(cfg: dict, trainer: dict[str, Any], shape: str = "pairs") -> dict:
    """What --smoke swaps in a training job's recipe (sft, dpo, grpo): the model, built-in data of the `shape` its
    losses read, the trainer settings (SMOKE_TRAINER_COMMON and the job's `trainer`), one process, the
    eval_during_training sets, and no push to the hub."""
    layer: dict[str, Any] = {"model": smoke_model()}
    data = cfg.get("data") or {}
    layer["data"] = {
        "train": builtin_source(data.get("train") or {}, "train", shape=shape),
        "eval": builtin_source(data.get("eval"), "test", shape=shape),
    }
    layer["trainer"] = {**SMOKE_TRAINER_COMMON, **trainer}
    # One process, whatever the recipe's launch says (a paper's 8 GPUs): the smoke run is a laptop check;
    # `--smoke launch.num_processes=2` (an override, above this layer) still smokes a launch.
    layer["launch"] = {"num_processes": 1, "num_machines": 1, "machine_rank": 0, "config": None}
    if cfg.get("eval_during_training"):  # its sets on built-in data too, evaluated every step, briefly
        sets = cfg["eval_during_training"].get("sets") or {}
        layer["eval_during_training"] = {
            "every_steps": 1, "sets": {name: builtin_source(spec, "test", n=4) for name, spec in sets.items()},
            "generation": {"max_new_tokens": 8, "batch_size": 8, "num_samples": 1}}
    # a smoke run's tiny model is never published to the recipe's hub repository (an explicit hub.repo_id=...
    # override, above this layer, still pushes)
    layer["hub"] = {"repo_id": None}
    return layer


def smoke_rewards(cfg: dict) -> list | None:
    """The recipe's `rewards:` with a model-backed one judging on the smoke model (_smoke_reward), or None where
    every reward stays as it is."""
    own_model = (cfg.get("model") or {}).get("name_or_path")
    if any(_smoke_reward(r, own_model) is not r for r in cfg.get("rewards") or []):
        return [_smoke_reward(r, own_model) for r in cfg["rewards"]]  # a judge model is a model too
    return None


def scores_code(cfg: dict) -> bool:
    """Whether a `code_exec` reward scores the recipe (its smoke data must then be the built-in code task)."""
    return any(isinstance(r, dict) and r.get("name") == "code_exec" for r in cfg.get("rewards") or [])


def use_code_task(sources) -> None:
    """A recipe scored by code_exec reads each row's tests: its smoke sources become the built-in code task, whose
    rows carry MBPP-style `tests` (postrain.data.tasks.arithmetic_code). Called once the data layer is built."""
    for source in sources:
        if source is not None:
            source.update({"source": "builtin:arithmetic_code", "task": {"n": source.get("task", {}).get("n", 32)}})


SMOKE_LM_EVAL = {"limit": 4, "max_gen_toks": 8, "bootstrap_iters": 100}


def smoke_lm_eval(section: dict) -> dict:
    """lm-eval under --smoke: the recipe's own tasks (they are its method; a registered task still needs its dataset
    from the hub or the HF cache), a few documents each, short generations, and few bootstrap resamples (lm-eval
    bootstraps the stderr of metrics that are not means, e.g. bleu)."""
    def at_most(value, smoke: int):  # a recipe's own smaller setting stays
        return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < smoke else smoke

    return {"limit": at_most(section.get("limit"), SMOKE_LM_EVAL["limit"]),  # a fraction (< 1) is not a count
            "gen_kwargs": {"max_gen_toks": at_most((section.get("gen_kwargs") or {}).get("max_gen_toks"),
                                                   SMOKE_LM_EVAL["max_gen_toks"])},
            "bootstrap_iters": at_most(section.get("bootstrap_iters"), SMOKE_LM_EVAL["bootstrap_iters"])}


def smoke_samples(cfg: dict, sets: dict) -> int:
    """An eval's samples per prompt under --smoke: 1, or the largest pass@k / maj@k k of a set that takes the shared
    num_samples (k <= num_samples is checked at load time; a set's own num_samples is kept)."""
    ks = [1]
    for spec in sets.values():
        spec = spec or {}
        if "num_samples" not in (spec.get("generation") or {}):
            metrics = {**(cfg.get("metrics") or {}), **(spec.get("metrics") or {})}
            ks += [k for key in ("pass_at", "maj_at") for k in metrics.get(key) or []]
    return max(ks)


def smoke_merge(merge: dict) -> dict:
    """Point every model reference of a mergekit config at tiny models (distinct seeds, same shape).
    Also under `POSTRAIN_SMOKE_MODEL`: a merge needs distinct inputs of one shape, and the pretrained model is one
    checkpoint."""
    seed = iter(range(100))

    def tiny_path() -> str:
        return resolve_model_path("tiny", {**SMOKE_TINY, "seed": next(seed)})

    out: dict[str, Any] = {}
    if not merge.get("models") and not merge.get("slices"):  # a base recipe names no models: merge two tiny ones
        merge = {**merge, "merge_method": merge.get("merge_method", "linear"),
                 "models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "b", "parameters": {"weight": 0.5}}]}
        out["merge_method"] = merge["merge_method"]
    if "base_model" in merge and merge["base_model"]:
        out["base_model"] = tiny_path()
    if "models" in merge:
        out["models"] = [{**m, "model": tiny_path()} for m in merge["models"]]
    if "slices" in merge:
        out["slices"] = [
            {**s, "sources": [{**src, "model": tiny_path(), "layer_range": [0, SMOKE_TINY["num_layers"]]} for src in s.get("sources", [])]}
            for s in merge["slices"]
        ]
    out["dtype"] = "float32"
    return out
