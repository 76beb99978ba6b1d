"""Resolve a model reference and load model and tokenizer the way transformers users expect.

A reference is one of: `tiny` (the embedded model, built locally), a packaged pretrained model
(`smollm2-135m-instruct`, converted once from the file a pip package ships: postrain.models.packaged), a postrain
run directory (its `model/` folder), a local model folder, or a hub id, which is passed through untouched for
users with network.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from postrain.errors import PostrainError
from postrain.models.packaged import PACKAGED_MODELS, ensure_packaged_model, gguf_file, is_packaged
from postrain.models.tiny import TINY_NAMES, TinyModelSpec, ensure_tiny_model, is_tiny

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
            return check_model_files(p / MODEL_SUBDIR, name_or_path)
        if (p / "config.json").exists() or (p / "adapter_config.json").exists():
            return check_model_files(p, name_or_path)
        raise PostrainError(
            f"model path {name_or_path!r} exists but holds no model: expected a run directory with {MODEL_SUBDIR}/ "
            f"(did its run finish?) or a folder with config.json"
        )
    return hub_id_or_error(name_or_path, what="model")


def check_model_files(folder: Path, reference: str) -> str:
    """A local model folder's absolute path, once its files are whole: its config is JSON, and every safetensors
    file holds the bytes its header promises (a copy or a save cut short by a full disk leaves a file whose
    header names tensors past its end; transformers then fails deep inside loading, after the run directory was
    made). Only headers are read."""
    folder = folder.resolve()
    for name in ("config.json", "adapter_config.json"):
        if (folder / name).is_file():
            try:
                json.loads((folder / name).read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise PostrainError(f"model {reference!r}: {folder / name} is not valid JSON ({e}); the folder holds "
                                    f"a damaged or partial copy of the model") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (ValueError, UnicodeDecodeError, AttributeError) as e:
            raise PostrainError(f"model {reference!r}: {index} is not a valid safetensors index ({e})") from None
        missing = sorted(shard for shard in shards if not (folder / shard).is_file())
        if missing:
            raise PostrainError(f"model {reference!r}: {index.name} names {missing[0]}, which {folder} lacks; the "
                                f"folder holds a partial copy of the model")
    for weights in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise PostrainError(f"model {reference!r}: {weights} is damaged: {problem}. Copy or save the model again")
    return str(folder)


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing (an 8-byte little-endian header length, the JSON header,
    then the tensor bytes, whose last offset must be the file's end), or None when it is whole."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"the header says {length} bytes of metadata follow, the file has {size - 8}"
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a mapping of tensors"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets") or ()) == 2]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"truncated: {size} bytes, the header's tensors need {expected}"
    return None


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
    # slow: torch, only once a model loads
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
    # slow: transformers, only once a model loads
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
    # slow: transformers, only once a model loads
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec["name_or_path"], spec.get("tiny"))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **model_init_kwargs(spec))
    except OSError as e:
        raise PostrainError(f"cannot load model {spec['name_or_path']!r}: {e}") from None
    except Exception as e:  # a damaged file the header check cannot see (safetensors, torch and json errors)
        if type(e).__name__ not in ("SafetensorError", "HeaderTooLarge", "JSONDecodeError", "UnpicklingError"):
            raise
        raise PostrainError(f"cannot load model {spec['name_or_path']!r} from {path}: {type(e).__name__}: {e}") \
            from None
    return model, load_tokenizer(path, spec), path
