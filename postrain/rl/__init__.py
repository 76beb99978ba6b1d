"""Online-RL parts as composable, registered axes: advantage estimators, policy losses, loss aggregation,
regularizers, reward shaping and samplers. Each entry is a pure function over tensors with paper metadata.

    from postrain.rl import compute_advantages, policy_loss, kl_penalty
    adv = compute_advantages("grpo", rewards, group_size=8)
    loss, metrics = policy_loss("ppo_clip", logps=..., old_logps=..., advantages=adv, mask=mask,
                                aggregation="seq_mean_token_mean", epsilon=0.2)
    kl = kl_penalty("k3", logps, ref_logps)

See `postrain.rl.registry` for each axis' calling convention and `postrain variants` for the lists.
"""

from postrain.rl import advantages, losses, regularizers, samplers, shaping  # noqa: F401  (register)
from postrain.rl import drift_losses, history_shaping, pairwise_losses  # noqa: F401  (register)
from postrain.rl import token_weight_losses  # noqa: F401  (register)
from postrain.rl import methods  # noqa: F401  (registers the named methods)
from postrain.rl.advantages import compute_advantages
from postrain.rl.losses import policy_loss
from postrain.rl.registry import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, REGULARIZERS, SAMPLERS, SHAPING
from postrain.rl.regularizers import kl_penalty

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "POLICY_LOSSES", "REGULARIZERS", "SAMPLERS", "SHAPING",
    "compute_advantages", "kl_penalty", "policy_loss",
]
