"""`mix:` of a source: a second source's rows joined to this one's, as DICE's experience replay draws them
(Bootstrapping Language Models with DPO Implicit Rewards, arXiv 2406.09760; sail-sg/dice generate_lc_paired_set.py
create_mix_paired_set). postrain.data.sources loads both sources and joins them with `mix_rows`.
"""

from __future__ import annotations

import json
import random

from postrain.errors import DataError, RecipeError

# MixSpec's own keys (postrain.data.source_spec): the rest of `mix:` is the mixed-in source.
MIX_KEYS = ("fraction", "seed", "new_prompts_only")


def check_mix(mix: object, where: str) -> None:
    """`mix:` names a source, a fraction in (0, 1), and holds no mix of its own (the source itself is checked as
    any source, by the caller)."""
    if not isinstance(mix, dict) or not mix.get("source"):
        raise RecipeError(f"{where}.mix: a second source to mix in, e.g. mix: {{source: data/offline_pairs.jsonl, "
                          f"fraction: 0.5}}; got {mix!r}")
    fraction = mix.get("fraction", 0.5)
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction < 1:
        raise RecipeError(f"{where}.mix.fraction: the mixed-in source's share of the result, a number strictly "
                          f"between 0 and 1 (DICE: 0.5); to use one source alone, remove `mix:`. Got {fraction!r}")
    if mix.get("mix") is not None:
        raise RecipeError(f"{where}.mix.mix: a mixed-in source cannot mix in a third; mix two sources")


def mix_counts(n_here: int, n_there: int, fraction: float) -> tuple[int, int]:
    """Rows drawn from this source and from the mixed-in one (create_mix_paired_set: n_total = len(offline),
    n_from_gen = min(int(n_total·(1 − γ)), len(gen)), n_from_off = int(γ·n_from_gen / (1 − γ)))."""
    n_from_here = min(int(n_there * (1 - fraction)), n_here)
    return n_from_here, int(fraction * n_from_here / (1 - fraction))


def mix_rows(here: list[dict], there: list[dict], fraction: float, seed: int, new_prompts_only: bool,
             where: str) -> list[dict]:
    """This source's draw (in drawn order), then the mixed-in source's, each without replacement, one
    random.Random(seed). Only the columns both have are kept."""
    rng = random.Random(seed)
    n_here, n_there = mix_counts(len(here), len(there), fraction)
    if n_here == 0:
        raise DataError(f"{where}.mix: {len(there)} mixed-in row(s) at fraction {fraction} leave no room for this "
                        f"source's rows (it takes min(int(M·(1 − fraction)), N)); mix in a larger source")
    drawn = rng.sample(here, n_here)
    pool = there
    if new_prompts_only:
        seen = {json.dumps(r.get("prompt"), sort_keys=True) for r in drawn}
        pool = [r for r in there if json.dumps(r.get("prompt"), sort_keys=True) not in seen]
    if n_there > len(pool):
        raise DataError(f"{where}.mix: {n_there} mixed-in rows are needed for fraction {fraction}, but only "
                        f"{len(pool)} of its {len(there)} rows" + (" have a prompt not already drawn here"
                                                                  if new_prompts_only else "") +
                        "; lower mix.fraction" + (" or set mix.new_prompts_only: false" if new_prompts_only else ""))
    mixed_in = rng.sample(pool, n_there)
    common = [c for c in here[0] if c in there[0]] if here and there else []
    return [{c: r[c] for c in common} for r in drawn + mixed_in]
