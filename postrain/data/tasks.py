"""Built-in synthetic tasks with exact answers: the data of the demo, the tests and `--smoke`.

Every task yields rows with the columns all jobs need, so one task feeds SFT, DPO, GRPO and eval alike:
  prompt     the question text
  completion the reference answer as the model should write it (SFT target)
  answer     the exact answer (what verifiers compare against)
  chosen     = completion; rejected: a plausible wrong answer (DPO pairs)
  score_chosen, score_rejected   the verifier's scores of chosen (1.0) and rejected (0.0), for losses that read
                                 scored pairs (ODPO, MaPPO, REBEL, ...)

Splits are disjoint by construction: each problem is assigned to `test` or `train` by a hash of its text, so a
held-out score is a score on problems never trained on.

`shape` gives the rows of the other data shapes `postrain dpo` trains on (the default, `pairs`, is the above):
  lists      the above plus `completions` (the answer and `list_size` − 1 wrong ones, in an order set by a hash of
             the prompt), `scores` (a graded verifier: 1 for the right answer, 1 / (1 + |error|) for a wrong
             number, the fraction of right characters for a wrong reversal) and `ranks` (1 = best, ties share one)
  unpaired   two rows per problem: {prompt, completion, answer, label} with the right answer (label true) and
             the plausible wrong one (label false)
  turns      multi-turn conversational pairs for per-turn losses (dmpo): `prompt` [user: the question],
             `chosen` two agent turns around an observation [assistant: the question restated, user: "=?",
             assistant: the answer], `rejected` one agent turn [assistant: the wrong answer]; with `answer`,
             score_chosen, score_rejected (no string `completion`: TRL reads a row as a conversation or not)
Both are built from the same problems and draw nothing from the task's random stream, so the pairs rows of a
seed stay the same whatever the shape.

A task is a function registered in TASKS (`@TASKS.register(name)`, read as `source: builtin:<name>`): its one
parameter before `*` is the split, its keyword-only parameters are the recipe's `task:` keys, typed by their
annotations; `build_task` checks the keys and calls it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator

from postrain.errors import DataError, RecipeError, did_you_mean
from postrain.registry import Registry

# The built-in tasks by name: building blocks, not method parts (no paper is required).
TASKS = Registry("task", what="built-in task", papers=False)


def _in_split(text: str, split: str, test_fraction: float) -> bool:
    bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    is_test = bucket < test_fraction
    if split in ("test", "validation", "eval"):
        return is_test
    if split == "train":
        return not is_test
    raise DataError(f"built-in tasks have splits 'train' and 'test', not {split!r}")


def _take(candidates: Iterator[dict], n: int, split: str, test_fraction: float, limit: int) -> list[dict]:
    rows, seen = [], set()
    for tries, row in enumerate(candidates):
        if len(rows) >= n or tries >= limit:
            break
        if row["prompt"] in seen or not _in_split(row["prompt"], split, test_fraction):
            continue
        seen.add(row["prompt"])
        rows.append(row)
    return rows


def _with_label_noise(rows: list[dict], label_noise: float, seed: int) -> list[dict]:
    """Make the SFT target (`completion`) the plausible wrong answer (`rejected`) for a `label_noise` fraction of
    rows, chosen by a hash of the prompt and seed (so independent of order and split size); `answer`, `chosen`
    and `rejected` stay right. Demonstrations that are right only part of the time leave a model unsure between
    the right answer and a wrong one on every prompt: a signal RL from a verifier, or preference learning, can
    fix quickly."""
    if not 0.0 <= label_noise < 1.0:
        raise DataError(f"label_noise must be in [0, 1), got {label_noise}")
    if not label_noise:
        return rows
    for row in rows:
        digest = hashlib.sha256(f"noise-{seed}-{row['prompt']}".encode()).hexdigest()[:8]
        if int(digest, 16) / 0xFFFFFFFF < label_noise:
            row["completion"] = row["rejected"]
    return rows


@TASKS.register("arithmetic")
def arithmetic(
    split: str = "train",
    *,
    n: int = 1000,
    digits: int = 2,
    ops: str = "+",
    seed: int = 0,
    test_fraction: float = 0.1,
    label_noise: float = 0.0,
    shape: str = "pairs",
    list_size: int = 4,
) -> list[dict]:
    """`a<op>b=` with operands of exactly `digits` digits; the answer is the exact integer result.
    `label_noise`: the fraction of rows whose SFT target is a wrong answer (see `_with_label_noise`).
    `shape`, `list_size`: rows for list-wise or unpaired losses (see the module docstring)."""
    if digits < 1:
        raise DataError(f"arithmetic: digits must be >= 1, got {digits}")
    if not ops or set(ops) - set("+-*"):
        raise DataError(f"arithmetic: ops must be made of '+', '-', '*', got {ops!r}")
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    rng = random.Random(f"{seed}-{split}")

    def candidates():
        while True:
            a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(ops)
            result = {"+": a + b, "-": a - b, "*": a * b}[op]
            wrong = result + rng.choice([-10, -1, 1, 10])
            yield {
                "prompt": f"{a}{op}{b}=",
                "completion": str(result),
                "answer": str(result),
                "chosen": str(result),
                "rejected": str(wrong),
                "score_chosen": 1.0,
                "score_rejected": 0.0,
            }

    space = (hi - lo + 1) ** 2 * len(ops)
    rows = _take(candidates(), min(n, space), split, test_fraction, limit=50 * n + 1000)
    return _shaped(_with_label_noise(rows, label_noise, seed), shape, list_size, _number_candidates, "arithmetic")


@TASKS.register("reverse")
def reverse(
    split: str = "train", *, n: int = 1000, length: int = 5, alphabet: str = "abcdefgh", seed: int = 0,
    test_fraction: float = 0.1, label_noise: float = 0.0, shape: str = "pairs", list_size: int = 4,
) -> list[dict]:
    """`reverse:<word>=`: the answer is the word reversed; the plausible wrong answer is its rotation by one.
    `label_noise`: the fraction of rows whose SFT target is the wrong answer (see `_with_label_noise`).
    `shape`, `list_size`: rows for list-wise or unpaired losses (see the module docstring)."""
    rng = random.Random(f"{seed}-{split}")

    def candidates():
        while True:
            word = "".join(rng.choice(alphabet) for _ in range(length))
            target = word[::-1]
            wrong = target[1:] + target[0]
            yield {
                "prompt": f"reverse:{word}=",
                "completion": target,
                "answer": target,
                "chosen": target,
                "rejected": wrong,
                "score_chosen": 1.0,
                "score_rejected": 0.0,
            }

    rows = _with_label_noise(_take(candidates(), n, split, test_fraction, limit=50 * n + 1000), label_noise, seed)
    return _shaped(rows, shape, list_size, _reversal_candidates, "reverse")


@TASKS.register("arithmetic_code")
def arithmetic_code(split: str = "train", *, n: int = 1000, digits: int = 1, ops: str = "+", seed: int = 0,
                    test_fraction: float = 0.1) -> list[dict]:
    """Code generation for `code_exec` (postrain.rewards.code_exec): "Write a Python function solve() that returns
    a<op>b", with `tests` the MBPP-style assert statements [`assert solve() == <result>`]; the SFT target and
    `chosen` are the right function in a ```python block, `rejected` one returning the plausible wrong number.
    The same problems as `arithmetic` (same seed, split and parameters)."""
    rows = arithmetic(split=split, n=n, digits=digits, ops=ops, seed=seed, test_fraction=test_fraction)

    def program(value: str) -> str:
        return f"```python\ndef solve():\n    return {value}\n```"

    return [{"prompt": f"Write a Python function solve() that returns {r['prompt'].rstrip('=')}. Answer with a "
                       f"```python code block.",
             "completion": program(r["answer"]), "answer": r["answer"], "chosen": program(r["answer"]),
             "rejected": program(r["rejected"]), "score_chosen": 1.0, "score_rejected": 0.0,
             "tests": [f"assert solve() == {r['answer']}"]} for r in rows]


SHAPES = ("pairs", "lists", "unpaired", "turns")


def _shaped(rows: list[dict], shape: str, list_size: int, candidates: Callable[[dict], list[tuple[str, float]]],
            task: str) -> list[dict]:
    """Rows of `shape` from pairs rows; `candidates(row)` gives the row's (completion, score) list, the right
    answer first, each completion once."""
    if shape not in SHAPES:
        raise DataError(f"{task}: shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    if shape == "turns":
        return [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["prompt"].rstrip("=")},
                            {"role": "user", "content": "=?"}, {"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}],
                 "answer": r["answer"], "score_chosen": r["score_chosen"], "score_rejected": r["score_rejected"]}
                for r in rows]
    if shape == "unpaired":
        return [{"prompt": r["prompt"], "completion": r[side], "answer": r["answer"], "label": side == "chosen"}
                for r in rows for side in ("chosen", "rejected")]
    if shape == "lists":
        if list_size < 2:
            raise DataError(f"{task}: list_size must be >= 2 (a list ranks at least two completions), got {list_size}")
        for row in rows:
            scored = candidates(row)[:list_size]
            shift = int(hashlib.sha256(f"order-{row['prompt']}".encode()).hexdigest()[:8], 16) % len(scored)
            scored = scored[shift:] + scored[:shift]
            row["completions"] = [c for c, _ in scored]
            row["scores"] = [score for _, score in scored]
            row["ranks"] = [1 + sum(other > score for other in row["scores"]) for score in row["scores"]]
    return rows


def _number_candidates(row: dict) -> list[tuple[str, float]]:
    """The answer and wrong numbers at distinct distances (so every score differs), scored 1 / (1 + |error|)."""
    right = int(row["answer"])
    return [(str(right + d), 1.0 / (1 + abs(d))) for d in (0, 1, -10, 2, 20, -3, 30, -4)]


def _reversal_candidates(row: dict) -> list[tuple[str, float]]:
    """The reversal, its rotations and the unreversed word, scored by the fraction of characters in place."""
    target, word = row["answer"], row["prompt"].removeprefix("reverse:").removesuffix("=")
    seen, out = set(), []
    for text in [target[i:] + target[:i] for i in range(len(target))] + [word]:
        if text not in seen:
            seen.add(text)
            out.append((text, sum(a == b for a, b in zip(text, target)) / len(target)))
    return out


def build_task(name: str, split: str, params: dict) -> list[dict]:
    """The rows of built-in task `name` for `split`, with `params` (a source's `task:`) as its keyword arguments:
    an unknown task, an unknown key or a value of the wrong type (`n: ten`) is a DataError naming it."""
    where = f"source 'builtin:{name}'"
    try:
        variant = TASKS.get(name, where)
        valid = list(variant.params)
        unknown = [key for key in params if key not in valid]
        if unknown:
            hint = did_you_mean(unknown[0], valid, n=1)
            raise DataError(f"built-in task {name!r} ({where}) has no parameter {unknown[0]!r} under task:; "
                            f"{hint + ' ' if hint else ''}valid: {', '.join(valid)}")
        TASKS.check_params(name, params, f"{where}, task:")
    except RecipeError as error:  # the registry's: an unknown task, a value of the wrong type
        raise DataError(str(error)) from None
    return TASKS.call(name, {"split": split}, params)
