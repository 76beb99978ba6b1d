"""The sections of a recipe that parse into typed objects, parsed once per recipe: a dpo recipe's `loss:`
(postrain.preference.section.parse_losses: list[LossTerm], [] without `loss:`) and a grpo recipe's `rl:`
(postrain.rl.section.parse_rl_section: RLParts, None without `rl:`).

Several steps read them: the job's check (postrain.jobs.loading.load_recipe runs it), liveness, the dry-run plan
(its batch unit, its memory estimate), the run, which hands the result to the trainer. Each asks here (`loss_terms`,
`rl_parts`) with the cfg it holds, a Recipe's or a bare one: the first ask parses, and the result is kept beside
that cfg object for as long as a Recipe holds it (`Recipe.sections`). The job's check asks first, so a bad section
fails where it always did, with the parser's own error.

A kept parse cannot be stale: it is handed out only for the very cfg object it was parsed from, and only while
that cfg (and the origins, which word the parts' `where`) still equal the copies taken when it was parsed. A Recipe
built with another cfg (a pipeline stage, a load with other overrides, --smoke's layer, `Recipe(command, cfg=...)`,
dataclasses.replace) starts with an empty cache of its own; a cfg changed in place is parsed again. A cfg that no
Recipe holds (a direct call from Python or a test) is parsed on every ask.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Callable

Parser = Callable[[dict, dict], Any]


class ParsedSections:
    """The parsed sections of one cfg object: section name -> (copy of the cfg, copy of the origins, parsed)."""

    def __init__(self, cfg: dict[str, Any]):
        # Held, so that while this cache lives id(cfg) names this cfg and no other object (KEPT is keyed by it).
        self.cfg = cfg
        self.kept: dict[str, tuple[dict, dict, Any]] = {}

    def get(self, name: str, origins: dict[str, str] | None, parse: Parser) -> Any:
        """The kept parse of section `name` if the cfg (and `origins`, where given) are unchanged; else parse now
        and keep it. A reader without origins (they word only error messages and `where`) takes any kept parse."""
        if name in self.kept:
            cfg_then, origins_then, value = self.kept[name]
            if cfg_then == self.cfg and (origins is None or origins == origins_then):
                return value
        value = parse(self.cfg, origins or {})
        self.kept[name] = (copy.deepcopy(self.cfg), dict(origins or {}), value)
        return value


# id(cfg) -> its cache, for the readers handed a cfg rather than a Recipe; an entry goes with the last Recipe
# holding it (weak values), and a live cache holds its cfg, so an id is never another object's while listed.
KEPT: weakref.WeakValueDictionary[int, ParsedSections] = weakref.WeakValueDictionary()


def sections_of(cfg: dict[str, Any]) -> ParsedSections:
    """The cache of `cfg`: the one already kept for this cfg object (two Recipes over one cfg share it), else a
    new, empty one (Recipe.__post_init__ holds it)."""
    cache = KEPT.get(id(cfg))
    if cache is None or cache.cfg is not cfg:  # `is`: the cache of this very object, whatever the id bookkeeping
        cache = KEPT[id(cfg)] = ParsedSections(cfg)
    return cache


def parsed(name: str, cfg: dict[str, Any], origins: dict[str, str] | None, parse: Parser) -> Any:
    """Section `name` of `cfg` as `parse(cfg, origins)` returns it, parsed once per Recipe (see the module
    docstring); a cfg no Recipe holds is parsed here on every call."""
    cache = KEPT.get(id(cfg))
    if cache is None or cache.cfg is not cfg:
        return parse(cfg, origins or {})
    return cache.get(name, origins, parse)


def loss_terms(cfg: dict[str, Any], origins: dict[str, str] | None = None) -> list:
    """A dpo recipe's `loss:` terms (list[postrain.preference.section.LossTerm]); [] without `loss:` (TRL's own
    loss). A bad section raises parse_losses' RecipeError."""
    return parsed("loss", cfg, origins, parse_loss)


def rl_parts(cfg: dict[str, Any], origins: dict[str, str] | None = None) -> Any:
    """A grpo recipe's `rl:` parts (postrain.rl.section.RLParts); None without `rl:` (TRL's own path). A bad
    section raises parse_rl_section's RecipeError."""
    return parsed("rl", cfg, origins, parse_rl)


def parse_loss(cfg: dict[str, Any], origins: dict[str, str]) -> list:
    if not cfg.get("loss"):
        return []
    # slow: torch (through postrain.preference.section), needed only for a recipe with `loss:`
    from postrain.preference.section import parse_losses

    return parse_losses(cfg["loss"], cfg.get("trainer") or {}, origins)


def parse_rl(cfg: dict[str, Any], origins: dict[str, str]) -> Any:
    if cfg.get("rl") is None:
        return None
    # slow: torch (through postrain.rl.section), needed only for a recipe with `rl:`
    from postrain.rl.section import parse_rl_section

    return parse_rl_section(cfg["rl"], origins)
