"""Jobs: one module per command, the only code that wires data, models, trainers and rewards. Each job module has
`run(recipe, options)`, `check(cfg, origins)` (its load-time checks: postrain.jobs.checks has those several
jobs share), `plan(recipe, check_models, worker_args)` (its --dry-run lines after the shared head:
postrain.jobs.plan has the shared parts) and `smoke_layer(cfg)` (what --smoke swaps in: postrain.jobs.smoke has the
shared parts); JOB_MODULES, the per-command table, is how the loading (postrain.jobs.loading), --dry-run and
`run_job` (postrain.jobs.dispatch) reach them."""

from __future__ import annotations

from postrain.jobs.common import RunOptions
from postrain.jobs.dispatch import run_job
from postrain.jobs.loading import load_recipe, load_smoke_recipe
from postrain.jobs.table import JOB_MODULES, job_module

__all__ = ["JOB_MODULES", "RunOptions", "job_module", "load_recipe", "load_smoke_recipe", "run_job"]
