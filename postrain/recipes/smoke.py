"""`--smoke`: run any recipe for a few steps on the embedded tiny model and built-in data.

The smoke layer sits above the recipe and below command-line overrides. It swaps every model for the tiny
model, every dataset for the built-in arithmetic task (whose rows carry every column a job reads, so column
mappings are dropped), and shrinks the schedule. Everything else in the recipe (loss types, rewards, generation
settings) is kept, so a smoke run exercises the recipe's own method.
"""

from __future__ import annotations

from typing import Any

SMOKE_TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}

SMOKE_TRAINER: dict[str, dict[str, Any]] = {
    "common": {
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
    },
    "sft": {"max_length": 64, "packing": False},
    "dpo": {"max_length": 64, "precompute_ref_batch_size": 4},
    "grpo": {
        "num_generations": 2,
        "generation_batch_size": None,
        "steps_per_generation": None,
        "max_completion_length": 8,
        "use_vllm": False,
        "per_device_eval_batch_size": 2,
    },
}


def _tiny_model(seed: int = 0) -> dict:
    return {
        "name_or_path": "tiny",
        "revision": None,
        "dtype": "float32",
        "trust_remote_code": False,
        "attn_implementation": None,
        "tiny": {**SMOKE_TINY, "seed": seed},
    }


def _builtin_source(spec: dict | None, split: str, n: int = 32) -> dict | None:
    """A small built-in dataset in place of `spec`. Layers merge mappings key by key, so a column mapping cannot
    be removed, only made the identity (built-in rows carry every standard column under its own name)."""
    if spec is None:
        return None
    if str(spec.get("source", "")).startswith("builtin:"):
        return {"split": split, "task": {"n": n}, "limit": None}
    return {
        "source": "builtin:arithmetic",
        "config": None,
        "split": split,
        "columns": {target: target for target in (spec.get("columns") or {})},
        "limit": None,
        "task": {"n": n, "digits": 1},
        "prompt_template": None,
        "transform": None,
        # chat / system_prompt are kept: they exercise the chat-template path the recipe uses.
    }


def smoke_layer(command: str, cfg: dict) -> dict:
    layer: dict[str, Any] = {}
    if command in ("sft", "dpo", "grpo", "eval"):
        layer["model"] = _tiny_model()
    if command == "dpo" and cfg.get("ref_model"):
        layer["ref_model"] = _tiny_model(seed=1)
    if command in ("sft", "dpo", "grpo"):
        data = cfg.get("data") or {}
        layer["data"] = {
            "train": _builtin_source(data.get("train") or {}, "train"),
            "eval": _builtin_source(data.get("eval"), "test"),
        }
        trainer = dict(SMOKE_TRAINER["common"])
        trainer.update(SMOKE_TRAINER[command])
        if command == "grpo":
            # Keep the recipe's own generation batch arithmetic valid at smoke size.
            trainer["num_generations"] = 2
        if command == "dpo" and not (cfg.get("trainer") or {}).get("precompute_ref_log_probs"):
            trainer.pop("precompute_ref_batch_size")
        layer["trainer"] = trainer
        shaping = ((cfg.get("rl") or {}).get("shaping")) or []
        if any(_length_part(part) for part in shaping):
            # Length-based shaping sized for the paper's lengths must fit the smoke run's completions.
            layer["rl"] = {"shaping": [_smoke_length_part(part) for part in shaping]}
    if command == "eval":
        sets = cfg.get("sets") or {"smoke": {}}  # a base recipe names no set: smoke one anyway
        layer["sets"] = {name: _builtin_source(spec, "test", n=8) for name, spec in sets.items()}
        layer["generation"] = {"max_new_tokens": 8, "batch_size": 8, "num_samples": 1}
    if command == "merge":
        layer["merge"] = _smoke_merge(cfg.get("merge") or {})
    return layer


def _length_part(part) -> bool:
    return isinstance(part, dict) and any(k in part for k in ("overlong_buffer_len", "max_completion_length"))


def _smoke_length_part(part):
    if not _length_part(part):
        return part
    max_len = SMOKE_TRAINER["grpo"]["max_completion_length"]
    out = dict(part)
    if "max_completion_length" in out:
        out["max_completion_length"] = max_len
    if "overlong_buffer_len" in out:
        out["overlong_buffer_len"] = max_len // 2
    return out


def _smoke_merge(merge: dict) -> dict:
    """Point every model reference of a mergekit config at tiny models (distinct seeds, same shape)."""
    from postrain.models.loading import resolve_model_path

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
