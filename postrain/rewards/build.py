"""Turn a recipe's reward entries into reward callables and weights, wrapped by the error policy."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import pickle
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from postrain.errors import RecipeError, did_you_mean
from postrain.rewards.registry import REWARDS, RewardError, RewardFunction, RewardSpecError, completion_text
from postrain.rewards.references import load_function, resolved_reference
from postrain.rewards.worker import RewardCallError, RewardTimeout, RewardWorker, WorkerDied
from postrain.rewards import judge  # noqa: F401,E402  (registers llm_judge, the model-backed reward)
from postrain.rewards import code_exec  # noqa: F401,E402  (registers code_exec, the sandboxed code reward)

logger = logging.getLogger(__name__)

SPEC_KEYS = ("name", "fn", "weight", "args", "alias")
ON_ERROR_POLICIES = ("fail", "score")


# Wall-clock limits, as verl and open-r1 set them (TRL 1.16 has none): verl's reward loop gives a batch call 300 s
# (verl/experimental/reward_loop/reward_manager/limited.py), open-r1's code sandboxes give one completion 30 s and
# score it 0 when it runs out (src/open_r1/utils/code_providers.py).
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_COMPLETION_TIMEOUT_S = 30.0
# The counts every guarded reward logs as rewards/<name>/<count>: completions scored as failed (any cause), of those
# the ones whose call ran out of time, and scores that were NaN or infinite.
GUARD_COUNTS = ("errors", "timeouts", "non_finite")


class GuardedReward(RewardFunction):
    """A reward wrapped by the error policy, under its logging name, run with a wall-clock limit.

    The wrapped callable is called on the whole batch, in its worker process (postrain.rewards.worker) with a
    limit of ``timeout`` seconds; a reward whose ``runs_in_worker`` is False (llm_judge, which holds a model)
    runs in this process, where it cannot be stopped. A completion fails when the call raises, runs out of time,
    returns the wrong number of scores, or scores it NaN or infinite (TRL reads NaN as "no reward" and drops it
    from the sum, and one infinite reward makes every advantage NaN); None (TRL: no reward for this sample) is
    passed through. Then:

    - ``on_error="fail"``: a RewardError naming the reward, the completion (its index in the batch and its prompt)
      and the cause; the run stops.
    - ``on_error="score"``: a NaN or infinite score is replaced by ``error_score``. When the whole call failed, the
      completions are scored again one at a time (every list argument aligned with the completions sliced to that
      completion), each with a limit of ``completion_timeout`` s and all of them together within one more
      ``timeout``: completions not reached by then are scored ``error_score`` uncalled, so a slow failing function
      costs at most twice ``timeout``, not once per completion. Failed completions are scored ``error_score``.

    ``pop_counts()`` returns, since its last call, ``errors`` (completions scored as failed), ``timeouts``,
    ``non_finite`` and the counts the wrapped reward reports (its ``count_names``, e.g. code_exec's outcomes);
    the GRPO trainer logs them as ``rewards/<name>/<count>``. ``pop_error_count()`` pops ``errors`` alone.
    ``calls`` counts batches, ``errors`` failed completions over the run. A ``parse`` method of the wrapped reward
    (and ``equivalent``, answer equivalence for eval's majority vote, and ``check_values``, its check of the data
    when it loads) is exposed unchanged, in this process.

    It pickles (TRL's async rollout worker sends rewards to a spawned process): a user function, given by its
    ``reference`` ("module:function" or an absolute "file.py:function"), is re-imported when unpickled; the worker
    process is not carried over (a copy starts its own). Counters kept in another process are not seen by this one.
    """

    def __init__(
        self,
        reward: Callable,
        name: str,
        *,
        on_error: str = "fail",
        error_score: float = 0.0,
        reference: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        completion_timeout: float | None = DEFAULT_COMPLETION_TIMEOUT_S,
    ):
        super().__init__(name)
        self.reward = reward
        self.reference = reference
        self.on_error = on_error
        self.error_score = float(error_score)
        self.timeout = timeout
        self.completion_timeout = completion_timeout
        self.calls = 0
        self.errors = 0
        self.count_names = GUARD_COUNTS + tuple(getattr(reward, "count_names", ()))
        self._pending = dict.fromkeys(self.count_names, 0)
        self._warned = False  # warn on the first failing batch, then log at debug level
        self._worker = None
        self.columns = tuple(getattr(reward, "columns", ()))
        self._expose_parse()

    EXPOSED_METHODS = ("parse", "equivalent", "check_values")

    def _expose_parse(self) -> None:
        for method in self.EXPOSED_METHODS:
            if hasattr(self.reward, method):
                setattr(self, method, getattr(self.reward, method))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for method in self.EXPOSED_METHODS:
            state.pop(method, None)
        state["_worker"] = None
        if self.reference is not None:
            state["reward"] = None  # re-imported by __setstate__
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.reward is None:
            self.reward = load_function(self.reference, where=f"reward {self.name!r}")
        self._expose_parse()

    @property
    def runs_in_worker(self) -> bool:
        return getattr(self.reward, "runs_in_worker", True)

    def pop_counts(self) -> dict[str, int]:
        counts, self._pending = self._pending, dict.fromkeys(self.count_names, 0)
        return counts

    def pop_error_count(self) -> int:
        count, self._pending["errors"] = self._pending["errors"], 0
        return count

    def start(self) -> None:
        """Start the reward's worker process now, without waiting for it (RewardWorker.start): a training job calls
        this before it loads the model, so the worker's start overlaps that instead of delaying the first step."""
        if self.runs_in_worker:
            self._worker_for_reward().start()

    def close(self) -> None:
        """Stop the worker process (a later call starts a new one)."""
        if self._worker is not None:
            self._worker.close()

    # -- calling ----------------------------------------------------------------------------------------------

    def _call(self, completions: list, columns: dict[str, Any], timeout: float | None) -> list:
        """The wrapped reward's scores for these completions, from its worker (or this process); raises what
        the reward raised (RewardCallError from a worker), RewardTimeout, WorkerDied, or ValueError for a wrong
        number of scores."""
        if self.runs_in_worker:
            scores, counts = self._worker_for_reward().call(completions, columns, timeout)
        else:
            scores = self.reward(completions, **columns)
            pop = getattr(self.reward, "pop_counts", None)
            counts = pop() if callable(pop) else {}
        for key, value in (counts or {}).items():
            if key in self._pending:
                self._pending[key] += value
        if scores is None or len(scores) != len(completions):
            count = "None" if scores is None else len(scores)
            raise ValueError(f"returned {count} scores for {len(completions)} completions")
        return [None if score is None else _as_float(score) for score in scores]

    def _worker_for_reward(self):
        if self._worker is None:
            if self.reference is not None:
                payload = ("reference", self.reference)
            else:
                try:
                    payload = ("object", pickle.dumps(self.reward))
                except Exception as e:
                    raise RewardSpecError(f"reward {self.name!r} cannot be sent to its worker process ({e}): give "
                                          f"it as fn: module:function or path/file.py:function") from None
            self._worker = RewardWorker(payload)
        return self._worker

    def __call__(self, completions: list, **columns: Any) -> list[float | None]:
        self.calls += 1
        try:
            scores = self._call(completions, columns, self.timeout)
        except Exception as error:
            if self.on_error == "fail":
                raise RewardError(f"reward {self.name!r} {_describe(error, self.timeout, len(completions))}. The "
                                  f"run stops under reward_errors.policy: fail; set policy: score to score such "
                                  f"completions as failed and count them") from error
            if isinstance(error, RewardTimeout):
                self._pending["timeouts"] += 1  # the batch call itself; its completions are counted below
            return self._score_one_at_a_time(completions, columns, batch_error=error)
        return self._finite(scores, completions, columns)

    def _finite(self, scores: list, completions: list, columns: dict[str, Any]) -> list:
        """NaN and infinite scores are failures: the run stops (fail) or they score error_score (score)."""
        bad = [i for i, score in enumerate(scores) if score is not None and not math.isfinite(score)]
        if not bad:
            return scores
        if self.on_error == "fail":
            index = bad[0]
            raise RewardError(
                f"reward {self.name!r} scored completion {index} of {len(completions)}{_prompt_of(columns, index)} "
                f"{scores[index]}: a reward must be a finite number (or None: no reward). The run stops under "
                f"reward_errors.policy: fail; set policy: score to score such completions as failed and count them")
        for index in bad:
            scores[index] = self.error_score
        self._count_failures(len(bad), non_finite=len(bad))
        self._log("reward %r scored %d of %d completions NaN or infinite, scored %s instead", self.name, len(bad),
                  len(completions), self.error_score)
        return scores

    def _score_one_at_a_time(self, completions: list, columns: dict[str, Any], batch_error: Exception) -> list:
        count = len(completions)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        scores, failures, timeouts, non_finite, unreached = [], [], 0, 0, 0
        for index in range(count):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                unreached += 1
                scores.append(self.error_score)
                continue
            limits = [t for t in (self.completion_timeout, left) if t is not None]
            limit = min(limits) if limits else None
            row_columns = {
                key: value[index : index + 1] if isinstance(value, (list, tuple)) and len(value) == count else value
                for key, value in columns.items()
            }
            try:
                (score,) = self._call(completions[index : index + 1], row_columns, limit)
            except Exception as error:
                failures.append(error)
                timeouts += isinstance(error, RewardTimeout)
                scores.append(self.error_score)
                continue
            if score is not None and not math.isfinite(score):
                non_finite += 1
                score = self.error_score
            scores.append(score)
        failed = len(failures) + non_finite + unreached
        self._count_failures(failed, timeouts=timeouts + unreached, non_finite=non_finite)
        if failures or unreached or non_finite:
            first = failures[0] if failures else None
            self._log(
                "reward %r failed on the batch (%s), then on %d of %d completions scored one at a time (%d timed "
                "out, %d not reached within reward_errors.timeout, %d NaN or infinite), scored %s%s",
                self.name, _describe(batch_error, self.timeout, count), failed, count, timeouts, unreached,
                non_finite, self.error_score,
                f" (first error: {_describe(first, self.completion_timeout, 1)})" if first is not None else "")
        else:
            self._log("reward %r failed on the batch (%s) but on no single completion", self.name,
                      _describe(batch_error, self.timeout, count))
        return scores

    def _count_failures(self, failed: int, timeouts: int = 0, non_finite: int = 0) -> None:
        self.errors += failed
        self._pending["errors"] += failed
        self._pending["timeouts"] += timeouts
        self._pending["non_finite"] += non_finite

    def _log(self, message: str, *args: Any) -> None:
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        logger.log(level, message, *args)


def _as_float(score: Any) -> float:
    try:
        return float(score)
    except (TypeError, ValueError):
        raise ValueError(f"returned {type(score).__name__} {score!r:.60} where a score (a number or None) was "
                         f"expected") from None


def _prompt_of(columns: dict[str, Any], index: int) -> str:
    prompts = columns.get("prompts")
    if isinstance(prompts, (list, tuple)) and index < len(prompts):
        text = " ".join(completion_text(prompts[index]).split())
        return f" (prompt {text[:80]!r}{'...' if len(text) > 80 else ''})"
    return ""


def _describe(error: Exception, timeout: float | None, count: int) -> str:
    """What went wrong in a reward call, for a message: 'raised ZeroDivisionError: ... at f.py:3'."""
    if isinstance(error, RewardTimeout):
        return (f"timed out: no scores for {count} completion{'s' if count != 1 else ''} within {timeout:g} s "
                f"(reward_errors.{'timeout' if count != 1 else 'completion_timeout'})")
    if isinstance(error, WorkerDied):
        return f"crashed: {error}"
    if isinstance(error, RewardCallError):
        return f"raised {error.kind}: {error}{f' at {error.where}' if error.where else ''}"
    frames = traceback.extract_tb(error.__traceback__)
    frames = [f for f in frames if not f.filename.endswith(("rewards/build.py", "rewards/worker.py"))]
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"raised {type(error).__name__}: {error}{where}"


def policy_options(policy: dict | None) -> dict[str, Any]:
    """build_rewards' keyword arguments from a recipe's `reward_errors:` mapping (schema.RewardErrorPolicy);
    keys left out take the policy's defaults (`fail`, score 0, the default limits)."""
    policy = policy or {}
    return {"on_error": policy.get("policy", "fail"), "error_score": policy.get("score", 0.0),
            "timeout": policy.get("timeout", DEFAULT_TIMEOUT_S),
            "completion_timeout": policy.get("completion_timeout", DEFAULT_COMPLETION_TIMEOUT_S)}


def build_rewards(
    specs: list[dict],
    *,
    on_error: str = "fail",
    error_score: float = 0.0,
    base_dir: str | Path | None = None,
    timeout: float | None = DEFAULT_TIMEOUT_S,
    completion_timeout: float | None = DEFAULT_COMPLETION_TIMEOUT_S,
) -> tuple[list[RewardFunction], list[float]]:
    """Build the reward callables and their weights from a recipe's ``rewards`` entries.

    Each entry is a dict (or a RewardSpec dataclass) with either ``name`` (a built-in, an entry of REWARDS) or
    ``fn`` (``"package.module:function"`` or ``"path/to/file.py:function"``; relative paths resolve against
    ``base_dir``, default the working directory), plus optional ``weight`` (default 1.0), ``args`` (keyword
    params of a built-in) and ``alias`` (the logging name; default the built-in's or the function's name).
    Keys whose value is None count as absent. The callables come back wrapped by :class:`GuardedReward` with
    the given error policy and wall-clock limits (seconds; None: none). Raises RewardSpecError naming the bad
    entry (``rewards[i]``).
    """
    if on_error not in ON_ERROR_POLICIES:
        raise RewardSpecError(f"unknown reward error policy {on_error!r}; use one of {', '.join(ON_ERROR_POLICIES)}")
    for key, limit in (("timeout", timeout), ("completion_timeout", completion_timeout)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0):
            raise RewardSpecError(f"reward_errors.{key} must be a number of seconds > 0 (or null: no limit), "
                                  f"got {limit!r}")
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
        rewards.append(GuardedReward(reward, name, on_error=on_error, error_score=error_score, reference=reference,
                                     timeout=timeout, completion_timeout=completion_timeout))
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
        return function, getattr(function, "__name__", fn.rpartition(":")[2]), resolved_reference(fn, base_dir)
    return _build_builtin(name, args, where), name, None


def _build_builtin(name: Any, args: dict, where: str) -> RewardFunction:
    """The built-in reward `name` built with `args`: the names, the required args and the args' types (from the
    keyword-only parameters of its class' __init__, REWARDS.check_params) are checked before it is built."""
    if not isinstance(name, str) or name not in REWARDS:
        raise RewardSpecError(f"unknown reward {name!r} ({where})"
                              f"{_suggest(name, sorted(REWARDS.entries), 'available')}")
    variant = REWARDS.get(name)
    parameters = list(variant.params)
    for arg in args:
        if arg not in parameters:
            raise RewardSpecError(f"unknown arg {arg!r} for reward {name!r} ({where})"
                                  f"{_suggest(arg, parameters, 'valid args')}")
    required = [p.name for p in variant.signature.parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty]
    missing = [key for key in required if key not in args]
    if missing:
        raise RewardSpecError(f"reward {name!r} ({where}) needs arg {missing[0]!r}; "
                              f"valid args: {', '.join(parameters)}")
    try:
        REWARDS.check_params(name, args, where)
    except RecipeError as error:  # an arg of the wrong type: `answer_column: 3`
        raise RewardSpecError(str(error)) from None
    try:
        return variant.fn(**args)
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
