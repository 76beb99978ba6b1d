"""Every method part postrain has: the entries of the registry families, with the packages that register them
imported first.

The Registry mechanism (postrain.registry) knows no family; this module, one layer above the families' packages,
imports them so that a caller that lists every entry (`postrain variants`, the registry docs, coverage, liveness,
model cards) sees them all.
"""

from __future__ import annotations

import postrain.preference  # noqa: F401  (registers the preference losses)
import postrain.rl  # noqa: F401  (registers the RL parts and named methods)
from postrain.registry import FAMILIES, Variant


def all_variants(family: str | None = None) -> list[Variant]:
    """Every registered entry, optionally of one family."""
    return [v for reg in FAMILIES.values() if family in (None, reg.family) for v in reg]
