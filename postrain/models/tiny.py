"""The embedded default model: a tiny Qwen2-style causal LM with a character-level tokenizer.

Built locally and deterministically from its size and seed (no network), cached on disk, then loaded like any
Hugging Face model. It exists so that the demo and the tests run real training on a laptop CPU.

The tokenizer is a real fast tokenizer (`tokenizers` WordLevel over single characters) with Qwen's chat
special tokens and a ChatML template, so TRL's chat handling, completion-only masks and generation all apply.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

TINY_NAMES = ("tiny", "postrain/tiny")

PAD, EOS, BOS = "<|endoftext|>", "<|im_end|>", "<|im_start|>"

# ChatML, as Qwen2 uses; the {% generation %} markers let TRL compute assistant-only loss masks.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


@dataclass
class TinyModelSpec:
    """Size of the embedded tiny Qwen2-style model (`model.name_or_path: tiny`)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    seed: int = 0


def is_tiny(name: str) -> bool:
    return name in TINY_NAMES


def cache_root() -> Path:
    return Path(os.environ.get("POSTRAIN_CACHE", Path.home() / ".cache" / "postrain"))


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode map: one printable character per byte, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def build_tokenizer():
    """A Qwen2 tokenizer with no merges: every byte is one token, so ASCII text is tokenized per character.

    Being a real Qwen2Tokenizer (byte-level BPE, empty merge list) means `AutoTokenizer` reloads it exactly as
    built, whatever tool loads the checkpoint (TRL, mergekit, vLLM, lm-eval).
    """
    # slow: transformers, only when the tokenizer is built
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token=EOS,
        pad_token=PAD,
        bos_token=None,
        additional_special_tokens=[BOS],
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer, spec: dict):
    # slow: transformers, only when a config is built
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        rope_theta=10000.0,
    )


def ensure_tiny_model(spec: dict) -> Path:
    """Build (once) and cache the tiny model for this size and seed; return its directory.

    The cache key is a hash of the spec, so two recipes with the same size and seed share one starting model.
    """
    # slow: torch and transformers, only when the tiny model is built
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    key = hashlib.sha256(json.dumps({**spec, "v": 2}, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_root() / "tiny" / key
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer, spec)
    # Seed the initialisation only, without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, do_sample=False
    )
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    if not (tmp / "model.safetensors").exists():
        # transformers writes weights on rank 0 only once torch.distributed is up (a launched worker): rank 0
        # builds the same model, so wait for it rather than put a folder without weights in the cache

        shutil.rmtree(tmp, ignore_errors=True)
        return _wait_for_tiny_model(out)
    tokenizer.save_pretrained(tmp)
    (tmp / "postrain_tiny.json").write_text(json.dumps(spec, indent=2))
    try:
        tmp.rename(out)  # atomic: parallel test workers may race to build the same model
    except OSError:

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _wait_for_tiny_model(out: Path, timeout_s: float = 600) -> Path:

    deadline = time.time() + timeout_s
    while not ((out / "config.json").exists() and (out / "model.safetensors").exists()):
        if time.time() > deadline:
            raise RuntimeError(f"the tiny model {out} was not built by rank 0 within {timeout_s:.0f} s")
        time.sleep(0.2)
    return out
