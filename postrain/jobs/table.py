"""The per-command table of the jobs: command -> its job module (`run`, `check`, `plan`, `smoke_layer`). The loading
(postrain.jobs.loading), --smoke (postrain.jobs.smoke), --dry-run (postrain.jobs.plan, and a pipeline's plan for
its stages) and `run_job` reach a command's job through it."""

from __future__ import annotations

import importlib
from types import ModuleType

JOB_MODULES = {
    "sft": "postrain.jobs.sft",
    "dpo": "postrain.jobs.dpo",
    "grpo": "postrain.jobs.grpo",
    "eval": "postrain.jobs.evaluate",
    "merge": "postrain.jobs.merge",
    "pipeline": "postrain.jobs.pipeline",
}


def job_module(command: str) -> ModuleType:
    """The job module of a command (imported on first use: a command line loads only its own job)."""
    return importlib.import_module(JOB_MODULES[command])
