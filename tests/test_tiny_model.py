"""The embedded tiny model: deterministic, offline, and a normal Hugging Face checkpoint."""

from __future__ import annotations

import torch

from postrain.models.loading import load_model, load_tokenizer, resolve_model_path
from postrain.models.tiny import build_tokenizer
from tests.conftest import TINY


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, monkeypatch):
    a, _, path_a = load_model({"name_or_path": "tiny", "tiny": {**TINY, "seed": 3}})
    monkeypatch.setenv("POSTRAIN_CACHE", str(tmp_path))  # force a second, independent build
    b, _, path_b = load_model({"name_or_path": "tiny", "tiny": {**TINY, "seed": 3}})
    c, _, _ = load_model({"name_or_path": "tiny", "tiny": {**TINY, "seed": 4}})
    assert path_a != path_b
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_size_comes_from_the_recipe():
    model, _, _ = load_model({"name_or_path": "tiny", "tiny": {**TINY, "num_layers": 3, "hidden_size": 48}})
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 48
    assert model.config.model_type == "qwen2"


def test_tokenizer_is_character_level_and_reloads_identically():
    tok = build_tokenizer()
    text = "12+34=46\n héllo"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.encode())  # one token per byte: ASCII is one per character
    assert tok.decode(ids) == text
    reloaded = load_tokenizer(resolve_model_path("tiny", TINY))
    assert reloaded(text).input_ids == ids
    assert reloaded.pad_token and reloaded.eos_token == "<|im_end|>"


def test_chat_template_and_assistant_mask():
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    enc = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(masked) == "3<|im_end|>"


def test_generates_offline():
    model, tok, _ = load_model({"name_or_path": "tiny", "tiny": TINY})
    batch = tok(["1+1="], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] <= batch["input_ids"].shape[1] + 3
