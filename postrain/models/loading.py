"""Resolve a model reference and load model and tokenizer the way transformers users expect.

A reference is one of: `tiny` (the embedded model, built locally), a packaged pretrained model
(`smollm2-135m-instruct`, converted once from the file a pip package ships: postrain.models.packaged), a postrain
run directory (its `model/` folder), a local model folder, or a hub id, which is passed through untouched for
users with network.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from postrain.errors import PostrainError
from postrain.models.packaged import PACKAGED_MODELS, ensure_packaged_model, gguf_file, is_packaged
from postrain.models.tiny import TINY_NAMES, ensure_tiny_model, is_tiny
from postrain.recipes.schema import TinyModelSpec

MODEL_SUBDIR = "model"


def resolve_model_path(name_or_path: str, tiny: dict | None = None) -> str:
    """Turn a model reference into what `from_pretrained` takes (an absolute local path where it is local)."""
    if is_tiny(name_or_path):
        spec = {**TinyModelSpec().__dict__, **(tiny or {})}
        return str(ensure_tiny_model(spec))
    if is_packaged(name_or_path):
        return str(ensure_packaged_model(name_or_path))
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
    return hub_id_or_error(name_or_path, what="model")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9_][\w.-]{0,95}")


def looks_like_hub_id(ref: str) -> bool:
    """`org/name` as the Hugging Face hub spells repository ids (not a relative path like `./x` or `a/b/c`)."""
    return bool(_HUB_ID.fullmatch(ref)) and ".." not in ref and "--" not in ref and not ref.endswith(".")


def hub_id_or_error(ref: str, what: str = "model", shown: str | None = None) -> str:
    """`ref`, which does not exist locally, as a hub id; a PostrainError when it cannot be one.

    `runs/nonexistent` has the shape of a hub id, but when `runs/` is a local directory the user meant a path:
    reading it as a hub id would turn a typo into a network error.
    """
    shown = shown or repr(ref)
    if looks_like_hub_id(ref):
        head = ref.split("/", 1)[0]
        if not Path(head).is_dir():
            return ref
        raise PostrainError(f"{what} path {shown} does not exist locally (there is a local directory {head!r}, so it is not "
                            f"read as a hub id); check the path, or whether the run that writes it has finished")
    raise PostrainError(f"{what} reference {shown} is neither an existing local path, a Hugging Face hub id "
                        f"('org/name') nor a built-in model ({', '.join([TINY_NAMES[0], *PACKAGED_MODELS])})")


def check_model_reference(spec: dict | None, where: str) -> None:
    """Resolve a ModelSpec's reference now (before a run directory is made), naming the recipe key on error.
    The tiny model is not built here: it cannot be missing. A packaged model is not converted here (a dry run
    stays fast), but its package must be installed."""
    if not spec or is_tiny(spec["name_or_path"]):
        return
    try:
        if is_packaged(spec["name_or_path"]):
            gguf_file(spec["name_or_path"])
            return
        resolve_model_path(spec["name_or_path"])
    except PostrainError as e:
        raise PostrainError(f"{where}.name_or_path: {e}") from None


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
