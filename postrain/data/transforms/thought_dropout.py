"""Thought dropout (TON, "Think or Not? Selective Reasoning via Reinforcement Learning for Vision-Language Models",
arXiv 2505.16854): SFT targets `<think>T</think>` + answer whose thought T is replaced, with probability p, by an
empty thought, so the model learns both formats before GRPO lets it choose when to think.

The authors' data script (kokolerk/TON, src/eval/aitz_evaluate/sft_grpo_data.py, `two_mode`) draws one
`random.random()` per sample and keeps the thought when it is below 0.5, else writes `<think>\\n\\n</think>`; the
README ships the SFT sets "by the random thought dropout ratio 0.5". Here the thought is dropped when the draw is
below `p` (the same distribution at 0.5), the draws come from `random.Random(seed)`, one per row in the data's
order, and the empty thought is the authors' two newlines between the tags. Settings under the source's
`thought_dropout:`; `builtin:arithmetic_thoughts` (postrain.data.thoughts) gives such targets.
"""

from __future__ import annotations

import random
from typing import Any

from postrain.data.transforms.registry import TRANSFORMS
from postrain.errors import DataError, RecipeError


def _check(params: dict, spec: dict, where: str) -> None:
    for key in ("open_tag", "close_tag", "column"):
        if not params[key]:
            raise RecipeError(f"{where}.thought_dropout.{key}: must be a non-empty string, got {params[key]!r}")


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


def replace_thought(text: str, open_tag: str, close_tag: str, empty: str) -> str | None:
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


@TRANSFORMS.register("thought_dropout", section="thought_dropout", rows_per_row=1, columns=("thought_dropout.column",),
                     ranges={"p": "in [0, 1]"}, check=_check, paper="Think or Not? Selective Reasoning via Reinforcement Learning for "
                                         "Vision-Language Models", arxiv="2505.16854")
def drop_thoughts(rows: list[dict], where: str, *, p: float = 0.5, seed: int = 0, open_tag: str = "<think>",
                  close_tag: str = "</think>", empty_thought: str = "\n\n", column: str = "completion") -> list[dict]:
    """Rows whose `column` thought, the text between `open_tag` and `close_tag`, is replaced by `empty_thought` with
    probability `p` (one draw of random.Random(seed) per row, in order), each with `thought_dropped` (bool).
    Defaults are the authors' (kokolerk/TON sft_grpo_data.py: p 0.5, `<think>\\n\\n</think>`). A row whose
    completion has no `open_tag ... close_tag` is an error naming it: a target without a thought cannot teach the
    think-or-not format."""
    if rows and column not in rows[0]:
        raise DataError(f"{where}: transform 'thought_dropout' needs column {column!r} (the SFT target with "
                        f"{open_tag}...{close_tag}); present: {', '.join(rows[0])}")
    rng = random.Random(seed)
    out = []
    for n, row in enumerate(rows):
        text, turn = _text_of(row[column])
        emptied = replace_thought(text, open_tag, close_tag, empty_thought)
        if emptied is None:
            raise DataError(f"{where}, row {n}: transform 'thought_dropout' needs a thought between "
                            f"{open_tag!r} and {close_tag!r} in column {column!r}, got {text!r:.120}")
        dropped = rng.random() < p
        value = row[column]
        if dropped:
            if turn is None:
                value = emptied
            else:
                value = [dict(t) for t in value]
                value[turn]["content"] = emptied
        out.append({**row, column: value, "thought_dropped": dropped})
    return out
