"""`builtin:arithmetic_thoughts`: the built-in arithmetic task with SFT targets in TON's think / answer format
(`<think>15+56=71</think>` `<answer>71</answer>`): the rows `--smoke` gives a recipe with `transform:
thought_dropout` (postrain.data.transforms.thought_dropout, TON arXiv 2505.16854).
"""

from __future__ import annotations

from postrain.data.tasks import TASKS, arithmetic


@TASKS.register("arithmetic_thoughts")
def arithmetic_thoughts(split: str = "train", *, n: int = 1000, digits: int = 2, ops: str = "+", seed: int = 0,
                        test_fraction: float = 0.1) -> list[dict]:
    """The arithmetic task with SFT targets in TON's think / answer format: `<think>a+b=c</think><answer>c</answer>`
    (`answer` stays the bare number, so verifiers read it as before; chosen / rejected likewise)."""
    rows = arithmetic(split=split, n=n, digits=digits, ops=ops, seed=seed, test_fraction=test_fraction)
    for row in rows:
        row["completion"] = f"<think>{row['prompt']}{row['answer']}</think><answer>{row['answer']}</answer>"
    return rows
