"""Running a merge with mergekit's Python API, on CPU.

Tied embeddings
    mergekit's architecture definitions (e.g. Qwen2, Llama) declare ``lm_head.weight`` as optional with
    ``tied_names: [model.embed_tokens.weight]``: when no input has a separate ``lm_head`` it is skipped and the
    output config keeps ``tie_word_embeddings: true``; when only some inputs have one, the others contribute their
    embedding matrix. Both cases load with ``AutoModelForCausalLM``.

dtype
    Without ``dtype``/``out_dtype`` the output keeps the inputs' dtype (mergekit computes linear/slerp in float32
    and casts back). ``dtype`` is the dtype tensors are loaded (and computed) in, ``out_dtype`` the saved one.

Tokenizer
    If the config builds a tokenizer (``tokenizer_source``/``tokenizer``) mergekit writes it and the merged
    embeddings follow its vocabulary. Otherwise the tokenizer of ``base_model``, else of the first model, is
    loaded and saved with ``save_pretrained``. mergekit's own copy is not used: without a base model it picks an
    arbitrary input, and from a directory without tokenizer files it writes the empty tokenizer transformers then
    builds. A local source without tokenizer files is an error raised before merging.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from postrain.merging.references import CONFIG_ROOT, MergeConfigError, key_path
from postrain.merging.validation import validate_merge_config


def _first_model(conf: Any) -> Any:
    if conf.base_model is not None:
        return conf.base_model
    if conf.models:
        return conf.models[0].model
    if conf.slices:
        return conf.slices[0].sources[0].model
    for mod in (conf.modules or {}).values():
        if mod.models:
            return mod.models[0].model
        if mod.slices:
            return mod.slices[0].sources[0].model
    return conf.referenced_models()[0]


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _write_tokenizer(src: str, revision: str | None, out: Path, conf: Any, *, kp: str) -> None:
    """Save the tokenizer of ``src`` (local dir or hub id), with the config's chat template if it sets one."""
    # slow: transformers, only when a merge runs
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src, revision=revision, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - report any loader failure as a config problem
        raise MergeConfigError(
            f"{kp}: the merged weights are in {out} but the tokenizer of {src!r} does not load "
            f"({type(e).__name__}: {e})",
            key=kp,
        ) from e
    if conf.chat_template:
        tok.chat_template = conf.chat_template
    tok.save_pretrained(str(out))


def run_mergekit(
    merge_config: Mapping[str, Any],
    output_dir: str | os.PathLike,
    *,
    resolve_model: Callable[[str], str] | None = None,
) -> Path:
    """Run the mergekit merge described by ``merge_config`` (a mergekit YAML config as a dict) into ``output_dir``.

    ``resolve_model`` maps each model reference path (e.g. a run directory) to a model path or hub id; local paths
    are then made absolute. The merge runs on CPU, without remote code or architecture mixing. Returns the
    absolute output directory. Raises :class:`MergeConfigError` for a bad config, before any weight is read.
    """
    # optional: mergekit
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import MergeOptions, run_merge

    conf = validate_merge_config(merge_config, resolve_model=resolve_model)
    out = Path(output_dir).expanduser().absolute()
    donor = _first_model(conf)

    # Tokenizer: mergekit builds one when the config says so (tokenizer_source / tokenizer: the merged embeddings
    # follow its vocabulary); otherwise the donor's is saved, see the module docstring.
    builds_tokenizer = conf.tokenizer is not None or conf.tokenizer_source is not None
    if not builds_tokenizer:
        local = Path(donor.model.path)
        if local.is_dir() and not any((local / f).is_file() for f in _TOKENIZER_FILES):
            raise MergeConfigError(
                f"{CONFIG_ROOT}: no tokenizer to give the merged model: {str(donor)!r} has no tokenizer files; "
                f"set {key_path(CONFIG_ROOT, 'tokenizer_source')} to a model that has one",
                key=CONFIG_ROOT,
            )

    has_lora = any(r.lora is not None for r in conf.referenced_models())
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="postrain-lora-merge-") as lora_cache:
        merge_options = MergeOptions(
            cuda=False, device="cpu", allow_crimes=False, trust_remote_code=False, lazy_unpickle=False,
            safe_serialization=True, write_model_card=True,
            quiet=True,  # no progress bars: a tiny merge takes well under a second, a large one logs its own steps
            copy_tokenizer=False,  # (a tokenizer mergekit builds is written regardless of this flag)
            **({"lora_merge_cache": lora_cache} if has_lora else {}),
        )
        cache = LoaderCache()
        try:
            # to_yaml() before run_merge: mergekit normalizes (mutates) the config while planning, and would write
            # that normalized form into mergekit_config.yml / README.md
            run_merge(conf, str(out), options=merge_options, config_source=conf.to_yaml())
        finally:
            # mergekit caches tensor loaders per model reference in a process-wide singleton: drop them so a
            # later merge in this process re-reads models that were rewritten in place
            cache.flush_all()
            cache.loaders.clear()

    if not builds_tokenizer:
        kp = key_path(CONFIG_ROOT, "base_model" if conf.base_model is not None else "models")
        _write_tokenizer(donor.model.path, donor.model.revision, out, conf, kp=kp)
    donor_dir = Path(donor.model.path)
    if not (out / "generation_config.json").exists() and (donor_dir / "generation_config.json").is_file():
        shutil.copy(donor_dir / "generation_config.json", out / "generation_config.json")
    return out
