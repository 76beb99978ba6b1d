"""The data transforms (`transform:` of a source), one module per kind, each registered in TRANSFORMS
(postrain.data.transforms.registry). Importing the package registers them all."""

from postrain.data.transforms import best_of_k, implicit_reward_pairs, pairing, steps, thought_dropout  # noqa: F401
from postrain.data.transforms.registry import TRANSFORMS, check_transform, given_params, rows_per_row

__all__ = ["TRANSFORMS", "check_transform", "given_params", "rows_per_row"]
