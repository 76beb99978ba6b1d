"""Tests for postrain.merging: mergekit merges of tiny local Qwen2 models (CPU, no network)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from postrain.merging import MergeConfigError, merge_methods, run_mergekit, validate_merge_config

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?"


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0}
    for c in CHARS:
        vocab[c] = len(vocab)
    for i in range(len(vocab), 64):
        vocab[f"<|extra_{i}|>"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def _make_model(path: Path, seed: int, *, tie: bool = True, tokenizer: bool = True) -> dict[str, torch.Tensor]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # norms start at exactly 1.0 in every model: make them differ too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    if tokenizer:
        _tokenizer().save_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    sds = {
        "m0": _make_model(root / "m0", 0),
        "m1": _make_model(root / "m1", 1),
        "m2": _make_model(root / "m2", 2),
        "u0": _make_model(root / "u0", 3, tie=False),
        "u1": _make_model(root / "u1", 4, tie=False),
        "notok0": _make_model(root / "notok0", 5, tokenizer=False),
        "notok1": _make_model(root / "notok1", 6, tokenizer=False),
    }
    _tokenizer().save_pretrained(root / "tok")
    return root, sds


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    return {k: v.detach() for k, v in model.state_dict().items()}, tok


def _same_tokenizer(tok, ref_dir: Path) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(ref_dir)
    text = "hello, world!"
    assert tok(text).input_ids == ref(text).input_ids
    assert tok.eos_token == "<|endoftext|>"


def test_merge_methods_listed():
    for name in ("linear", "slerp", "ties", "task_arithmetic", "dare_ties", "passthrough"):
        assert name in merge_methods()
    assert merge_methods() == sorted(merge_methods())


@pytest.mark.parametrize("pair", [("m0", "m1"), ("u0", "u1")], ids=["tied", "untied"])
def test_linear_is_elementwise_mean(zoo, tmp_path, pair):
    root, sds = zoo
    a, b = pair
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(root / a), "parameters": {"weight": 0.5}},
            {"model": str(root / b), "parameters": {"weight": 0.5}},
        ],
    }
    out = run_mergekit(cfg, tmp_path / "out")
    assert out == (tmp_path / "out").absolute()
    merged, tok = _load(out)
    assert set(merged) == set(sds[a])
    for name, tensor in merged.items():
        expected = (sds[a][name] + sds[b][name]) / 2
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected), name
    tied = a == "m0"
    if tied:  # no separate lm_head: mergekit skips the optional weight and the output stays tied
        assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    else:
        assert not torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    _same_tokenizer(tok, root / a)
    # the caller's dict is not modified
    assert cfg["models"][0] == {"model": str(root / a), "parameters": {"weight": 0.5}}


def test_slerp_t0_returns_base(zoo, tmp_path):
    root, sds = zoo
    cfg = {
        "merge_method": "slerp",
        "base_model": str(root / "m1"),
        "models": [{"model": str(root / "m0")}, {"model": str(root / "m1")}],
        "parameters": {"t": 0.0},
    }
    merged, _ = _load(run_mergekit(cfg, tmp_path / "out"))
    for name, tensor in merged.items():
        assert torch.equal(tensor, sds["m1"][name]), name


def test_task_arithmetic_with_base(zoo, tmp_path):
    root, sds = zoo
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(root / "m0"),
        "models": [
            {"model": str(root / "m1"), "parameters": {"weight": 0.5}},
            {"model": str(root / "m2"), "parameters": {"weight": 0.25}},
        ],
        "dtype": "float32",
    }
    merged, tok = _load(run_mergekit(cfg, tmp_path / "out"))
    base = sds["m0"]
    for name, tensor in merged.items():
        expected = base[name] + 0.5 * (sds["m1"][name] - base[name]) + 0.25 * (sds["m2"][name] - base[name])
        torch.testing.assert_close(tensor, expected, msg=name)
    _same_tokenizer(tok, root / "m0")


def test_ties_runs_and_loads(zoo, tmp_path):
    root, sds = zoo
    cfg = {
        "merge_method": "ties",
        "base_model": str(root / "m0"),
        "models": [
            {"model": str(root / "m1"), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(root / "m2"), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "parameters": {"normalize": True},
        "out_dtype": "bfloat16",
    }
    out = run_mergekit(cfg, tmp_path / "out")
    merged, _ = _load(out)
    assert set(merged) == set(sds["m0"])
    assert all(torch.isfinite(t.float()).all() for t in merged.values())
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"].float(), sds["m0"]["model.layers.0.mlp.up_proj.weight"])
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_slices_and_relative_paths_made_absolute(zoo, tmp_path, monkeypatch):
    root, sds = zoo
    monkeypatch.chdir(root)
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "m0", "layer_range": [0, 1]}]},
            {"sources": [{"model": "./m1", "layer_range": [1, 2]}]},
        ],
    }
    conf = validate_merge_config(cfg)
    paths = [s.sources[0].model.model.path for s in conf.slices]
    assert paths == [str(root / "m0"), str(root / "m1")]
    assert all(os.path.isabs(p) for p in paths)

    out = run_mergekit(cfg, "merged")  # relative output dir too
    assert out == root / "merged"
    written = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert [s["sources"][0]["model"] for s in written["slices"]] == [str(root / "m0"), str(root / "m1")]
    merged, _ = _load(out)
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], sds["m0"]["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(merged["model.layers.1.mlp.up_proj.weight"], sds["m1"]["model.layers.1.mlp.up_proj.weight"])
    shutil.rmtree(out)


def test_resolver_applies_to_every_reference(zoo, tmp_path):
    root, _ = zoo
    seen = []

    def resolve(ref: str) -> str:
        seen.append(ref)
        return str(root / ref.removeprefix("run:")) if ref.startswith("run:") else ref

    cfg = {
        "merge_method": "slerp",
        "base_model": "run:m0",
        "slices": [
            {
                "sources": [{"model": "run:m0", "layer_range": [0, 2]}, {"model": "run:m1", "layer_range": [0, 2]}],
                "base_model": "run:m0",
            }
        ],
        "parameters": {"t": [0.0, 1.0]},
        "tokenizer_source": "run:m1",
    }
    conf = validate_merge_config(cfg, resolve_model=resolve)
    assert str(conf.base_model) == str(root / "m0")
    assert str(conf.slices[0].base_model) == str(root / "m0")
    assert [str(s.model) for s in conf.slices[0].sources] == [str(root / "m0"), str(root / "m1")]
    assert str(conf.tokenizer_source) == str(root / "m1")
    assert sorted(seen) == sorted(["run:m0", "run:m0", "run:m0", "run:m1", "run:m1"])
    assert cfg["base_model"] == "run:m0"

    # dict-form references and tokenizer token sources are resolved too
    cfg2 = {
        "merge_method": "linear",
        "models": [{"model": {"model": {"path": "run:m0"}}, "parameters": {"weight": 1.0}}],
        "tokenizer": {"source": "base", "tokens": {"<|endoftext|>": {"source": {"kind": "model_token", "model": "run:m1", "token_id": 0}}}},
    }
    conf2 = validate_merge_config(cfg2, resolve_model=resolve)
    assert conf2.models[0].model.model.path == str(root / "m0")
    assert str(conf2.tokenizer.tokens["<|endoftext|>"].source.model) == str(root / "m1")


def test_unknown_merge_method_suggests_nearest(zoo):
    root, _ = zoo
    cfg = {"merge_method": "slerpp", "models": [{"model": str(root / "m0")}]}
    with pytest.raises(MergeConfigError) as exc:
        run_mergekit(cfg, root / "never")
    msg = str(exc.value)
    assert "merge.merge_method" in msg and "'slerp'" in msg and "did you mean" in msg
    assert "task_arithmetic" in msg  # lists the available methods
    assert isinstance(exc.value, ValueError)
    assert not (root / "never").exists()


@pytest.mark.parametrize(
    "ref, expect",
    [
        ("./no/such/model", "./no/such/model"),
        ("/definitely/not/here", "/definitely/not/here"),
        ("m9", "neither an existing local path, a Hugging Face hub id"),
        ("tok", "not a model directory"),
    ],
)
def test_bad_model_reference(zoo, monkeypatch, ref, expect):
    root, _ = zoo
    monkeypatch.chdir(root)
    cfg = {"merge_method": "linear", "models": [{"model": "m0", "parameters": {"weight": 1}}, {"model": ref, "parameters": {"weight": 1}}]}
    with pytest.raises(MergeConfigError) as exc:
        validate_merge_config(cfg)
    assert "merge.models[1].model" in str(exc.value)
    assert repr(ref) in str(exc.value) and expect in str(exc.value)


def test_missing_path_under_existing_dir_is_not_a_hub_id(zoo, monkeypatch):
    root, _ = zoo
    monkeypatch.chdir(root.parent)
    cfg = {"merge_method": "linear", "base_model": f"{root.name}/missing", "models": [{"model": str(root / "m0")}], "parameters": {"weight": 1}}
    with pytest.raises(MergeConfigError, match=r"merge\.base_model: .*does not exist locally"):
        validate_merge_config(cfg)
    # a plausible hub id is passed through untouched (nothing is downloaded by validation)
    cfg["base_model"] = "Qwen/Qwen2.5-0.5B"
    assert str(validate_merge_config(cfg).base_model) == "Qwen/Qwen2.5-0.5B"


@pytest.mark.parametrize(
    "patch, pattern",
    [
        ({"models": [{"model": "M0", "parameters": {"weight": 1}}, {"model": "M1", "parameters": "bad"}]},
         r"merge\.models\[1\]\.parameters: Input should be a valid dictionary"),
        ({"models": [{"model": "M0", "parameters": {"weight": {"foo": 1}}}]},
         r"merge\.models\[0\]\.parameters\.weight\.foo: unknown key; valid keys here: filter, value"),
        ({"models": [{"model": "M0", "parameters": {"weight": {"value": {"x": 1}}}}]},
         r"merge\.models\[0\]\.parameters\.weight\.value: invalid value \{'x': 1\}; expected one of: bool, int"),
        ({"models": [{"model": "M0", "parameters": {"weight": [{"value": 1, "filter": 3}]}}]},
         r"merge\.models\[0\]\.parameters\.weight\[0\]\.filter: Input should be a valid string"),
        ({"models": [{"model": "M0", "parameters": {"wieght": 1}}]},
         r"merge\.models\[0\]\.parameters\.wieght: .*no parameter 'wieght' \(did you mean 'weight'\?\)"),
        ({"models": [{"model": "M0"}]}, r"merge\.parameters: merge method 'linear' requires parameter 'weight'"),
        ({"modles": []}, r"merge\.modles: unknown key \(did you mean .*'models'"),
        ({"models": [{"model": "M0", "paramters": {}}]}, r"merge\.models\[0\]\.paramters: unknown key"),
        ({"slices": [{"sources": [{"model": "M0", "layer_range": [0]}]}], "models": None},
         r"merge\.slices\[0\]\.sources\[0\]\.layer_range\[1\]: required key is missing"),
        ({"models": [{"parameters": {"weight": 1}}]}, r"merge\.models\[0\]\.model: required key is missing"),
        ({"slices": [{"sources": [{"model": "M0", "layer_range": [0, 2]}]}]}, r"merge: Exactly one of 'models', 'slices'"),
        ({"merge_method": "slerp", "parameters": {"t": 0.5}, "models": [{"model": "M0"}, {"model": "M1"}]}, r"merge\.base_model: merge method 'slerp' requires a base_model"),
        ({"merge_method": "slerp", "base_model": "M0", "models": [{"model": "M0", "parameters": {"t": 0.5}}, {"model": "M1"}]},
         r"merge\.models\[0\]\.parameters\.t: 't' is a shared parameter"),
        ({"merge_method": "slerp", "base_model": "M0", "parameters": {"t": 0.5},
          "models": [{"model": "M0"}, {"model": "M1"}, {"model": "M2"}]},
         r"merge\.models: Merge method requires exactly 2 inputs; got 3"),
        ({"merge_method": "ties", "base_model": "M0", "models": [{"model": "M1", "parameters": {"weight": 1, "densty": 0.5}}]},
         r"did you mean 'density'"),
    ],
)
def test_config_errors_name_the_key(zoo, patch, pattern):
    root, _ = zoo

    def sub(v):
        if isinstance(v, str) and v in ("M0", "M1", "M2"):
            return str(root / v.lower())
        if isinstance(v, dict):
            return {k: sub(x) for k, x in v.items()}
        if isinstance(v, list):
            return [sub(x) for x in v]
        return v

    cfg = {"merge_method": "linear", "models": [{"model": "M0", "parameters": {"weight": 1}}]}
    cfg.update(patch)
    cfg = sub(cfg)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(MergeConfigError, match=pattern):
        validate_merge_config(cfg)


def test_not_a_mapping():
    with pytest.raises(MergeConfigError, match="expected a mapping"):
        validate_merge_config(["linear"])  # type: ignore[arg-type]


def test_inputs_without_a_tokenizer_fail_before_merging(zoo, tmp_path):
    root, _ = zoo
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(root / "notok0")}, {"model": str(root / "notok1")}],
        "parameters": {"weight": 1.0},
    }
    with pytest.raises(MergeConfigError, match=r"no tokenizer .*notok0.*tokenizer_source"):
        run_mergekit(cfg, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_model_references_walks_every_place_mergekit_reads_a_model():
    from postrain.merging import model_references

    cfg = {
        "merge_method": "linear", "base_model": "b",
        "models": [{"model": "m0"}, {"model": {"model": "m1", "lora": "l1"}}],
        "slices": [{"base_model": "sb", "sources": [{"model": "s0"}]}],
        "modules": {"dec": {"models": [{"model": "d0"}], "slices": [{"sources": [{"model": "ds0"}]}]}},
        "tokenizer_source": "union",
        "tokenizer": {"source": "t", "tokens": {"<x>": {"source": {"kind": "model_token", "model": "tm"}},
                                                "<y>": {"source": "ty"}}},
    }
    assert model_references(cfg) == ["b", "m0", "m1", "sb", "s0", "d0", "ds0", "t", "tm", "ty"]


def test_lora_and_modules_references(zoo, tmp_path, monkeypatch):
    root, _ = zoo
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    cfg = {
        "merge_method": "linear",
        "modules": {"decoder": {"models": [{"model": f"{root / 'm0'}+adapter", "parameters": {"weight": 1.0}}]}},
    }
    conf = validate_merge_config(cfg)
    ref = conf.modules["decoder"].models[0].model
    assert (ref.model.path, ref.lora.path) == (str(root / "m0"), str(adapter))

    cfg["modules"]["decoder"]["models"][0]["model"] = f"{root / 'm0'}+missing_adapter"
    with pytest.raises(MergeConfigError, match=r"merge\.modules\.decoder\.models\[0\]\.model: LoRA adapter reference"):
        validate_merge_config(cfg)
