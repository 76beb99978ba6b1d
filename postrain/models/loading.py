"""Resolve a model reference and load model and tokenizer the way transformers users expect.

A reference is one of: `tiny` (the embedded model, built locally), a postrain run directory (its `model/`
folder), a local model folder, or a hub id, which is passed through untouched for users with network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from postrain.errors import PostrainError
from postrain.models.tiny import ensure_tiny_model, is_tiny
from postrain.recipes.schema import TinyModelSpec

MODEL_SUBDIR = "model"


def resolve_model_path(name_or_path: str, tiny: dict | None = None) -> str:
    """Turn a model reference into what `from_pretrained` takes (an absolute local path where it is local)."""
    if is_tiny(name_or_path):
        spec = {**TinyModelSpec().__dict__, **(tiny or {})}
        return str(ensure_tiny_model(spec))
    p = Path(name_or_path).expanduser()
    if p.exists():
        if (p / MODEL_SUBDIR / "config.json").exists():
            return str((p / MODEL_SUBDIR).resolve())
        if (p / "config.json").exists() or (p / "adapter_config.json").exists():
            return str(p.resolve())
        raise PostrainError(
            f"model path {name_or_path!r} exists but holds no model: expected a run directory with {MODEL_SUBDIR}/ "
            f"(did its run finish?) or a folder with config.json"
        )
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise PostrainError(f"model path {name_or_path!r} does not exist")
    return name_or_path  # a hub id


def torch_dtype(name: str):
    import torch

    if name == "auto":
        return "auto"
    return getattr(torch, name)


def model_init_kwargs(spec: dict) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": torch_dtype(spec.get("dtype", "auto"))}
    for key in ("revision", "trust_remote_code", "attn_implementation"):
        if spec.get(key) is not None:
            kwargs[key] = spec[key]
    return kwargs


def load_tokenizer(path: str, spec: dict | None = None):
    from transformers import AutoTokenizer

    spec = spec or {}
    tok = AutoTokenizer.from_pretrained(
        path, revision=spec.get("revision"), trust_remote_code=spec.get("trust_remote_code", False)
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: dict):
    """Load the causal LM a ModelSpec dict names; returns (model, tokenizer, resolved path)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec["name_or_path"], spec.get("tiny"))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **model_init_kwargs(spec))
    except OSError as e:
        raise PostrainError(f"cannot load model {spec['name_or_path']!r}: {e}") from None
    return model, load_tokenizer(path, spec), path
