"""Jobs: one `run(recipe, options)` per command. The only code that wires data, models, trainers and rewards."""

from __future__ import annotations

import importlib

from postrain.jobs.common import RunOptions

JOB_MODULES = {
    "sft": "postrain.jobs.sft",
    "dpo": "postrain.jobs.dpo",
    "grpo": "postrain.jobs.grpo",
    "eval": "postrain.jobs.evaluate",
    "merge": "postrain.jobs.merge",
    "pipeline": "postrain.jobs.pipeline",
}


def run_job(recipe, options: RunOptions | None = None) -> dict:
    """Run a resolved recipe with the job for its command."""
    from postrain.jobs.common import check_trl_version, quiet_libraries
    from postrain.jobs.preflight import check_output_dir

    check_trl_version()
    check_output_dir(recipe.cfg["output_dir"])  # before the data loads: nothing is written if it cannot be
    quiet_libraries()
    module = importlib.import_module(JOB_MODULES[recipe.command])
    return module.run(recipe, options or RunOptions())
