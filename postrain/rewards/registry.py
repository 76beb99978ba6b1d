"""The reward function base class, the registry of built-in rewards (REWARDS), and the spec error.

A reward function follows TRL's calling convention: ``reward(completions, **columns) -> list[float]``, where
``completions`` is a list of strings or (conversational) a list of message lists, and ``columns`` holds the
dataset columns aligned with the completions plus whatever else TRL passes (``prompts``, ``completion_ids``,
``trainer_state``, ``log_extra``, ``log_metric``, ...), which a reward ignores unless it needs it.
"""

from __future__ import annotations

from typing import Any

from postrain.errors import DataError, PostrainError
from postrain.registry import Registry, Variant

# The built-in rewards, by recipe name: each a RewardFunction class registered with `@REWARDS.register(name)`; the
# keyword-only parameters of its __init__ are the recipe's `args`, typed by their annotations (checked by
# REWARDS.check_params when the rewards are built). Building blocks, not method parts: no paper is required, and
# one a reward follows may be cited (`paper=`, `arxiv=`, or `source=` in words).
REWARDS = Registry("reward", what="reward", papers=False)


class RewardError(PostrainError, RuntimeError):
    """A reward function raised while scoring, under the error policy `fail`."""


class RewardSpecError(PostrainError, ValueError):
    """A reward entry of a recipe is malformed: unknown name, bad args, an `fn` that cannot be imported."""


class RewardFunction:
    """Base class of the rewards: a named callable scoring a batch of completions.

    ``name`` is the logging name; ``__name__`` is kept equal to it because TRL logs ``rewards/<__name__>/mean``.
    Rewards that extract an answer from the completion also define ``parse(text) -> str | None`` (None: no answer
    could be extracted), which eval uses to count unparsable answers, and may define ``equivalent(first, second)
    -> bool`` (whether two completions give the same answer), by which eval's majority vote groups answers
    (without it, equal parsed strings vote together).
    """

    # The registry entry of a built-in reward class (set by @REWARDS.register): its name is the default logging name.
    variant: Variant | None = None
    # Whether the reward runs in its own worker process, with a wall-clock limit (postrain.rewards.worker); a
    # reward that holds a model (llm_judge) runs in the training process instead.
    runs_in_worker: bool = True
    # The dataset columns the reward reads (checked against the data when it loads, before any model does).
    columns: tuple[str, ...] = ()

    def __init__(self, name: str | None = None):
        self.rename(name or (self.variant.name if self.variant is not None else type(self).__name__))

    def rename(self, name: str) -> None:
        self.name = name
        self.__name__ = name

    def __call__(self, completions: list, **columns: Any) -> list[float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<reward {self.name!r} ({type(self).__name__})>"


def missing_column_message(reward_name: str, column: str, present: list[str]) -> str:
    return (f"reward {reward_name!r} needs the dataset column {column!r} (set answer_column in its args, or map "
            f"a column onto it with columns: {{{column}: <your column>}}); columns present: {', '.join(present) or 'none'}")


def check_reward_columns(rewards: list[RewardFunction], present: Any, where: str) -> None:
    """Fail before any model loads when a reward reads a column the dataset at `where` lacks. `present`: the
    dataset (a `datasets.Dataset`), or its column names. Given the dataset, a reward with a `check_values(dataset,
    where)` method (code_exec: each row's tests) checks the values it will read too."""

    dataset = present if hasattr(present, "column_names") else None
    names = list(dataset.column_names) if dataset is not None else list(present)
    for reward in rewards:
        for column in getattr(reward, "columns", ()):
            if column not in names:
                raise DataError(f"{where}: {missing_column_message(reward.name, column, sorted(names))}")
        check = getattr(reward, "check_values", None)
        if dataset is not None and callable(check):
            check(dataset, where)


def completion_text(completion: Any) -> str:
    """The text of one completion: the string itself, or the content of the last message of a conversation.

    Message contents given as a list of parts (``[{"type": "text", "text": ...}, ...]``) are joined.
    """
    if isinstance(completion, str):
        return completion
    if completion is None:
        return ""
    if isinstance(completion, dict):  # a single message
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        if not completion:
            return ""
        return completion_text(completion[-1])
    raise TypeError(
        f"a completion must be a string or a list of messages, got {type(completion).__name__}: {completion!r:.80}"
    )


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content if isinstance(part, dict))
    return str(content)
