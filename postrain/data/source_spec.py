"""The shape of a data source (`data.train`, `data.eval`, an eval set): the recipe schema (postrain.recipes.schema)
takes these dataclasses from here, so the data package reads its own vocabulary without importing the recipes.

A transform's settings are a mapping under the section its registry entry names (`pairing:`, `steps:`, ...;
postrain.data.transforms): their keys are the transform's keyword parameters, checked against its signature when
the recipe loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ChunkSpec:
    """`chunk: {index: 0, of: 2}`: the `index`-th (from 0) of `of` contiguous slices of the rows, in the order the
    source gives them (after `transform`, before `limit`); the `of` slices partition the rows, sizes differing by at
    most one. sDPO trains stage t on chunk t (recipes/papers/sdpo.yaml)."""

    index: int = 0
    of: int = 1


@dataclass
class SourceSpec:
    """One dataset.

    `source` is `builtin:<task>` (see `postrain.data.tasks`), a local .jsonl/.json/.csv/.parquet file, or a hub
    dataset id. `columns` maps the column a job needs onto the dataset's column (`{prompt: question}`).
    """

    source: str = "builtin:arithmetic"
    config: str | None = None
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    # Parameters of a built-in task (digits, n, seed, ...).
    task: dict[str, Any] = field(default_factory=dict)
    # Wrap the prompt as a chat turn ([{"role": "user", ...}]) so the tokenizer's chat template applies.
    chat: bool = False
    system_prompt: str | None = None
    # Python format string applied to the prompt text, e.g. "{prompt}\nPut the answer in \\boxed{{}}."
    prompt_template: str | None = None
    # A registered data transform (postrain.data.transforms: `postrain.data.transforms.TRANSFORMS`) turning the rows
    # into another shape: score_pairs, win_rate_pairs, score_lists, unpair, curriculum_pairs (pairing.py),
    # step_pairs, step_prefixes, step_controlled_pairs (steps.py), best_of_k, thought_dropout,
    # implicit_reward_pairs. Checked against the registry when the recipe loads.
    transform: str | None = None
    # Take one slice of the rows (sDPO's data chunks); see ChunkSpec.
    chunk: ChunkSpec | None = None
    # Concatenate a second source's rows with these (DICE's experience replay of offline pairs; see MixSpec).
    mix: MixSpec | None = None
    # Training rows whose prompt does not fit (sft / dpo: at least trainer.max_length tokens, so TRL's truncation
    # would leave nothing of the completion; grpo: past the model's max_position_embeddings once the completion is
    # generated): `refuse` them (an error naming the first), `drop` them (counted and reported) or `keep` them
    # (reported). null: refuse in sft / dpo, keep in grpo (RoPE models run past their nominal positions; TRL
    # does not cut GRPO prompts). See postrain.data.lengths.
    too_long: Literal["refuse", "drop", "keep"] | None = None
    # The transform's settings: the source's other keys, as written: its section (`pairing: {...}`, `steps: {...}`)
    # or its parameters as source keys (curriculum_pairs' `curriculum_stage: 1`). The transforms' registry says
    # which keys those are (postrain.data.transforms.transform_keys: each entry's `section`, or its parameters), and
    # the recipe check reads them from there; no field here names them, so a new transform is one file.
    transform_settings: dict[str, Any] = field(default_factory=dict, metadata={"recipe_key": False})


@dataclass
class MixSpec(SourceSpec):
    """`mix:` of a source: a second source (every SourceSpec key) whose rows join this one's, as DICE's experience
    replay (sail-sg/dice generate_lc_paired_set.py create_mix_paired_set): with N rows here, M there and
    `fraction` γ, n = min(int(M·(1 − γ)), N) rows are drawn from this source and int(γ·n / (1 − γ)) from the mix
    source (with `new_prompts_only`, among its rows whose prompt is not among the n drawn), seeded by `seed`;
    this source's draw comes first. Applied after both sources are loaded and formatted."""

    fraction: float = 0.5
    seed: int = 0
    new_prompts_only: bool = True


SOURCE_KEYS = tuple(f.name for f in dataclasses.fields(SourceSpec) if f.metadata.get("recipe_key", True))


def as_source(spec: dict | SourceSpec) -> SourceSpec:
    """A source as written (a recipe mapping, validated) as a SourceSpec: its own keys as fields, every other key in
    `transform_settings` (the transform's settings; an eval set's `generation:` rides along unread)."""
    if isinstance(spec, SourceSpec):
        return spec
    return SourceSpec(**{k: v for k, v in spec.items() if k in SOURCE_KEYS},
                      transform_settings={k: v for k, v in spec.items() if k not in SOURCE_KEYS})


def as_mapping(spec: dict | SourceSpec) -> dict:
    """A source as its recipe mapping: as_source's inverse (its transform's settings back among its keys)."""
    if isinstance(spec, dict):
        return dict(spec)
    out = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "transform_settings"}
    return {**out, **spec.transform_settings}


def describe(spec: SourceSpec) -> str:
    extra = f" (config {spec.config})" if spec.config else ""
    return f"{spec.source}{extra} [{spec.split}]"
