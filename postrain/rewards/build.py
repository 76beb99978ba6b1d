"""Turn a recipe's reward entries into reward callables and weights, wrapped by the error policy."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from postrain.errors import did_you_mean
from postrain.rewards.registry import REWARDS, RewardError, RewardFunction, RewardSpecError
from postrain.rewards import judge  # noqa: F401,E402  (registers llm_judge, the model-backed reward)

logger = logging.getLogger(__name__)

SPEC_KEYS = ("name", "fn", "weight", "args", "alias")
ON_ERROR_POLICIES = ("fail", "score")


class GuardedReward(RewardFunction):
    """A reward wrapped by the error policy, under its logging name.

    The wrapped callable is called on the whole batch. If it raises (or returns the wrong number of scores):

    - ``on_error="fail"``: a RewardError (a RuntimeError) naming the reward, the original error and where it
      was raised;
    - ``on_error="score"``: it is called again one completion at a time (every list argument aligned with the
      completions sliced to that completion), and only the completions that raise are scored ``error_score``.

    ``calls`` counts batches, ``errors`` the completions scored as failed; ``pop_error_count()`` returns the errors
    since its last call (logged by the trainer as ``rewards/<name>/errors``). A ``parse`` method of the wrapped
    reward (and an ``equivalent`` method, answer equivalence for eval's majority vote) is exposed unchanged.
    Scores of None (TRL: "no reward for this sample") are passed through.

    It pickles (TRL's async rollout worker sends rewards to a spawned process): a user function, given by its
    ``reference`` ("module:function" or an absolute "file.py:function"), is re-imported when unpickled. Counters
    kept in another process are not seen by this one.
    """

    def __init__(
        self,
        reward: Callable,
        name: str,
        *,
        on_error: str = "fail",
        error_score: float = 0.0,
        reference: str | None = None,
    ):
        super().__init__(name)
        self.reward = reward
        self.reference = reference
        self.on_error = on_error
        self.error_score = float(error_score)
        self.calls = 0
        self.errors = 0
        self._errors_since_pop = 0
        self._warned = False  # warn on the first failing batch, then log at debug level
        self.columns = tuple(getattr(reward, "columns", ()))
        self._expose_parse()

    EXPOSED_METHODS = ("parse", "equivalent")

    def _expose_parse(self) -> None:
        for method in self.EXPOSED_METHODS:
            if hasattr(self.reward, method):
                setattr(self, method, getattr(self.reward, method))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for method in self.EXPOSED_METHODS:
            state.pop(method, None)
        if self.reference is not None:
            state["reward"] = None  # re-imported by __setstate__
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.reward is None:
            self.reward = load_function(self.reference, where=f"reward {self.name!r}")
        self._expose_parse()

    def pop_error_count(self) -> int:
        count, self._errors_since_pop = self._errors_since_pop, 0
        return count

    def __call__(self, completions: list, **columns: Any) -> list[float | None]:
        self.calls += 1
        try:
            return self._score(completions, columns)
        except Exception as error:
            if self.on_error == "fail":
                frames = traceback.extract_tb(error.__traceback__)
                where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
                raise RewardError(
                    f"reward {self.name!r} raised {type(error).__name__}: {error}{where}. The run stops under "
                    f"reward_errors.policy: fail; set policy: score to score such completions as failed and count them"
                ) from error
            return self._score_one_at_a_time(completions, columns, batch_error=error)

    def _score(self, completions: list, columns: dict[str, Any]) -> list[float | None]:
        scores = self.reward(completions, **columns)
        if scores is None or len(scores) != len(completions):
            count = "None" if scores is None else len(scores)
            raise ValueError(f"returned {count} scores for {len(completions)} completions")
        return [None if score is None else float(score) for score in scores]

    def _score_one_at_a_time(self, completions: list, columns: dict[str, Any], batch_error: Exception) -> list:
        count = len(completions)
        scores, failures = [], []
        for index in range(count):
            row_columns = {
                key: value[index : index + 1] if isinstance(value, (list, tuple)) and len(value) == count else value
                for key, value in columns.items()
            }
            try:
                scores.extend(self._score(completions[index : index + 1], row_columns))
            except Exception as error:
                failures.append(error)
                scores.append(self.error_score)
        self.errors += len(failures)
        self._errors_since_pop += len(failures)
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        if failures:
            first = failures[0]
            logger.log(
                level,
                "reward %r raised on %d of %d completions, scored %s (first error: %s: %s)",
                self.name, len(failures), count, self.error_score, type(first).__name__, first,
            )
        else:
            logger.log(
                level,
                "reward %r raised on the batch (%s: %s) but on no single completion",
                self.name, type(batch_error).__name__, batch_error,
            )
        return scores


def build_rewards(
    specs: list[dict],
    *,
    on_error: str = "fail",
    error_score: float = 0.0,
    base_dir: str | Path | None = None,
) -> tuple[list[RewardFunction], list[float]]:
    """Build the reward callables and their weights from a recipe's ``rewards`` entries.

    Each entry is a dict (or a RewardSpec dataclass) with either ``name`` (a built-in, a key of REWARDS) or
    ``fn`` (``"package.module:function"`` or ``"path/to/file.py:function"``; relative paths resolve against
    ``base_dir``, default the working directory), plus optional ``weight`` (default 1.0), ``args`` (keyword
    params of a built-in) and ``alias`` (the logging name; default the built-in's or the function's name).
    Keys whose value is None count as absent. The callables come back wrapped by :class:`GuardedReward` with
    the given error policy. Raises RewardSpecError naming the bad entry (``rewards[i]``).
    """
    if on_error not in ON_ERROR_POLICIES:
        raise RewardSpecError(f"unknown reward error policy {on_error!r}; use one of {', '.join(ON_ERROR_POLICIES)}")
    rewards, weights = [], []
    for index, spec in enumerate(specs):
        where = f"rewards[{index}]"
        if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
            spec = dataclasses.asdict(spec)
        reward, default_name, reference = _build_one(spec, where, base_dir)
        name = spec.get("alias") or default_name
        if not isinstance(name, str):
            raise RewardSpecError(f"{where}: alias must be a string, got {name!r}")
        taken = [built.name for built in rewards]
        if name in taken:
            raise RewardSpecError(
                f"{where}: the logging name {name!r} is already used by rewards[{taken.index(name)}]; "
                "give one of them an alias"
            )
        rewards.append(GuardedReward(reward, name, on_error=on_error, error_score=error_score, reference=reference))
        weights.append(_weight(spec, where))
    return rewards, weights


def _build_one(spec: Any, where: str, base_dir) -> tuple[Callable, str, str | None]:
    """The reward callable of one entry, its default logging name, and (for a user fn) its resolved reference."""
    if not isinstance(spec, dict):
        raise RewardSpecError(f"{where}: a reward entry must be a mapping with 'name' or 'fn', got {spec!r}")
    unknown = [key for key in spec if key not in SPEC_KEYS]
    if unknown:
        raise RewardSpecError(f"{where}: unknown key {unknown[0]!r}"
                              f"{_suggest(unknown[0], SPEC_KEYS, 'allowed keys')}")
    name, fn, args = spec.get("name"), spec.get("fn"), spec.get("args") or {}
    if (name is None) == (fn is None):
        both_or_neither = "both" if name is not None else "neither"
        raise RewardSpecError(f"{where}: give exactly one of 'name' (a built-in) or 'fn' (your function), "
                              f"got {both_or_neither}")
    if not isinstance(args, dict):
        raise RewardSpecError(f"{where}: args must be a mapping of keyword params, got {args!r}")
    if fn is not None:
        if args:
            raise RewardSpecError(f"{where}: args are for built-in rewards only; fn {fn!r} gets the dataset "
                                  "columns as keyword arguments (bind other parameters inside your function)")
        function = load_function(fn, where, base_dir)
        return function, getattr(function, "__name__", fn.rpartition(":")[2]), _resolved_reference(fn, base_dir)
    return _build_builtin(name, args, where), name, None


def _build_builtin(name: Any, args: dict, where: str) -> RewardFunction:
    if not isinstance(name, str) or name not in REWARDS:
        raise RewardSpecError(f"unknown reward {name!r} ({where}){_suggest(name, sorted(REWARDS), 'available')}")
    factory = REWARDS[name]
    parameters = inspect.signature(factory).parameters
    for arg in args:
        if arg not in parameters:
            raise RewardSpecError(f"unknown arg {arg!r} for reward {name!r} ({where})"
                                  f"{_suggest(arg, list(parameters), 'valid args')}")
    missing = [p.name for p in parameters.values() if p.default is inspect.Parameter.empty and p.name not in args]
    if missing:
        raise RewardSpecError(f"reward {name!r} ({where}) needs arg {missing[0]!r}; "
                              f"valid args: {', '.join(parameters)}")
    try:
        return factory(**args)
    except (ValueError, TypeError) as error:
        raise RewardSpecError(f"bad args for reward {name!r} ({where}): {error}") from error


def _weight(spec: dict, where: str) -> float:
    weight = spec.get("weight")
    if weight is None:
        return 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise RewardSpecError(f"{where}: weight must be a number, got {weight!r}")
    return float(weight)


def _suggest(word: Any, choices: list[str], label: str | None = None) -> str:
    """"; did you mean 'x'?" for the closest choice (if any), then "<label>: a, b, c" when a label is given."""
    hint = did_you_mean(word, choices, n=1)
    hint = f"; {hint}" if hint else ""
    if label is None:
        return hint
    return f"{hint}{' ' if hint else '; '}{label}: {', '.join(choices) or 'none'}"


# -- user functions -----------------------------------------------------------------------------------------------


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
            raise RewardSpecError(f"{where}: {source!r} has no attribute {part!r} (fn {reference!r})"
                                  f"{_suggest(part, names)}")
        function = getattr(function, part)
    if not callable(function):
        raise RewardSpecError(f"{where}: {attribute!r} in {source!r} is not callable (fn {reference!r})")
    if inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(getattr(function, "__call__", None)):
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


def _resolved_reference(reference: str, base_dir) -> str:
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
