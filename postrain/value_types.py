"""Whether a value read from YAML fits a type annotation, and the annotation's name in an error message.

One matcher for every load-time type check: recipe sections against their dataclasses (postrain.recipes.validate)
and registry hyperparameters against their signatures (postrain.registry); and range declarations ("> 0",
"in [0, 1)") with their check, for registry parameters and the library configs' fields (postrain.jobs.checks).
It sits below both.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import types
import typing
from typing import Any, Callable, Literal, Union

from postrain.errors import RecipeError


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple, typing.Sequence):
        args = typing.get_args(tp)
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def matches(value: Any, tp: Any) -> bool:
    """Whether a YAML value fits a type annotation. Lenient where YAML cannot express the type exactly."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return True
    if tp is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, list):
            return False
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return not args or all(matches(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return any(value == m.value or value == m.name or value is m for m in tp)
    # A library class we cannot build from YAML directly (e.g. a parallelism config): mappings and strings pass
    # and the library checks them when the config object is built.
    return isinstance(value, (dict, str))


_BOUND = re.compile(r"^(>=|>|<=|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")
_INTERVAL = re.compile(r"^in\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])$")


def parse_range(spec: str) -> Callable[[float], bool]:
    """A range declaration as a predicate: "> 0", ">= 0", "< 1", "<= 1", or an interval "in [0, 1)" ("inf" allowed
    as a bound). A ValueError for anything else (a registration mistake, raised when the entry registers)."""
    text = spec.strip()
    bound = _BOUND.match(text)
    if bound:
        op, limit = bound.group(1), float(bound.group(2))
        return {">": lambda v: v > limit, ">=": lambda v: v >= limit,
                "<": lambda v: v < limit, "<=": lambda v: v <= limit}[op]
    interval = _INTERVAL.match(text)
    if interval:
        left, low, high, right = interval.groups()
        low, high = float(low), float(high)
        return lambda v: (v > low if left == "(" else v >= low) and (v < high if right == ")" else v <= high)
    raise ValueError(f"range {spec!r} is not of the form '> 0', '>= 0', '< 1', '<= 1' or 'in [lo, hi)'")


def check_value(value: Any, tp: Any, allowed: str | None, what: str) -> None:
    """Raise RecipeError when `value` (a recipe value) does not fit the annotation `tp` or the range `allowed`;
    `what` names the parameter and where it was set."""
    if not matches(value, tp):
        raise RecipeError(f"{what} must be {type_name(tp)}, got {type(value).__name__} {value!r}")
    if allowed is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if math.isnan(value) or not parse_range(allowed)(value):
        raise RecipeError(f"{what} must be {allowed}, got {value!r}")
