"""One registry mechanism for every family of method parts (preference losses, advantage estimators, policy
losses, aggregations, regularizers, reward shaping, samplers, named methods).

An entry is a pure function over tensors, registered with a decorator that carries its paper metadata:

    PREFERENCE = Registry("preference")

    @PREFERENCE.register("ipo", paper="A General Theoretical Paradigm to Understand Learning from Human "
                         "Preferences", arxiv="2310.12036", trl="ipo")
    def ipo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1):
        ...

The function's signature is the single source of truth, as in mergekit's merge-method registry:
  - parameters before `*` are its **data** (tensors it reads); those without a default are required;
  - keyword-only parameters after `*` are its **hyperparameters**, their defaults the paper's defaults.
So `Variant.params` and `Variant.data` are read from the signature, never written twice. The hyperparameters'
annotations are their types, and `ranges=` (on the registry: for every entry of the family that has the parameter;
on an entry: for that entry, over the family's) declares the values a paper allows, e.g. `{"epsilon": "> 0"}`:
`check_params` refuses a recipe value of the wrong type or out of range at load time.

An entry whose defining step acts only under some batch layouts says so with `requires=` (Requirement: a batch-level
std needs several groups per generation batch, a ratio clip needs off-policy updates, ...); postrain.jobs.liveness
checks a recipe's layout against them. `conventions=` lists hyperparameter values that are almost certainly a
convention mix-up (an absolute ratio cap below 1, a clip range above 1), refused when a recipe loads.
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from postrain.errors import RecipeError, did_you_mean
from postrain.value_types import check_value, parse_range

# The registries of method parts, by family (entries cite their paper): `postrain variants` lists them all.
FAMILIES: dict[str, "Registry"] = {}
# Every registry by family: the method parts above and the building blocks whose entries need no paper (rewards,
# built-in tasks, data transforms).
REGISTRIES: dict[str, "Registry"] = {}
# The data input holding the behaviour policy's per-token log-probs, pi_old of an importance ratio pi / pi_old: the
# policy that generated the batch, as the training model computes it (under vLLM, TRL's importance-sampling
# correction weighs the loss by pi_old / pi_vllm on top).
BEHAVIOUR_LOGPS = "old_logps"


# What a Requirement can ask of a recipe's batch layout (postrain.jobs.liveness evaluates each kind):
REQUIREMENT_KINDS: dict[str, str] = {
    "off_policy": "more than one optimizer step per generation batch, or num_iterations > 1, so that the policy "
                  "moves away from pi_old and a ratio pi / pi_old differs from 1",
    "groups_per_batch": "two groups (prompts) or more per generation batch, gathered over the processes",
    "group_size": "groups of 2 completions or more, as the entry sees them",
    "refill": "more than one generation round per step (max_num_gen_batches)",
    "length_budget": "a length budget below max_completion_length at some step of the run",
    "revisits": "each prompt visited in several epochs",
    "selection": "a selection that keeps fewer rows than it sees",
    "rows_per_batch": "enough rows per batch (one process' micro-batch, or the batch gathered over processes)",
}


@dataclass(frozen=True)
class Requirement:
    """What an entry's defining step needs from the batch layout to act at all: without it the step is inert
    (a batch std over one group is the group's std; a clip of a ratio that is always 1 never clips).

    `step` says in words what is inert otherwise; `when(params)` (the entry's hyperparameters, defaults filled in)
    limits the requirement to the settings where the step exists. `amount` is the kind's figure, a number or
    `amount(params, layout)` (layout: postrain.jobs.liveness.Layout): refill, the generation rounds allowed;
    length_budget, the smallest budget of the run (None: cannot be told); revisits, the visits needed;
    selection, (kept, seen); rows_per_batch, the rows needed, counted per process or gathered (`scope`)."""

    kind: str
    step: str
    when: Callable[[dict], bool] | None = None
    amount: Any = None
    scope: str = "gathered"

    def __post_init__(self):
        if self.kind not in REQUIREMENT_KINDS:
            raise ValueError(f"unknown requirement kind {self.kind!r}: {', '.join(REQUIREMENT_KINDS)}")
        if self.scope not in ("process", "gathered"):
            raise ValueError(f"requirement scope must be 'process' or 'gathered', not {self.scope!r}")

    def applies(self, params: dict[str, Any]) -> bool:
        return self.when is None or bool(self.when(params))

    def describe(self) -> str:
        return f"{self.kind}: {self.step}"


@dataclass(frozen=True)
class Convention:
    """A hyperparameter value that is almost certainly a convention mix-up: `ok(value, params)` is False for it,
    and `explain` says which convention the entry uses and what the value probably meant (refused at load time)."""

    param: str
    ok: Callable[[Any, dict], bool]
    explain: str

    def check(self, params: dict[str, Any]) -> str | None:
        """The explanation when the entry's hyperparameters (defaults filled in) break the convention, else None."""
        value = params.get(self.param)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # unset (an optional parameter) or not a number: the entry's own checks apply
        return None if self.ok(value, params) else self.explain


@dataclass(frozen=True)
class Variant:
    """A registered entry and its metadata."""

    name: str
    family: str
    fn: Callable
    paper: str
    arxiv: str
    # TRL's own option computing exactly the same thing, if any (e.g. `loss_type="ipo"`).
    trl: str | None = None
    # Free-form notes: where the formula was checked (authors' code, paper section), deviations.
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # What the entry's defining step needs from the batch layout (postrain.jobs.liveness).
    requires: tuple[Requirement, ...] = ()
    # Hyperparameter values refused as a convention mix-up (checked when a recipe loads).
    conventions: tuple[Convention, ...] = ()
    # Hyperparameter -> the values it may take ("> 0", ">= 0", "in [0, 1)", ...), checked at load time.
    ranges: dict[str, str] = field(default_factory=dict)

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.fn)

    @property
    def params(self) -> dict[str, Any]:
        """Hyperparameters (keyword-only arguments) -> paper default (None where there is none)."""
        return {
            p.name: (None if p.default is inspect.Parameter.empty else p.default)
            for p in self.signature.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    @property
    def data(self) -> dict[str, bool]:
        """Data inputs (arguments before `*`) -> whether required."""
        return {
            p.name: p.default is inspect.Parameter.empty
            for p in self.signature.parameters.values()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY)
        }

    def needs(self, name: str) -> bool:
        """Whether the entry reads data input `name` at all (required or optional)."""
        return name in self.data

    def reads(self, name: str) -> bool | None:
        """Whether the entry reads data input `name`: from its own signature, or for an entry that stands for
        entries of other families (a named method) from theirs, as its registry tells (None: it cannot tell)."""
        registry = REGISTRIES.get(self.family)
        if registry is None or registry.reads is None:
            return self.needs(name)
        return registry.reads(self, name)

    def requirements(self, params: dict[str, Any] | None = None) -> list[tuple["Variant", dict, Requirement]]:
        """(entry, its hyperparameters, requirement) for each requirement that applies at `params` (the entry's
        defaults where None): the entry's own or, for an entry that stands for entries of other families (a named
        method), those of its parts, as its registry tells."""
        registry = REGISTRIES.get(self.family)
        if registry is not None and registry.requirements is not None:
            return registry.requirements(self, params)
        full = {**self.params, **(params or {})}
        return [(self, full, r) for r in self.requires if r.applies(full)]

    def convention_errors(self, params: dict[str, Any] | None = None) -> list[str]:
        """The explanations of the conventions `params` (over the entry's defaults) break."""
        full = {**self.params, **(params or {})}
        return [f"{c.param}={full[c.param]!r}: {c.explain}" for c in self.conventions if c.check(full)]

    @property
    def param_types(self) -> dict[str, Any]:
        """Hyperparameter -> its annotation (resolved; Any where there is none or it does not resolve)."""
        return _param_types(self.fn)

    @property
    def description(self) -> str:
        return (inspect.getdoc(self.fn) or "").split("\n\n")[0].replace("\n", " ")

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "paper": self.paper,
            "arxiv": self.arxiv,
            "params": self.params,
            "data": [f"{k}{'' if required else ' (optional)'}" for k, required in self.data.items()],
            "reads_behaviour_logps": self.reads(BEHAVIOUR_LOGPS),
            "needs_to_act": [f"{v.name}: {r.describe()}" if v is not self else r.describe()
                             for v, _, r in self.requirements()],
            "trl": self.trl,
            "description": self.description,
            **({"notes": self.notes} if self.notes else {}),
            **({"ranges": self.ranges} if self.ranges else {}),
            **{k: v for k, v in self.extra.items() if not callable(v)},  # a hook (a function) is for trainers
        }


@functools.lru_cache(maxsize=None)
def _param_types(fn: Callable) -> dict[str, Any]:
    # An entry that is a class (a reward) takes its hyperparameters in __init__: their annotations are there, and
    # the class's own are its attributes'.
    try:
        hints = typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn)
    except Exception:  # an annotation that does not resolve: that parameter's type is not checked
        hints = {}
    return {p.name: hints.get(p.name, Any) for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def suggest(word: str, choices, label: str = "valid") -> str:
    """"did you mean 'x'? valid: a, b, c" for an unknown name among `choices`."""
    choices = sorted(str(c) for c in choices)
    hint = did_you_mean(word, choices)
    return f"{hint}{' ' if hint else ''}{label}: {', '.join(choices) if choices else 'none'}"


class Registry:
    """Named entries of one family, registered by decorator."""

    def __init__(self, family: str, *, what: str | None = None,
                 reads: Callable[[Variant, str], bool | None] | None = None,
                 requirements: Callable[[Variant, dict | None], list] | None = None,
                 ranges: dict[str, str] | None = None, papers: bool = True):
        """`papers`: whether every entry must cite its paper (title and arXiv id); a family of building blocks
        (rewards, tasks, data transforms) may allow entries without one, and is not listed as method parts.
        `reads(variant, data_name)`: for a family whose entries stand for entries of other families (named
        methods), whether an entry reads a data input through them; None: each entry's own signature says.
        `requirements(variant, params)`: likewise, the requirements of the parts an entry stands for.
        `ranges`: parameter -> allowed values for every entry of the family that has the parameter (an entry's
        own `ranges=` overrides them)."""
        if family in REGISTRIES:
            raise ValueError(f"registry family {family!r} exists already")
        self.papers = papers
        self.family = family
        self.what = what or family.replace("_", " ")
        self.reads = reads
        self.requirements = requirements
        self.ranges = dict(ranges or {})
        for spec in self.ranges.values():
            parse_range(spec)
        self.entries: dict[str, Variant] = {}
        REGISTRIES[family] = self
        if papers:
            FAMILIES[family] = self

    def register(self, name: str, *, paper: str = "", arxiv: str = "", trl: str | None = None, notes: str = "",
                 requires: tuple[Requirement, ...] | list[Requirement] = (),
                 conventions: tuple[Convention, ...] | list[Convention] = (),
                 ranges: dict[str, str] | None = None, **extra: Any) -> Callable[[Callable], Callable]:
        def decorator(fn: Callable) -> Callable:
            if name in self.entries:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            if self.papers and (not paper or not arxiv):
                raise ValueError(f"{self.what} {name!r} needs its paper title and arXiv id")
            params = [p.name for p in inspect.signature(fn).parameters.values()
                      if p.kind is inspect.Parameter.KEYWORD_ONLY]
            unknown = [key for key in ranges or {} if key not in params]
            if unknown:
                raise ValueError(f"{self.what} {name!r} declares a range for {unknown[0]!r}, not one of its "
                                 f"parameters ({', '.join(params)})")
            declared = {**{k: v for k, v in self.ranges.items() if k in params}, **(ranges or {})}
            for spec in declared.values():
                parse_range(spec)
            variant = Variant(name, self.family, fn, paper, arxiv, trl, notes, dict(extra), tuple(requires),
                              tuple(conventions), declared)
            unknown = [c.param for c in variant.conventions if c.param not in variant.params]
            if unknown:
                raise ValueError(f"{self.what} {name!r}: convention on {unknown[0]!r}, which is not a hyperparameter")
            self.entries[name] = variant
            fn.variant = self.entries[name]
            return fn

        return decorator

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __iter__(self):
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: str, where: str = "") -> Variant:
        if name not in self.entries:
            at = f" ({where})" if where else ""
            raise RecipeError(f"unknown {self.what} {name!r}{at}: {suggest(name, self.entries)}")
        return self.entries[name]

    def check_names(self, name: str, params: dict[str, Any], where: str = "") -> Variant:
        """Raise RecipeError for an unknown entry or hyperparameter."""
        variant = self.get(name, where)
        valid = variant.params
        for key in params:
            if key not in valid:
                at = f" ({where})" if where else ""
                raise RecipeError(f"unknown parameter {key!r} for {self.what} {name!r}{at}: "
                                  f"{suggest(key, valid, 'its parameters')}")
        return variant

    def check_params(self, name: str, params: dict[str, Any], where: str = "") -> Variant:
        """The recipe-load-time check: RecipeError for an unknown entry or hyperparameter, a value that does not
        fit the parameter's annotation (`beta: abc` for a float), or one outside its declared range."""
        variant = self.check_names(name, params, where)
        types = variant.param_types
        at = f" ({where})" if where else ""
        for key, value in params.items():
            check_value(value, types.get(key, Any), None, f"parameter {key!r} of {self.what} {name!r}{at}")
        # A value that is a known convention mix-up gets its explanation (the convention), not just the range
        # it falls outside of: `dual_clip_c: 0.5` is an absolute bound written as a distance.
        explained = [c for c in variant.conventions if c.param in params and c.check({**variant.params, **params})]
        if explained:
            c = explained[0]
            raise RecipeError(f"parameter {c.param!r} of {self.what} {name!r}{at}: {c.param}={params[c.param]!r}: "
                              f"{c.explain}")
        for key, value in params.items():
            check_value(value, types.get(key, Any), variant.ranges.get(key),
                        f"parameter {key!r} of {self.what} {name!r}{at}")
        return variant

    def call(self, name: str, data: dict[str, Any], params: dict[str, Any]):
        """Call an entry with the data inputs it reads (others in `data` are ignored) and its hyperparameters.
        Values are not type-checked here: trainers pass tensors (a per-batch beta) where recipes give numbers."""
        variant = self.check_names(name, params)
        wanted = variant.data
        missing = [k for k, required in wanted.items() if required and data.get(k) is None]
        if missing:
            raise ValueError(f"{self.what} {name!r} needs {', '.join(missing)}; it reads: {', '.join(wanted)}")
        kwargs = {k: v for k, v in data.items() if k in wanted}
        return variant.fn(**kwargs, **params)
