"""Validation of a merge configuration beyond mergekit's own schema.

Unknown keys (pydantic would silently ignore them), unknown ``merge_method`` (with a "did you mean"), parameter
names the method does not know, shared parameters (e.g. slerp's ``t``) set per model where mergekit would ignore
them, required parameters set nowhere, a missing ``base_model`` for methods that need one and wrong input counts
(mergekit's own input contract, checked before any weight is read). Errors name the key path
(``merge.models[1].parameters``).
"""

from __future__ import annotations

import copy
import json
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from postrain.errors import did_you_mean
from postrain.merging.references import CONFIG_ROOT, MergeConfigError, key_path, Resolver, resolve_references


def _did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    hint = did_you_mean(word, choices)
    return f" ({hint})" if hint else ""


def _registered_methods() -> dict[str, Any]:
    # optional: mergekit
    from mergekit.merge_methods import registered_methods

    return {m.spec.name: m for m in registered_methods()}


def merge_methods() -> list[str]:
    """The merge methods of the installed mergekit, sorted."""
    return sorted(_registered_methods())


_UNION = (typing.Union, types.UnionType)


def _model_classes(ann: Any) -> list[Any]:
    """Pydantic model classes a dict value of annotation ``ann`` could be validated as."""
    # optional: pydantic, which comes with mergekit
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
                _check_unknown_keys(args[1], v, key_path(kp, k))
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
                f"{key_path(kp, bad[0])}: unknown key{_did_you_mean(bad[0], known)}; "
                f"valid keys here: {', '.join(sorted(known))}",
                key=key_path(kp, bad[0]),
            )
        for k, v in value.items():
            _check_unknown_keys(cls.model_fields[k].annotation, v, key_path(kp, k))
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
            _check_unknown_keys(elem_ann, v, key_path(kp, i))


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
                node, kp = node[part], key_path(kp, part)
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node, kp = node[part], key_path(kp, part)
            elif e["type"] == "missing" and i == len(loc) - 1:
                kp = key_path(kp, part)
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


def _parameter_blocks(cfg: dict) -> Iterator[tuple[str, dict, bool]]:
    """(key path, parameters dict, is_per_model) for every ``parameters`` block of a raw config."""
    root = CONFIG_ROOT

    def inputs(container: dict, kp: str) -> Iterator[tuple[str, dict, bool]]:
        if isinstance(container.get("parameters"), dict):
            yield key_path(kp, "parameters"), container["parameters"], False
        for i, m in enumerate(container.get("models") or []):
            if isinstance(m, dict) and isinstance(m.get("parameters"), dict):
                yield key_path(key_path(key_path(kp, "models"), i), "parameters"), m["parameters"], True
        for i, s in enumerate(container.get("slices") or []):
            if not isinstance(s, dict):
                continue
            skp = key_path(key_path(kp, "slices"), i)
            if isinstance(s.get("parameters"), dict):
                yield key_path(skp, "parameters"), s["parameters"], False
            for j, src in enumerate(s.get("sources") or []):
                if isinstance(src, dict) and isinstance(src.get("parameters"), dict):
                    yield key_path(key_path(key_path(skp, "sources"), j), "parameters"), src["parameters"], True

    yield from inputs(cfg, root)
    for name, mod in (cfg.get("modules") or {}).items():
        if isinstance(mod, dict):
            yield from inputs(mod, key_path(key_path(root, "modules"), name))


def _check_method(cfg: dict) -> Any:
    kp = key_path(CONFIG_ROOT, "merge_method")
    name = cfg.get("merge_method")
    if name is None:
        raise MergeConfigError(f"{kp}: required key is missing; available methods: {', '.join(merge_methods())}", key=kp)
    methods = _registered_methods()
    if not isinstance(name, str) or name not in methods:
        raise MergeConfigError(
            f"{kp}: unknown merge method {name!r}{_did_you_mean(str(name), methods)}; "
            f"available methods: {', '.join(merge_methods())}",
            key=kp,
        )
    return methods[name]


def _check_semantics(raw: dict, conf: Any, method: Any) -> None:
    # optional: mergekit
    from mergekit.merge_methods.base import BasePolicy, ParameterScope

    spec = method.spec
    params = {p.name: p for p in spec.parameters}
    name = spec.name
    seen: set[str] = set()
    for kp, block, per_model in _parameter_blocks(raw):
        for pname in block:
            pkp = key_path(kp, pname)
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
                    f"model: set it under {key_path(CONFIG_ROOT, 'parameters')} (or a slice's parameters)",
                    key=pkp,
                )
            seen.add(pname)
    for p in spec.parameters:
        if p.required and p.name not in seen:
            where = "" if p.scope == ParameterScope.SHARED else " or in each model's parameters"
            kp = key_path(CONFIG_ROOT, "parameters")
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
            groups.append((key_path(kp, "models"), refs, root_base))
        for i, s in enumerate(slices or []):
            groups.append((key_path(key_path(kp, "slices"), i), [src.model for src in s.sources], s.base_model or root_base))

    add_container(CONFIG_ROOT, conf.models, conf.slices)
    for mname, mod in (conf.modules or {}).items():
        add_container(key_path(key_path(CONFIG_ROOT, "modules"), mname), mod.models, mod.slices)
    for kp, refs, base in groups:
        if contract.base == BasePolicy.REQUIRED and base is None:
            bkp = key_path(CONFIG_ROOT, "base_model")
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
    # optional: mergekit (pydantic comes with it)
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
    resolve_references(raw, Resolver(resolve_model))
    try:
        conf = MergeConfiguration.model_validate(raw)
    except ValidationError as e:
        raise _format_validation_error(e, raw) from None
    except (RuntimeError, ValueError) as e:  # mergekit's validators raise RuntimeError, which pydantic passes on
        raise MergeConfigError(f"{CONFIG_ROOT}: {e}", key=CONFIG_ROOT) from None
    _check_semantics(raw, conf, method)
    _check_input_shapes(conf)
    return conf


# config.json keys that fix the shape of every weight a merge combines tensor by tensor.
SHAPE_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads")


def _check_input_shapes(conf: Any) -> None:
    """A merge over whole models (`models:`, not `slices:`) combines each tensor of every input: inputs of another
    depth or width have no such tensor, and mergekit fails reading it once the output directory exists. Local
    inputs are compared by their config.json (hub inputs are not downloaded here)."""

    if conf.slices is not None:  # layer ranges picked per input (frankenmerges): mergekit's own planner checks
        return
    shapes: dict[str, tuple[str, dict]] = {}
    for reference in conf.referenced_models():
        path = Path(str(reference.model.path))
        if not (path / "config.json").is_file():
            continue
        config = json.loads((path / "config.json").read_text())
        shapes.setdefault(str(path), (str(reference), {k: config.get(k) for k in SHAPE_KEYS}))
    if len(shapes) < 2:
        return
    (first, first_shape), *others = shapes.values()
    for name, shape in others:
        differ = [k for k in SHAPE_KEYS if shape[k] != first_shape[k]]
        if differ:
            key = differ[0]
            raise MergeConfigError(
                f"{CONFIG_ROOT}: the inputs differ in shape, so their weights cannot be merged tensor by tensor: "
                f"{key} is {first_shape[key]!r} in {first} but {shape[key]!r} in {name}"
                f"{' (and ' + ', '.join(differ[1:]) + ')' if len(differ) > 1 else ''}; merge models of one "
                f"architecture, or pick layers with slices:", key=CONFIG_ROOT)


