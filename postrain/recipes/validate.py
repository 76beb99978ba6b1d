"""Check a resolved recipe against its dataclass schema: unknown keys and wrong types, with their origin.

One mechanism for every section: our own dataclasses (postrain.recipes.schema) and the library dataclasses that
some sections map onto (TRL's SFTConfig / DPOConfig / GRPOConfig under `trainer:`, peft's LoraConfig under
`peft:`). An unknown key names the file (or command line) it came from and the closest valid keys.

The trainer's config class is the trainers' to say (postrain.trainers.config_class, a layer above this one): the
caller passes it in as `config_class(command) -> type` (postrain.jobs.loading does). So are the keys a data source
takes besides SourceSpec's fields (its transform's settings: the transforms' registry says which), passed in as
`other_keys(dataclass) -> {key: [its readers]}`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Callable, Union

from postrain.errors import RecipeError, did_you_mean, origin_of
from postrain.value_types import matches as _matches, type_name

# command -> the TRL config class its `trainer:` section is validated against (postrain.trainers.config_class).
ConfigClass = Callable[[str], type]
# a section's dataclass -> the keys it takes besides its fields, each -> what reads it: a data source's transform
# settings (postrain.data.transforms.keys_besides_fields: the keys its registered transforms own).
OtherKeys = Callable[[type], dict[str, list[str]]]


def no_other_keys(cls: type) -> dict[str, list[str]]:
    return {}


def _library_dataclass(meta: dict, config_class: ConfigClass | None) -> type | None:
    if "trainer_config" in meta:
        if config_class is None:  # a caller's mistake, not the recipe's: a trainer: section cannot go unchecked
            raise TypeError("validating a trainer: section needs config_class (postrain.trainers.config_class)")
        return config_class(meta["trainer_config"])
    if "peft" in meta:
        import peft  # slow: peft, needed only when this runs

        return getattr(peft, meta["peft"])
    return None


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> type annotation of a dataclass's recipe keys (init fields not marked `recipe_key: False`), with
    string annotations resolved."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # some library annotations do not resolve; fall back to the raw ones
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)
            if f.init and f.metadata.get("recipe_key", True)}


def unknown_key_error(path: str, key: str, valid: list[str], origins: dict[str, str]) -> RecipeError:
    hint = did_you_mean(key, valid) or f"valid keys: {', '.join(sorted(valid)[:30])}"
    return RecipeError(f"unknown key '{path}' (from {origin_of(origins, path)}): {hint}")


def validate_section(value: Any, tp: Any, path: str, origins: dict[str, str], meta: dict | None = None,
                     config_class: ConfigClass | None = None, other_keys: OtherKeys = no_other_keys) -> None:
    """Raise RecipeError for the first unknown key or wrongly typed value under `path`."""
    lib_cls = _library_dataclass(meta or {}, config_class)
    if lib_cls is not None and value is not None:
        if not isinstance(value, dict):
            raise RecipeError(f"'{path}' (from {origin_of(origins, path)}) must be a mapping of {lib_cls.__name__} fields")
        _validate_dataclass(value, lib_cls, path, origins, config_class, other_keys)
        return
    if not _matches(value, tp):
        raise RecipeError(
            f"'{path}' (from {origin_of(origins, path)}) has the wrong type: expected {type_name(tp)}, "
            f"got {type(value).__name__} {value!r}"
        )
    # Recurse into dataclass-typed values, including inside Optional / list / dict.
    for inner in _dataclass_members(tp):
        if isinstance(value, dict) and inner is not None:
            _validate_dataclass(value, inner, path, origins, config_class, other_keys)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]) and isinstance(value, dict):
        for k, v in value.items():
            validate_section(v, args[1], f"{path}.{k}", origins, config_class=config_class, other_keys=other_keys)
    if origin is list and args and dataclasses.is_dataclass(args[0]) and isinstance(value, list):
        for i, v in enumerate(value):
            validate_section(v, args[0], f"{path}[{i}]", origins, config_class=config_class, other_keys=other_keys)


def _dataclass_members(tp: Any) -> list[type]:
    if dataclasses.is_dataclass(tp):
        return [tp]
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
    return []


def _validate_dataclass(value: dict, cls: type, path: str, origins: dict[str, str],
                        config_class: ConfigClass | None, other_keys: OtherKeys) -> None:
    types_ = field_types(cls)
    extra = other_keys(cls)
    metas = {f.name: dict(f.metadata) for f in dataclasses.fields(cls)}
    for key, sub in value.items():
        sub_path = f"{path}.{key}" if path else str(key)
        if key in extra:
            continue
        if key not in types_:
            raise unknown_key_error(sub_path, str(key), [*types_, *extra], origins)
        validate_section(sub, types_[key], sub_path, origins, metas.get(key), config_class, other_keys)


def validate_recipe(cfg: dict, schema: type, origins: dict[str, str], config_class: ConfigClass,
                    other_keys: OtherKeys = no_other_keys) -> None:
    _validate_dataclass(cfg, schema, "", origins, config_class, other_keys)
