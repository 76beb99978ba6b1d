"""`run_job`: a resolved recipe run by its command's job (found through postrain.jobs.table), after the checks
every job shares. The CLI reaches it as `postrain.jobs.run_job` (the package re-exports it); a pipeline runs each
stage with it, importing it from this module (a job module imports the modules it needs, not its package, whose
__init__ is the CLI's entry)."""

from __future__ import annotations

from postrain.jobs.common import RunOptions, check_trl_version, quiet_libraries
from postrain.jobs.preflight import check_output_dir
from postrain.jobs.table import job_module


def run_job(recipe, options: RunOptions | None = None) -> dict:
    """Run a resolved recipe with the job for its command."""
    check_trl_version()
    check_output_dir(recipe.cfg["output_dir"])  # before the data loads: nothing is written if it cannot be
    quiet_libraries()
    return job_module(recipe.command).run(recipe, options or RunOptions())
