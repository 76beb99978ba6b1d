"""Per-turn data of multi-turn preference losses (DMPO, SDPO), as a `loss:` section names it: the data names, which
losses read them, and the trainer options they cannot run with (checked when a recipe loads).

The DPO trainer computes the data from conversational pairs (postrain.trainers.turns, whose docstring says how, with
the authors' code): per agent turn, the policy's and reference's summed log-probs (B, J) and a turn mask.
"""

from __future__ import annotations

from typing import Any

from postrain.errors import RecipeError
from postrain.preference.registry import PREFERENCE

TURN_LOGPS = ("chosen_turn_logps", "rejected_turn_logps")  # per assistant turn, summed over its tokens (B, J)
REF_TURN_LOGPS = ("ref_chosen_turn_logps", "ref_rejected_turn_logps")
TURN_MASKS = ("chosen_turn_mask", "rejected_turn_mask")  # 1 for the turns a row has (B, J), left-aligned
# Registry data the DPO trainer computes from a batch of conversational pairs; REF_TURN_LOGPS need the reference.
TURN_DATA = frozenset({*TURN_LOGPS, *REF_TURN_LOGPS, *TURN_MASKS})


def per_turn_losses() -> str:
    """The registered preference losses that read per-turn data, for messages: "dmpo, sdpo_segment"."""
    return ", ".join(sorted(v.name for v in PREFERENCE if TURN_DATA & set(v.data)))


def reads_turns(terms: list) -> bool:
    """Whether some loss term reads per-turn data."""
    return any(TURN_DATA & t.reads for t in terms)


def reads_turns_section(section: Any) -> bool:
    """The same for an unvalidated `loss:` section (the smoke layer): some entry names a loss reading turn data."""
    for entry in section or []:
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name in PREFERENCE and TURN_DATA & set(PREFERENCE.get(name).data):
            return True
    return False


def check_options(terms: list, trainer: dict, defaults: dict) -> None:
    """Load time: the trainer options per-turn log-probs cannot honour are refused, saying what to set."""
    users = [t.name for t in terms if TURN_DATA & t.reads]
    if not users:
        return

    def option(name: str) -> Any:
        return trainer.get(name, defaults.get(name))

    if option("precompute_ref_log_probs"):
        raise RecipeError(f"preference loss {users[0]!r} reads per-turn reference log-probs, which "
                          f"trainer.precompute_ref_log_probs does not keep (TRL precomputes summed log-probs only); "
                          f"set it to false")
    if option("truncation_mode") not in (None, "keep_start"):
        raise RecipeError(f"trainer.truncation_mode={option('truncation_mode')!r} with {users[0]!r}: keep_end cuts "
                          f"a trajectory's first turns (dmpo weighs them most; an sdpo_segment pair first differs "
                          f"there) and would number the rest from turn 0. Set truncation_mode: keep_start (turns past "
                          f"max_length are dropped), or raise max_length")
