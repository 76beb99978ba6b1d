"""`postrain merge`: merge models with mergekit; the recipe's `merge:` section is mergekit's configuration.

Model references may be postrain run directories (their `model/` folder is used), `tiny`, local model folders
or hub ids; local ones are made absolute, since mergekit reads a relative path as a hub id. The output is a
normal run directory (`model/` with the tokenizer and the model card README.md) that `eval` and the trainers
accept; `hub.repo_id` uploads it once the merge finished (postrain.jobs.hub).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from postrain.jobs import checks, smoke
from postrain.jobs.common import RunOptions, prepare_run_dir, running
from postrain.jobs.hub import push_after_run
from postrain.jobs.plan import hub_plan
from postrain.jobs.rundir import partial_dir, publish
from postrain.merging import model_references, run_mergekit, validate_merge_config
from postrain.models.loading import MODEL_SUBDIR, resolve_model_path
from postrain.recipes import Recipe
from postrain.reports.model_card import write_model_card


def check(cfg: dict, origins: dict[str, str]) -> None:
    """Load-time checks of a merge recipe, in this order: the merge section, what the job reads, the run's
    sections, health, the reward error policy."""
    check_merge_section(cfg)
    checks.check_inputs("merge", cfg, origins)
    checks.check_run_sections("merge", cfg, origins)
    checks.check_health("merge", cfg, origins)
    checks.check_reward_errors(cfg, origins)


def plan(recipe: Recipe, check_models: bool = True, worker_args: list[str] | None = None) -> dict[str, Any]:
    """The --dry-run lines of a merge after the head (postrain.jobs.plan): the method, the input models and the hub
    target. `check_models`: every input exists (a pipeline's are written by earlier stages). `worker_args` is not
    read: a merge runs in the calling process."""
    cfg = recipe.cfg
    out: dict[str, Any] = {"merge method": cfg["merge"].get("merge_method"),
                           "models": ", ".join(model_references(cfg["merge"]))}
    if check_models:
        validate_merge_config(cfg["merge"], resolve_model=resolve_model_path)
    out.update(hub_plan(cfg))
    return out


def check_merge_section(cfg: dict) -> None:
    """`merge:` against mergekit's schema and method registry.

    The models need not exist yet (in a pipeline they are produced by earlier stages), so every reference is
    checked with a stand-in hub id here; `run` checks the real references before it writes anything.
    """
    def stand_in(ref: str) -> str:  # distinct per reference, so mergekit's duplicate-input check still applies
        return "postrain-check/" + hashlib.sha256(str(ref).encode()).hexdigest()[:12]

    validate_merge_config(cfg.get("merge") or {}, resolve_model=stand_in)



def smoke_layer(cfg: dict) -> dict:
    """The `--smoke` layer of a merge recipe (postrain.jobs.smoke): tiny models in, no push to the hub (an explicit
    hub.repo_id=... override, above this layer, still pushes)."""
    return {"merge": smoke.smoke_merge(cfg.get("merge") or {}), "hub": {"repo_id": None}}

def run(recipe: Recipe, options: RunOptions) -> dict:
    merge_cfg = recipe.cfg["merge"]
    validate_merge_config(merge_cfg, resolve_model=resolve_model_path)  # every input exists, before writing
    run_dir = prepare_run_dir(recipe, options)
    with running(run_dir, options.started):
        staging = partial_dir(run_dir / MODEL_SUBDIR)  # model/ appears whole or not at all
        run_mergekit(merge_cfg, staging, resolve_model=resolve_model_path)
        publish(staging, run_dir / MODEL_SUBDIR)
        write_model_card(run_dir)  # model/README.md: lineage, merge method, recipe
    final = Path(recipe.cfg["output_dir"])  # a --overwrite run has replaced the previous one by now
    push_after_run(recipe, final)  # hub.repo_id: after the run is `done`, so a failed push keeps it done
    return {"run_dir": str(final)}
