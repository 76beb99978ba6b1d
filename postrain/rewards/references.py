"""User reward functions by reference: ``"package.module:function"`` or ``"path/to/file.py:function"``.

`load_function` imports one; postrain.rewards.build does so for a recipe's `fn:` entries (with `resolved_reference`,
the reference a worker process can import again from any working directory) and the worker process
(postrain.rewards.worker) for the reward it is sent by reference.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

from postrain.errors import did_you_mean
from postrain.rewards.registry import RewardSpecError


def load_function(reference: str, where: str = "fn", base_dir: str | Path | None = None) -> Callable:
    """Import a user reward function from ``"package.module:function"`` or ``"path/to/file.py:function"``.

    The function must be synchronous and accept ``**kwargs`` (TRL passes prompts, completion_ids, trainer_state
    and every dataset column as keyword arguments). Raises RewardSpecError saying which part cannot be found.
    """
    if not isinstance(reference, str) or ":" not in reference:
        raise RewardSpecError(f"{where}: fn {reference!r} must be 'package.module:function' or "
                              "'path/to/file.py:function'")
    source, _, attribute = reference.rpartition(":")
    if not source or not attribute:
        raise RewardSpecError(f"{where}: fn {reference!r} must be 'package.module:function' or "
                              "'path/to/file.py:function'")
    module = (
        _import_file(source, reference, where, base_dir)
        if _is_file_source(source)
        else _import_module(source, reference, where)
    )

    function = module
    for part in attribute.split("."):
        if not hasattr(function, part):
            names = [n for n in dir(function) if not n.startswith("_")]
            hint = did_you_mean(part, names, n=1)
            raise RewardSpecError(f"{where}: {source!r} has no attribute {part!r} (fn {reference!r})"
                                  f"{f'; {hint}' if hint else ''}")
        function = getattr(function, part)
    if not callable(function):
        raise RewardSpecError(f"{where}: {attribute!r} in {source!r} is not callable (fn {reference!r})")
    if inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(getattr(function, "__call__", None)):  # noqa: B004  (an object with an async __call__)
        raise RewardSpecError(f"{where}: fn {reference!r} is async; reward functions must be synchronous")
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return function
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        raise RewardSpecError(f"{where}: fn {reference!r} must accept **kwargs: it is called as "
                              "fn(completions=..., prompts=..., completion_ids=..., <dataset columns>=..., ...)")
    return function


def _is_file_source(source: str) -> bool:
    return source.endswith(".py") or "/" in source or "\\" in source


def _resolve_file(source: str, base_dir) -> Path:
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path


def resolved_reference(reference: str, base_dir) -> str:
    """The reference with a file path made absolute, so it can be re-imported from any working directory."""
    source, _, attribute = reference.rpartition(":")
    if not _is_file_source(source):
        return reference
    return f"{_resolve_file(source, base_dir).resolve()}:{attribute}"


def _import_module(module_name: str, reference: str, where: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise RewardSpecError(f"{where}: module {missing!r} not found (fn {reference!r}); is it on "
                                  "PYTHONPATH, or did you mean a file path like 'rewards.py:fn'?") from None
        raise RewardSpecError(
            f"{where}: importing module {module_name!r} failed: {error} (fn {reference!r})"
        ) from error
    except Exception as error:
        raise RewardSpecError(f"{where}: importing module {module_name!r} raised {type(error).__name__}: {error} "
                              f"(fn {reference!r})") from error


def _import_file(source: str, reference: str, where: str, base_dir):
    path = _resolve_file(source, base_dir)
    if not path.is_file():
        raise RewardSpecError(f"{where}: file {str(path)!r} not found (fn {reference!r})")
    path = path.resolve()
    # One module per file, registered in sys.modules so that pickling and dataclasses in the file work.
    module_name = f"_postrain_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise RewardSpecError(f"{where}: importing file {str(path)!r} raised {type(error).__name__}: {error} "
                              f"(fn {reference!r})") from error
    return module
