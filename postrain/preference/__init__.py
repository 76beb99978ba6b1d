"""Preference-optimization losses: one registry, one signature, the paper's metadata on every entry.

    from postrain.preference import preference_loss
    losses = preference_loss("simpo", chosen_logps=..., rejected_logps=..., chosen_lengths=...,
                             rejected_lengths=..., beta=2.0, gamma=1.0)    # -> (B,)

See `postrain.preference.registry` for the calling convention, and `postrain variants --family preference`
for the list.
"""

from postrain.preference.registry import PREFERENCE, preference_loss
from postrain.preference import dpo_family  # noqa: F401
from postrain.preference import pairwise_variants  # noqa: F401
from postrain.preference import listwise, reference_free, unpaired  # noqa: F401,E402  (register)
from postrain.preference import modulated_reference  # noqa: F401,E402  (register)
from postrain.preference import token_weighted  # noqa: F401,E402  (register)
from postrain.preference import gflownet  # noqa: F401,E402  (register)

__all__ = ["PREFERENCE", "preference_loss"]
