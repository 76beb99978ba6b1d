"""Model merging with mergekit, driven by a plain dict.

A recipe's ``merge:`` section *is* a mergekit YAML configuration (``merge_method``, ``models`` or ``slices`` or
``modules``, ``base_model``, ``parameters``, ``dtype``/``out_dtype``, ``tokenizer_source``/``tokenizer``,
``chat_template``). :func:`run_mergekit` takes that dict, fixes up its model references, validates it (with
error messages that name the offending key, e.g. ``merge.models[1].parameters``) and runs the merge on CPU
through mergekit's Python API.

Model references
    Every place mergekit accepts a model reference is rewritten: ``base_model``, ``models[*].model``,
    ``slices[*].base_model``, ``slices[*].sources[*].model``, the same under ``modules.<name>``,
    ``tokenizer_source``, ``tokenizer.source`` and ``tokenizer.tokens.<tok>.source`` (plain or
    ``{kind: model_token, model: ...}``). A reference is a string ``path[@revision][+lora_path[@revision]]``
    or mergekit's dict form ``{model: ..., lora: ..., override_architecture: ...}``; each path in it is passed
    through ``resolve_model`` (if given), then made absolute if it exists locally (mergekit reads a relative path
    as a hub id). A path that neither exists nor looks like a hub id (``org/name``) is an error.

Checks beyond mergekit's own schema
    Unknown keys (pydantic would silently ignore them), unknown ``merge_method`` (with a "did you mean"),
    parameter names the method does not know, shared parameters (e.g. slerp's ``t``) set per model where
    mergekit would ignore them, required parameters set nowhere, a missing ``base_model`` for methods that need
    one and wrong input counts (mergekit's own input contract, checked before any weight is read).

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
    embeddings follow its vocabulary. Otherwise the tokenizer files are copied from ``copy_tokenizer_from`` when
    given, else from ``base_model``, else from the first model (loaded and re-saved with ``save_pretrained`` when
    they are not a plain ``tokenizer.json``/``tokenizer.model`` set, or when ``chat_template`` is set). mergekit's
    own copy is not used: without a base model it picks an arbitrary input, and from a directory without tokenizer
    files it writes the empty tokenizer transformers then builds. A local source without tokenizer files is an error
    raised before merging.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import re
import shutil
import tempfile
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from postrain.errors import RecipeError

LOG = logging.getLogger(__name__)

__all__ = ["MERGE_METHODS", "MergeConfigError", "run_mergekit", "validate_merge_config"]

#: Root of the key paths in error messages (the recipe section holding the mergekit config).
CONFIG_ROOT = "merge"


class MergeConfigError(RecipeError, ValueError):
    """The merge configuration is invalid; the message names the key path (``merge.models[1].parameters``)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _registered_methods() -> dict[str, Any]:
    from mergekit.merge_methods import registered_methods

    return {m.spec.name: m for m in registered_methods()}


def _merge_methods() -> list[str]:
    return sorted(_registered_methods())


MERGE_METHODS: list[str]  # names of the merge methods of the installed mergekit (for CLI help); computed lazily


def __getattr__(name: str) -> Any:
    # importing mergekit pulls in torch/transformers/peft: only do it when MERGE_METHODS is actually used
    if name == "MERGE_METHODS":
        globals()["MERGE_METHODS"] = methods = _merge_methods()
        return methods
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------- key paths


def _kp(base: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{base}[{key}]"
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{base}.{key}"
    return f"{base}[{key!r}]"


def _did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    matches = difflib.get_close_matches(str(word).lower(), list(lowered), n=3, cutoff=0.6)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(repr(lowered[m]) for m in matches) + "?)"


# ------------------------------------------------------------------------------------------------- unknown keys


_UNION = (typing.Union, types.UnionType)


def _model_classes(ann: Any) -> list[Any]:
    """Pydantic model classes a dict value of annotation ``ann`` could be validated as."""
    from pydantic import BaseModel

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    if typing.get_origin(ann) in _UNION:
        return [c for a in typing.get_args(ann) for c in _model_classes(a)]
    return []


def _check_unknown_keys(ann: Any, value: Any, kp: str) -> None:
    """Walk ``value`` along the pydantic annotation ``ann`` and reject dict keys no model declares."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if isinstance(value, Mapping):
        if origin in (dict, Mapping, typing.Dict) and len(args) == 2:
            for k, v in value.items():
                _check_unknown_keys(args[1], v, _kp(kp, k))
            return
        if origin in _UNION:
            dict_types = [a for a in args if typing.get_origin(a) in (dict, Mapping)]
            if dict_types and not _model_classes(ann):
                _check_unknown_keys(dict_types[0], value, kp)
                return
        candidates = _model_classes(ann)
        if not candidates:
            return
        keys = set(value)
        fitting = [c for c in candidates if keys <= set(c.model_fields)]
        if len(fitting) == 1:
            cls = fitting[0]
        elif fitting:
            return  # ambiguous but every key is known to some candidate
        else:
            overlap = sorted(((len(keys & set(c.model_fields)), i) for i, c in enumerate(candidates)), reverse=True)
            if len(overlap) > 1 and overlap[0][0] == overlap[1][0]:
                cls = None
                known = set().union(*(c.model_fields for c in candidates))
            else:
                cls = candidates[overlap[0][1]]
                known = set(cls.model_fields)
            bad = sorted(str(k) for k in keys - known)
            raise MergeConfigError(
                f"{_kp(kp, bad[0])}: unknown key{_did_you_mean(bad[0], known)}; "
                f"valid keys here: {', '.join(sorted(known))}",
                key=_kp(kp, bad[0]),
            )
        for k, v in value.items():
            _check_unknown_keys(cls.model_fields[k].annotation, v, _kp(kp, k))
    elif isinstance(value, list):
        if origin in _UNION:
            inner = [typing.get_args(a)[0] for a in args if typing.get_origin(a) in (list, typing.List)]
            if not inner:
                return
            elem_ann = inner[0] if len(inner) == 1 else typing.Union[tuple(inner)]
        elif origin in (list, typing.List) and args:
            elem_ann = args[0]
        else:
            return
        for i, v in enumerate(value):
            _check_unknown_keys(elem_ann, v, _kp(kp, i))


# ----------------------------------------------------------------------------------------- model references

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9_][\w.-]{0,95}")


def _looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.fullmatch(ref)) and ".." not in ref and "--" not in ref and not ref.endswith(".")


_MARKERS = {
    "model": ("config.json",),
    "LoRA adapter": ("adapter_config.json",),
    "tokenizer": ("tokenizer_config.json", "tokenizer.json", "tokenizer.model"),
}


class _Resolver:
    def __init__(self, resolve_model: Callable[[str], str] | None):
        self.resolve_model = resolve_model

    def path(self, raw: Any, kp: str, what: str = "model") -> str:
        """Resolve one path (no ``@``/``+`` syntax): resolver, then absolute if local, else must be a hub id."""
        if not isinstance(raw, (str, os.PathLike)) or not str(raw).strip():
            raise MergeConfigError(f"{kp}: expected a {what} path or hub id, got {raw!r}", key=kp)
        ref = os.fspath(raw)
        resolved = ref
        if self.resolve_model is not None:
            out = self.resolve_model(ref)
            if out is not None:
                resolved = os.fspath(out)
        local = os.path.expanduser(resolved)
        if os.path.exists(local):
            local = os.path.abspath(local)
            markers = _MARKERS.get(what, ("config.json",))
            if not any(os.path.isfile(os.path.join(local, m)) for m in markers):
                raise MergeConfigError(
                    f"{kp}: {what} reference {ref!r}" + (f" (resolved to {local!r})" if local != ref else "")
                    + f" is not a {what} directory (no {' or '.join(markers)} in it)",
                    key=kp,
                )
            return local
        shown = f"{ref!r}" + (f" (resolved to {resolved!r})" if resolved != ref else "")
        if _looks_like_hub_id(resolved):
            head = resolved.split("/", 1)[0]
            if os.path.isdir(head):
                raise MergeConfigError(
                    f"{kp}: {what} reference {shown} does not exist locally (there is a local directory {head!r}, "
                    "so this is not read as a hub id)",
                    key=kp,
                )
            return resolved
        raise MergeConfigError(
            f"{kp}: {what} reference {shown} is neither an existing local path nor a Hugging Face hub id "
            "('org/name')",
            key=kp,
        )

    def model_path(self, value: Any, kp: str, what: str) -> Any:
        """A mergekit ``ModelPath``: ``"path[@rev]"`` or ``{path:, revision:}``; returns the dict form."""
        if isinstance(value, Mapping):
            out = dict(value)
            if "path" in out:
                out["path"] = self.path(out["path"], _kp(kp, "path"), what)
            return out
        if not isinstance(value, (str, os.PathLike)):
            return value  # let pydantic report the type error
        text = os.fspath(value)
        if os.path.exists(os.path.expanduser(text)) or "@" not in text:
            return {"path": self.path(text, kp, what)}
        if text.count("@") > 1:
            raise MergeConfigError(f"{kp}: invalid {what} reference {text!r} (more than one '@revision')", key=kp)
        path, rev = text.split("@")
        return {"path": self.path(path, kp, what), "revision": rev}

    def reference(self, value: Any, kp: str) -> Any:
        """A mergekit ``ModelReference``: ``"model[@rev][+lora[@rev]]"`` or ``{model:, lora:, ...}``."""
        if isinstance(value, Mapping):
            out = dict(value)
            if "model" in out:
                out["model"] = self.model_path(out["model"], _kp(kp, "model"), "model")
            if out.get("lora") is not None:
                out["lora"] = self.model_path(out["lora"], _kp(kp, "lora"), "LoRA adapter")
            return out
        if not isinstance(value, (str, os.PathLike)):
            return value
        text = os.fspath(value)
        if os.path.exists(os.path.expanduser(text)):
            parts = [text]
        else:
            parts = text.split("+")
            if len(parts) > 2:
                raise MergeConfigError(f"{kp}: invalid model reference {text!r} (more than one '+lora')", key=kp)
        model = self.model_path(parts[0], kp, "model")
        lora = self.model_path(parts[1], kp, "LoRA adapter") if len(parts) == 2 else None
        return _reference_value(model, lora)

    def maybe_reference(self, value: Any, kp: str) -> Any:
        """``tokenizer_source``-like fields: ``union``/``base`` keywords, ``None`` or a model reference."""
        if value is None or value in ("union", "base"):
            return value
        return self.reference(value, kp)


def _reference_value(model: dict, lora: dict | None) -> Any:
    """mergekit's string form when it round-trips, else the dict form."""

    def text(p: dict) -> str | None:
        if any(c in p["path"] for c in "@+") or (p.get("revision") and any(c in p["revision"] for c in "@+")):
            return None
        return p["path"] + (f"@{p['revision']}" if p.get("revision") else "")

    m, lo = text(model), (text(lora) if lora else "")
    if m is None or lo is None:
        return {"model": model, **({"lora": lora} if lora else {})}
    return m + (f"+{lo}" if lo else "")


def _resolve_references(cfg: dict, res: _Resolver) -> None:
    """Rewrite, in place, every model reference of a (deep-copied) raw merge config."""
    root = CONFIG_ROOT

    def walk_slices(slices: Any, kp: str) -> None:
        if not isinstance(slices, list):
            return
        for i, s in enumerate(slices):
            if not isinstance(s, dict):
                continue
            skp = _kp(kp, i)
            if s.get("base_model") is not None:
                s["base_model"] = res.reference(s["base_model"], _kp(skp, "base_model"))
            sources = s.get("sources")
            if isinstance(sources, list):
                for j, src in enumerate(sources):
                    if isinstance(src, dict) and "model" in src:
                        src["model"] = res.reference(src["model"], _kp(_kp(_kp(skp, "sources"), j), "model"))

    def walk_models(models: Any, kp: str) -> None:
        if not isinstance(models, list):
            return
        for i, m in enumerate(models):
            if isinstance(m, dict) and "model" in m:
                m["model"] = res.reference(m["model"], _kp(_kp(kp, i), "model"))

    if cfg.get("base_model") is not None:
        cfg["base_model"] = res.reference(cfg["base_model"], _kp(root, "base_model"))
    walk_models(cfg.get("models"), _kp(root, "models"))
    walk_slices(cfg.get("slices"), _kp(root, "slices"))
    modules = cfg.get("modules")
    if isinstance(modules, dict):
        for name, mod in modules.items():
            if isinstance(mod, dict):
                mkp = _kp(_kp(root, "modules"), name)
                walk_models(mod.get("models"), _kp(mkp, "models"))
                walk_slices(mod.get("slices"), _kp(mkp, "slices"))
    if "tokenizer_source" in cfg:
        cfg["tokenizer_source"] = res.maybe_reference(cfg["tokenizer_source"], _kp(root, "tokenizer_source"))
    tok = cfg.get("tokenizer")
    if isinstance(tok, dict):
        tkp = _kp(root, "tokenizer")
        if "source" in tok:
            tok["source"] = res.maybe_reference(tok["source"], _kp(tkp, "source"))
        tokens = tok.get("tokens")
        if isinstance(tokens, dict):
            for name, emb in tokens.items():
                if not isinstance(emb, dict) or emb.get("source") is None:
                    continue
                skp = _kp(_kp(_kp(tkp, "tokens"), name), "source")
                src = emb["source"]
                if isinstance(src, dict) and "kind" in src:
                    if src.get("kind") == "model_token" and "model" in src:
                        emb["source"] = {**src, "model": res.reference(src["model"], _kp(skp, "model"))}
                else:
                    emb["source"] = res.reference(src, skp)


# ------------------------------------------------------------------------------------------- pydantic errors


def _clean_tag(tag: str) -> str:
    m = re.fullmatch(r"function-\w+\[.*,\s*([^,\]]+)\]", tag)
    return m.group(1) if m else tag


def _format_validation_error(err: Any, data: Any) -> MergeConfigError:
    """Turn a pydantic ValidationError into one message keyed by paths of the user's own data."""
    groups: dict[str, dict[str, Any]] = {}
    for e in err.errors():
        node, kp, tags = data, CONFIG_ROOT, []
        loc = list(e.get("loc", ()))
        for i, part in enumerate(loc):
            if isinstance(node, Mapping) and part in node:
                node, kp = node[part], _kp(kp, part)
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node, kp = node[part], _kp(kp, part)
            elif e["type"] == "missing" and i == len(loc) - 1:
                kp = _kp(kp, part)
            elif isinstance(part, str):
                tags.append(_clean_tag(part))
        g = groups.setdefault(kp, {"msgs": [], "tags": [], "input": e.get("input"), "missing": False})
        if e["msg"] not in g["msgs"]:
            g["msgs"].append(e["msg"])
        if tags and tags[-1] not in g["tags"]:
            g["tags"].append(tags[-1])
        g["missing"] |= e["type"] == "missing" and not tags

    # keep the most specific paths: a union's failing branches also produce errors at the enclosing value
    leaves = [k for k in groups if not any(o != k and (o.startswith(k + ".") or o.startswith(k + "[")) for o in groups)]
    lines = []
    for kp in leaves:
        g = groups[kp]
        if g["missing"]:
            lines.append(f"{kp}: required key is missing")
            continue
        got = repr(g["input"])
        got = got if len(got) <= 80 else got[:77] + "..."
        if len(g["msgs"]) == 1:
            lines.append(f"{kp}: {g['msgs'][0]} (got {got})")
        elif g["tags"]:
            lines.append(f"{kp}: invalid value {got}; expected one of: {', '.join(g['tags'])}")
        else:
            lines.append(f"{kp}: invalid value {got}: {'; '.join(g['msgs'])}")
    key = leaves[0] if leaves else CONFIG_ROOT
    if len(lines) == 1:
        return MergeConfigError(lines[0], key=key)
    return MergeConfigError("invalid merge configuration:\n  " + "\n  ".join(lines), key=key)


# --------------------------------------------------------------------------------------- semantic checks


def _parameter_blocks(cfg: dict) -> Iterator[tuple[str, dict, bool]]:
    """(key path, parameters dict, is_per_model) for every ``parameters`` block of a raw config."""
    root = CONFIG_ROOT

    def inputs(container: dict, kp: str) -> Iterator[tuple[str, dict, bool]]:
        if isinstance(container.get("parameters"), dict):
            yield _kp(kp, "parameters"), container["parameters"], False
        for i, m in enumerate(container.get("models") or []):
            if isinstance(m, dict) and isinstance(m.get("parameters"), dict):
                yield _kp(_kp(_kp(kp, "models"), i), "parameters"), m["parameters"], True
        for i, s in enumerate(container.get("slices") or []):
            if not isinstance(s, dict):
                continue
            skp = _kp(_kp(kp, "slices"), i)
            if isinstance(s.get("parameters"), dict):
                yield _kp(skp, "parameters"), s["parameters"], False
            for j, src in enumerate(s.get("sources") or []):
                if isinstance(src, dict) and isinstance(src.get("parameters"), dict):
                    yield _kp(_kp(_kp(skp, "sources"), j), "parameters"), src["parameters"], True

    yield from inputs(cfg, root)
    for name, mod in (cfg.get("modules") or {}).items():
        if isinstance(mod, dict):
            yield from inputs(mod, _kp(_kp(root, "modules"), name))


def _check_method(cfg: dict) -> Any:
    kp = _kp(CONFIG_ROOT, "merge_method")
    name = cfg.get("merge_method")
    if name is None:
        raise MergeConfigError(f"{kp}: required key is missing; available methods: {', '.join(_merge_methods())}", key=kp)
    methods = _registered_methods()
    if not isinstance(name, str) or name not in methods:
        raise MergeConfigError(
            f"{kp}: unknown merge method {name!r}{_did_you_mean(str(name), methods)}; "
            f"available methods: {', '.join(_merge_methods())}",
            key=kp,
        )
    return methods[name]


def _check_semantics(raw: dict, conf: Any, method: Any) -> None:
    from mergekit.merge_methods.base import BasePolicy, ParameterScope

    spec = method.spec
    params = {p.name: p for p in spec.parameters}
    name = spec.name
    seen: set[str] = set()
    for kp, block, per_model in _parameter_blocks(raw):
        for pname in block:
            pkp = _kp(kp, pname)
            if pname not in params:
                valid = ", ".join(sorted(params)) or "none"
                raise MergeConfigError(
                    f"{pkp}: merge method {name!r} has no parameter {pname!r}{_did_you_mean(pname, params)}; "
                    f"its parameters: {valid}",
                    key=pkp,
                )
            if per_model and params[pname].scope == ParameterScope.SHARED:
                raise MergeConfigError(
                    f"{pkp}: {pname!r} is a shared parameter of merge method {name!r}; mergekit ignores it per "
                    f"model: set it under {_kp(CONFIG_ROOT, 'parameters')} (or a slice's parameters)",
                    key=pkp,
                )
            seen.add(pname)
    for p in spec.parameters:
        if p.required and p.name not in seen:
            where = "" if p.scope == ParameterScope.SHARED else " or in each model's parameters"
            kp = _kp(CONFIG_ROOT, "parameters")
            raise MergeConfigError(
                f"{kp}: merge method {name!r} requires parameter {p.name!r}; set it under {kp}{where}", key=kp
            )

    # the method's input contract (base model policy, number of inputs), as mergekit checks it after planning
    contract = spec.contract
    groups: list[tuple[str, list, Any]] = []
    root_base = conf.base_model

    def add_container(kp: str, models: Any, slices: Any) -> None:
        if models:
            refs = [m.model for m in models]
            if root_base is not None and root_base not in refs:
                refs.append(root_base)  # mergekit adds the base model as an input
            groups.append((_kp(kp, "models"), refs, root_base))
        for i, s in enumerate(slices or []):
            groups.append((_kp(_kp(kp, "slices"), i), [src.model for src in s.sources], s.base_model or root_base))

    add_container(CONFIG_ROOT, conf.models, conf.slices)
    for mname, mod in (conf.modules or {}).items():
        add_container(_kp(_kp(CONFIG_ROOT, "modules"), mname), mod.models, mod.slices)
    for kp, refs, base in groups:
        if contract.base == BasePolicy.REQUIRED and base is None:
            bkp = _kp(CONFIG_ROOT, "base_model")
            raise MergeConfigError(
                f"{bkp}: merge method {name!r} requires a base_model (the model the others are merged onto)", key=bkp
            )
        try:
            method.validate_inputs([str(r) for r in refs], None if base is None else str(base))
        except ValueError as e:
            raise MergeConfigError(f"{kp}: {e} (merge method {name!r})", key=kp) from None


def validate_merge_config(
    merge_config: Mapping[str, Any], *, resolve_model: Callable[[str], str] | None = None
) -> Any:
    """Resolve model references in (a copy of) ``merge_config`` and validate it.

    Returns the ``mergekit.config.MergeConfiguration``; raises :class:`MergeConfigError`.
    """
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    if not isinstance(merge_config, Mapping):
        raise MergeConfigError(
            f"{CONFIG_ROOT}: expected a mapping (mergekit configuration), got {type(merge_config).__name__}",
            key=CONFIG_ROOT,
        )
    raw = copy.deepcopy(dict(merge_config))
    _check_unknown_keys(MergeConfiguration, raw, CONFIG_ROOT)
    method = _check_method(raw)
    _resolve_references(raw, _Resolver(resolve_model))
    try:
        conf = MergeConfiguration.model_validate(raw)
    except ValidationError as e:
        raise _format_validation_error(e, raw) from None
    except (RuntimeError, ValueError) as e:  # mergekit's validators raise RuntimeError, which pydantic passes on
        raise MergeConfigError(f"{CONFIG_ROOT}: {e}", key=CONFIG_ROOT) from None
    _check_semantics(raw, conf, method)
    return conf


# ------------------------------------------------------------------------------------------------------ running


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
# what mergekit copies verbatim from a donor model (plus vocab files of BPE/WordPiece tokenizers)
_TOKENIZER_COPY = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def _write_tokenizer(src: str, revision: str | None, out: Path, conf: Any, *, kp: str) -> None:
    """Put the tokenizer of ``src`` (local dir or hub id) into ``out``: copy its files, else load and re-save."""
    from transformers import AutoTokenizer

    local = Path(src)
    if (
        local.is_dir()
        and not conf.chat_template
        and (local / "tokenizer_config.json").is_file()
        and any((local / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    ):
        for name in _TOKENIZER_COPY:
            if (local / name).is_file():
                shutil.copy(local / name, out / name)
        return
    try:
        tok = AutoTokenizer.from_pretrained(src, revision=revision, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - report any loader failure as a config problem
        raise MergeConfigError(
            f"{kp}: the merged weights are in {out} but the tokenizer of {src!r} does not load "
            f"({type(e).__name__}: {e})",
            key=kp,
        ) from e
    if conf.chat_template:
        try:
            from mergekit.merge import _set_chat_template
        except ImportError:  # pragma: no cover - private helper moved
            tok.chat_template = conf.chat_template
        else:
            _set_chat_template(tok, conf)
    tok.save_pretrained(str(out))


def run_mergekit(
    merge_config: Mapping[str, Any],
    output_dir: str | os.PathLike,
    *,
    resolve_model: Callable[[str], str] | None = None,
    copy_tokenizer_from: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Path:
    """Run the mergekit merge described by ``merge_config`` (a mergekit YAML config as a dict) into ``output_dir``.

    ``resolve_model`` maps each model reference path (e.g. a run directory) to a model path or hub id; local paths
    are then made absolute. ``copy_tokenizer_from`` (a model or tokenizer reference, resolved the same way) is where
    the output's tokenizer comes from when the config does not build one (default: ``base_model``, else the first
    model). ``options`` overrides ``mergekit.options.MergeOptions`` fields (defaults: CPU, no remote code, no
    architecture mixing). Returns the absolute output directory. Raises :class:`MergeConfigError` for a bad config,
    before any weight is read.
    """
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import MergeOptions, run_merge

    conf = validate_merge_config(merge_config, resolve_model=resolve_model)
    out = Path(output_dir).expanduser().absolute()
    donor = _first_model(conf)

    opts: dict[str, Any] = dict(
        cuda=False,
        device="cpu",
        allow_crimes=False,
        trust_remote_code=False,
        lazy_unpickle=False,
        safe_serialization=True,
        write_model_card=True,
        quiet=True,  # no progress bars: a tiny merge takes well under a second, a large one logs its own steps
    )
    if options:
        unknown = [k for k in options if k not in MergeOptions.model_fields]
        if unknown:
            raise MergeConfigError(
                f"unknown mergekit option {unknown[0]!r}{_did_you_mean(unknown[0], MergeOptions.model_fields)}",
                key=unknown[0],
            )
        opts.update(options)
        if options.get("cuda") and "device" not in options:
            opts["device"] = "cuda"
    want_tokenizer = opts.pop("copy_tokenizer", True)

    # tokenizer: mergekit builds one when the config says so (tokenizer_source / tokenizer: the merged embeddings
    # follow its vocabulary); otherwise we copy one ourselves: mergekit's own fallback takes an arbitrary input model
    # when there is no base_model, and "re-serializes" a tokenizer even from a directory that has none (transformers
    # then builds an empty one)
    builds_tokenizer = conf.tokenizer is not None or conf.tokenizer_source is not None
    tok_src: tuple[str, str | None, str] | None = None
    if copy_tokenizer_from is not None:
        if builds_tokenizer:
            warnings.warn(
                "copy_tokenizer_from is ignored: the merge config builds its own tokenizer "
                "(tokenizer_source/tokenizer), whose vocabulary the merged embeddings follow",
                stacklevel=2,
            )
        else:
            ref = _Resolver(resolve_model).model_path(copy_tokenizer_from, "copy_tokenizer_from", "tokenizer")
            tok_src = (ref["path"], ref.get("revision"), "copy_tokenizer_from")
    elif not builds_tokenizer and want_tokenizer:
        kp = _kp(CONFIG_ROOT, "base_model" if conf.base_model is not None else "models")
        tok_src = (donor.model.path, donor.model.revision, kp)
        local = Path(donor.model.path)
        if local.is_dir() and not any((local / f).is_file() for f in _TOKENIZER_FILES):
            raise MergeConfigError(
                f"{CONFIG_ROOT}: no tokenizer to give the merged model: {str(donor)!r} has no tokenizer files; "
                f"set {_kp(CONFIG_ROOT, 'tokenizer_source')} to a model that has one, or give a tokenizer to copy",
                key=CONFIG_ROOT,
            )
    opts["copy_tokenizer"] = False  # (a tokenizer mergekit builds is written regardless of this flag)

    has_lora = any(r.lora is not None for r in conf.referenced_models())
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="postrain-lora-merge-") as lora_cache:
        if has_lora and not opts.get("lora_merge_cache"):
            opts["lora_merge_cache"] = lora_cache
        merge_options = MergeOptions(**opts)
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

    if tok_src is not None and want_tokenizer:
        _write_tokenizer(tok_src[0], tok_src[1], out, conf, kp=tok_src[2])
    donor_dir = Path(donor.model.path)
    if not (out / "generation_config.json").exists() and (donor_dir / "generation_config.json").is_file():
        shutil.copy(donor_dir / "generation_config.json", out / "generation_config.json")
    return out
