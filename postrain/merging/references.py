"""Model references in a mergekit configuration: the one walker over every place mergekit accepts one, and the
resolver that turns postrain references (run directories, `tiny`, relative paths) into what mergekit reads.

Every place mergekit accepts a model reference: ``base_model``, ``models[*].model``, ``slices[*].base_model``,
``slices[*].sources[*].model``, the same under ``modules.<name>``, ``tokenizer_source``, ``tokenizer.source`` and
``tokenizer.tokens.<tok>.source`` (plain or ``{kind: model_token, model: ...}``). A reference is a string
``path[@revision][+lora_path[@revision]]`` or mergekit's dict form ``{model: ..., lora: ...}``; each path in it is
passed through ``resolve_model`` (if given), then made absolute if it exists locally (mergekit reads a relative
path as a hub id). A path that neither exists nor looks like a hub id (``org/name``) is an error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from postrain.errors import PostrainError, RecipeError
from postrain.models.loading import hub_id_or_error

#: Root of the key paths in error messages (the recipe section holding the mergekit config).
CONFIG_ROOT = "merge"


class MergeConfigError(RecipeError, ValueError):
    """The merge configuration is invalid; the message names the key path (``merge.models[1].parameters``)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def key_path(base: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{base}[{key}]"
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{base}.{key}"
    return f"{base}[{key!r}]"


def reference_slots(cfg: Mapping) -> Iterator[tuple[str, Any, Any, bool]]:
    """Every model reference of a raw merge config: (key path, container, key, optional), where
    ``container[key]`` holds the reference; ``optional`` slots (tokenizer sources) may also hold ``union``/``base``.
    The one walker: resolution rewrites through it, lineage and plans read through it."""
    root = CONFIG_ROOT

    def models(container: Any, kp: str):
        for i, m in enumerate(container if isinstance(container, list) else []):
            if isinstance(m, dict) and "model" in m:
                yield key_path(key_path(kp, i), "model"), m, "model", False

    def slices(container: Any, kp: str):
        for i, s in enumerate(container if isinstance(container, list) else []):
            if not isinstance(s, dict):
                continue
            skp = key_path(kp, i)
            if s.get("base_model") is not None:
                yield key_path(skp, "base_model"), s, "base_model", False
            for j, src in enumerate(s.get("sources") if isinstance(s.get("sources"), list) else []):
                if isinstance(src, dict) and "model" in src:
                    yield key_path(key_path(key_path(skp, "sources"), j), "model"), src, "model", False

    if cfg.get("base_model") is not None:
        yield key_path(root, "base_model"), cfg, "base_model", False
    yield from models(cfg.get("models"), key_path(root, "models"))
    yield from slices(cfg.get("slices"), key_path(root, "slices"))
    for name, mod in (cfg.get("modules") or {}).items() if isinstance(cfg.get("modules"), dict) else []:
        if isinstance(mod, dict):
            mkp = key_path(key_path(root, "modules"), name)
            yield from models(mod.get("models"), key_path(mkp, "models"))
            yield from slices(mod.get("slices"), key_path(mkp, "slices"))
    if "tokenizer_source" in cfg:
        yield key_path(root, "tokenizer_source"), cfg, "tokenizer_source", True
    tok = cfg.get("tokenizer")
    if isinstance(tok, dict):
        tkp = key_path(root, "tokenizer")
        if "source" in tok:
            yield key_path(tkp, "source"), tok, "source", True
        for name, emb in (tok.get("tokens") or {}).items() if isinstance(tok.get("tokens"), dict) else []:
            if not isinstance(emb, dict) or emb.get("source") is None:
                continue
            skp = key_path(key_path(key_path(tkp, "tokens"), name), "source")
            src = emb["source"]
            if isinstance(src, dict) and "kind" in src:
                if src.get("kind") == "model_token" and "model" in src:
                    yield key_path(skp, "model"), src, "model", False
            else:
                yield skp, emb, "source", False


def model_references(cfg: Mapping) -> list[str]:
    """The model paths a merge config reads, as written (for lineage and plans)."""
    out = []
    for _, container, key, optional in reference_slots(cfg):
        value = container[key]
        if optional and (value is None or value in ("union", "base")):
            continue
        out.append(str(value.get("model", value) if isinstance(value, Mapping) else value))
    return out


_MARKERS = {
    "model": ("config.json",),
    "LoRA adapter": ("adapter_config.json",),
    "tokenizer": ("tokenizer_config.json", "tokenizer.json", "tokenizer.model"),
}


class Resolver:
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
        try:
            return hub_id_or_error(resolved, what=what, shown=shown)
        except PostrainError as e:
            raise MergeConfigError(f"{kp}: {e}", key=kp) from None

    def model_path(self, value: Any, kp: str, what: str) -> Any:
        """A mergekit ``ModelPath``: ``"path[@rev]"`` or ``{path:, revision:}``; returns the dict form."""
        if isinstance(value, Mapping):
            out = dict(value)
            if "path" in out:
                out["path"] = self.path(out["path"], key_path(kp, "path"), what)
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
                out["model"] = self.model_path(out["model"], key_path(kp, "model"), "model")
            if out.get("lora") is not None:
                out["lora"] = self.model_path(out["lora"], key_path(kp, "lora"), "LoRA adapter")
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


def resolve_references(cfg: dict, res: Resolver) -> None:
    """Rewrite, in place, every model reference of a (deep-copied) raw merge config."""
    for kp, container, key, optional in list(reference_slots(cfg)):
        resolve = res.maybe_reference if optional else res.reference
        container[key] = resolve(container[key], kp)
