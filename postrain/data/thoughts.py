"""Thought dropout (TON, "Think or Not? Selective Reasoning via Reinforcement Learning for Vision-Language Models",
arXiv 2505.16854): SFT targets `<think>T</think>` + answer whose thought T is replaced, with probability p, by an
empty thought, so the model learns both formats before GRPO lets it choose when to think.

The authors' data script (kokolerk/TON, src/eval/aitz_evaluate/sft_grpo_data.py, `two_mode`) draws one
`random.random()` per sample and keeps the thought when it is below 0.5, else writes `<think>\\n\\n</think>`; the
README ships the SFT sets "by the random thought dropout ratio 0.5". Here the thought is dropped when the draw is
below `p` (the same distribution at 0.5), the draws come from `random.Random(seed)`, one per row in the data's
order, and the empty thought is the authors' two newlines between the tags.

`builtin:arithmetic_thoughts` is the built-in arithmetic task with such targets (`<think>15+56=71</think>`
`<answer>71</answer>`): the rows `--smoke` gives a recipe with `transform: thought_dropout`.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from postrain.data.tasks import TASKS, arithmetic
from postrain.errors import DataError, RecipeError
from postrain.recipes.schema import ThoughtDropoutSpec


def thought_dropout_settings(settings: dict | ThoughtDropoutSpec | None) -> dict:
    """A source's `thought_dropout:` with ThoughtDropoutSpec's defaults filled in."""
    given = dataclasses.asdict(settings) if isinstance(settings, ThoughtDropoutSpec) else dict(settings or {})
    return {**dataclasses.asdict(ThoughtDropoutSpec()), **given}


def check_thought_dropout(spec: dict, where: str) -> None:
    """Load-time checks of a source's `thought_dropout:`: set only with the transform, with usable values."""
    given, transform = spec.get("thought_dropout"), spec.get("transform")
    if given is not None and transform != "thought_dropout":
        raise RecipeError(f"{where}.thought_dropout: set only with transform: thought_dropout (transform is "
                          f"{transform!r}); remove it or set the transform")
    if transform != "thought_dropout":
        return
    settings = thought_dropout_settings(given)
    p = settings["p"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise RecipeError(f"{where}.thought_dropout.p: the probability of emptying a row's thought, a number in "
                          f"[0, 1] (TON: 0.5), got {p!r}")
    for key in ("open_tag", "close_tag", "column"):
        if not isinstance(settings[key], str) or not settings[key]:
            raise RecipeError(f"{where}.thought_dropout.{key}: must be a non-empty string, got {settings[key]!r}")
    if not isinstance(settings["empty_thought"], str):
        raise RecipeError(f"{where}.thought_dropout.empty_thought: must be a string (TON: two newlines), got "
                          f"{settings['empty_thought']!r}")


def _text_of(value: Any) -> tuple[str, int | None]:
    """The text whose thought is dropped: a plain completion, or the last assistant turn of a conversation (and
    that turn's index)."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, list):
        turns = [i for i, turn in enumerate(value) if isinstance(turn, dict) and turn.get("role") == "assistant"]
        if turns and isinstance(value[turns[-1]].get("content"), str):
            return value[turns[-1]]["content"], turns[-1]
    raise DataError(f"a completion must be a string or a conversation ending in an assistant turn, got {value!r:.80}")


def empty_thought(text: str, open_tag: str, close_tag: str, empty: str) -> str | None:
    """`text` with what lies between its first `open_tag` and the next `close_tag` replaced by `empty`; None when
    the text has no such pair of tags."""
    start = text.find(open_tag)
    if start < 0:
        return None
    body = start + len(open_tag)
    end = text.find(close_tag, body)
    if end < 0:
        return None
    return text[:body] + empty + text[end:]


def drop_thoughts(rows: list[dict], settings: dict | ThoughtDropoutSpec | None, where: str) -> list[dict]:
    """Rows whose `column` thought is emptied with probability `p` (one seeded draw per row, in order), each with
    `thought_dropped` (bool). A row whose completion has no `open_tag ... close_tag` is an error naming it: a
    target without a thought cannot teach the think-or-not format."""
    s = thought_dropout_settings(settings)
    column = s["column"]
    if rows and column not in rows[0]:
        raise DataError(f"{where}: transform 'thought_dropout' needs column {column!r} (the SFT target with "
                        f"{s['open_tag']}...{s['close_tag']}); present: {', '.join(rows[0])}")
    rng = random.Random(s["seed"])
    out = []
    for n, row in enumerate(rows):
        text, turn = _text_of(row[column])
        emptied = empty_thought(text, s["open_tag"], s["close_tag"], s["empty_thought"])
        if emptied is None:
            raise DataError(f"{where}, row {n}: transform 'thought_dropout' needs a thought between "
                            f"{s['open_tag']!r} and {s['close_tag']!r} in column {column!r}, got {text!r:.120}")
        dropped = rng.random() < s["p"]
        value = row[column]
        if dropped:
            if turn is None:
                value = emptied
            else:
                value = [dict(t) for t in value]
                value[turn]["content"] = emptied
        out.append({**row, column: value, "thought_dropped": dropped})
    return out


@TASKS.register("arithmetic_thoughts")
def arithmetic_thoughts(split: str = "train", *, n: int = 1000, digits: int = 2, ops: str = "+", seed: int = 0,
                        test_fraction: float = 0.1) -> list[dict]:
    """The arithmetic task with SFT targets in TON's think / answer format: `<think>a+b=c</think><answer>c</answer>`
    (`answer` stays the bare number, so verifiers read it as before; chosen / rejected likewise)."""
    rows = arithmetic(split=split, n=n, digits=digits, ops=ops, seed=seed, test_fraction=test_fraction)
    for row in rows:
        row["completion"] = f"<think>{row['prompt']}{row['answer']}</think><answer>{row['answer']}</answer>"
    return rows
