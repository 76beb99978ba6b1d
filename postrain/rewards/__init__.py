"""Reward functions for GRPO-style training and eval: the built-ins, user functions, and the error policy.

    from postrain.rewards import build_rewards
    rewards, weights = build_rewards([{"name": "exact_match"}, {"fn": "my_rewards.py:brevity", "weight": 0.1}])

Built-ins live in :mod:`postrain.rewards.builtin` (and :mod:`~postrain.rewards.code_exec`,
:mod:`~postrain.rewards.judge`) and register themselves in :data:`REWARDS` (a postrain.registry.Registry) on
import. Every reward comes back wrapped by the error policy and run in a worker process with wall-clock limits
(:mod:`~postrain.rewards.build`, :mod:`~postrain.rewards.worker`).
"""

from postrain.rewards import builtin  # noqa: F401  (registers the built-in rewards)
from postrain.rewards.build import GuardedReward, build_rewards, policy_options
from postrain.rewards.references import load_function
from postrain.rewards.registry import (
    REWARDS,
    RewardError,
    RewardFunction,
    RewardSpecError,
    check_reward_columns,
    completion_text,
)

__all__ = [
    "REWARDS",
    "GuardedReward",
    "RewardError",
    "RewardFunction",
    "RewardSpecError",
    "build_rewards",
    "check_reward_columns",
    "completion_text",
    "load_function",
    "policy_options",
]
