"""The data transforms' registry: `transform: <name>` of a source names an entry of TRANSFORMS.

An entry is a function over a source's rows, registered with `@TRANSFORMS.register(name, ...)`:

    @TRANSFORMS.register("score_lists", columns=("prompt", "completion", "score"), rows_per_row=None,
                         empty="no prompt has two completions scored differently")
    def score_lists(rows, where): ...

Its data inputs (before `*`) are what it reads of the source, by name: `rows` (a list of dicts), `dataset` (the
`datasets.Dataset`, for a transform that maps it whole), `where` (the recipe key, for errors), `source` (the
SourceSpec: its chat / prompt_template formatting) and `prompt_template`. Its keyword-only parameters are the keys of
its recipe section, their annotations their types and their defaults the defaults; they are checked when the
recipe loads (`check_transform`). It returns the new rows (a list of dicts or a Dataset); an empty result is an
error saying why (`empty=`).

Facts about an entry, as keyword metadata on `register` (in `variant.extra`):
  section        the source key whose mapping holds its parameters (`pairing`, `steps`, ...); None: its parameters
                 are keys of the source itself (curriculum_pairs' `curriculum_stage`)
  rows_per_row   rows out per row in, when known before it runs (unpair: 2); None: known only once it has run
  columns        the columns it reads (documentation: the transform itself names a missing one)
  models         parameters that are model specs it loads (DICE's policy and reference): checked as `model:` is
  empty          why it made no rows, for the error (a string, or a function of its parameters)
  template_after whether load_source applies the source's prompt_template to its rows (False: its rows' prompts
                 are formatted already, or it formatted them itself)
  check          `check(params, spec, where)`: load-time checks beyond the types and ranges of the signature
                 (`params`: the defaults filled in; `spec`: the source as written), raising RecipeError
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from postrain.data.source_spec import SourceSpec
from postrain.errors import RecipeError
from postrain.registry import Registry, Variant, suggest
from postrain.value_types import check_value, type_name

TRANSFORMS = Registry("transform", what="data transform", papers=False)


def section_of(variant: Variant) -> str | None:
    return variant.extra.get("section")


def owned_keys(variant: Variant) -> tuple[str, ...]:
    """The source keys that hold the transform's settings: its section, or its parameters themselves."""
    section = section_of(variant)
    return (section,) if section else tuple(variant.params)


def rows_per_row(variant: Variant) -> int | None:
    return variant.extra.get("rows_per_row")


def required_params(variant: Variant) -> list[str]:
    return [p.name for p in variant.signature.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty]


def _get(spec: Any, key: str) -> Any:
    """A transform's source key, from the source as written (a mapping) or as a SourceSpec (its other keys)."""
    return spec.get(key) if isinstance(spec, dict) else spec.transform_settings.get(key)


def transform_keys() -> dict[str, list[str]]:
    """Every source key a registered transform owns -> the transforms reading it: the keys a source may have
    besides SourceSpec's own fields (the recipe schema accepts them; check_transform checks their contents)."""
    keys: dict[str, list[str]] = {}
    for entry in TRANSFORMS:
        for key in owned_keys(entry):
            keys.setdefault(key, []).append(entry.name)
    return keys


def keys_besides_fields(cls: type) -> dict[str, list[str]]:
    """The keys a recipe section of dataclass `cls` takes besides its fields -> what reads them: a data source's
    (SourceSpec and its subclasses: an eval set, a mix) are its transforms' keys; other sections take none. The
    recipe schema's validation is handed this (postrain.recipes.validate.OtherKeys)."""
    return transform_keys() if issubclass(cls, SourceSpec) else {}


def given_params(spec: Any, variant: Variant) -> dict[str, Any]:
    """The transform's settings as the source gives them (no defaults): its section's mapping, or the source keys
    that are its parameters (those set)."""
    section = section_of(variant)
    if section:
        value = _get(spec, section)
        return dict(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value or {})
    return {key: _get(spec, key) for key in variant.params if _get(spec, key) is not None}


def empty_reason(variant: Variant, params: dict[str, Any]) -> str:
    """Why the transform made no rows, at these settings (defaults filled in)."""
    why = variant.extra.get("empty", "none of the rows gave one")
    return why({**variant.params, **params}) if callable(why) else why


def check_transform(spec: dict, where: str) -> Variant | None:
    """The load-time checks of a source's `transform:` and its settings: a registered name; no other transform's
    section set; in its own, only its parameters, of its annotated types and declared ranges (and its `check`)."""
    name = spec.get("transform")
    variant = TRANSFORMS.get(name, f"{where}.transform") if name is not None else None
    for key, names in transform_keys().items():
        if spec.get(key) is not None and (variant is None or key not in owned_keys(variant)):
            raise RecipeError(f"{where}.{key}: set only with transform: {' or '.join(names)} (transform is "
                              f"{name!r}); remove it or set the transform")
    if variant is None:
        return None
    section = section_of(variant)
    if section and not isinstance(spec.get(section) or {}, dict):
        raise RecipeError(f"{where}.{section}: a mapping of transform {name!r}'s settings "
                          f"({', '.join(variant.params)}), got {spec[section]!r}")
    given = given_params(spec, variant)
    label = {key: f"{where}.{section}.{key}" if section else f"{where}.{key}" for key in {*given, *variant.params}}
    for key in given:
        if key not in variant.params:
            readers = [e.name for e in TRANSFORMS if section and section_of(e) == section and key in e.params]
            if readers:
                raise RecipeError(f"{label[key]}: read by transform {' / '.join(readers)} only, not by {name!r}; "
                                  f"{name!r} reads {', '.join(variant.params)}")
            raise RecipeError(f"unknown key '{label[key]}': {suggest(key, variant.params, f'{name} reads')}")
    types = variant.param_types
    required = required_params(variant)
    # A required parameter set to null is unset: the entry's check or the last loop names what it needs.
    given = {key: value for key, value in given.items() if value is not None or key not in required}
    for key, value in given.items():  # types first: the entry's own checks may compare the values
        check_value(value, types[key], None, f"{label[key]}:")
    full = {**variant.params, **given}
    check = variant.extra.get("check")
    if check is not None:
        check(full, spec, where)
    for key, value in given.items():
        check_value(value, types[key], variant.ranges.get(key), f"{label[key]}:")
    for key in required:
        if full[key] is None:
            raise RecipeError(f"{label[key]}: transform {name!r} needs it ({type_name(types[key])})")
    return variant
