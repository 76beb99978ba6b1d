"""Each job owns its check, plan and smoke beside its run: every module of the per-command table has them, the
--dry-run plan reaches the command's own, and postrain/jobs/plan.py (the pieces the jobs share) has no per-command
switch left."""

from __future__ import annotations

import ast
import importlib
import inspect

import pytest

from postrain.jobs import JOB_MODULES, job_module, load_recipe
from postrain.jobs import plan as plan_module
from tests.conftest import REPO

JOB_PARTS = ("run", "check", "plan", "smoke_layer")


@pytest.mark.parametrize("command", sorted(JOB_MODULES))
def test_every_job_module_has_its_run_check_plan_and_smoke_layer(command):
    module = importlib.import_module(JOB_MODULES[command])
    missing = [name for name in JOB_PARTS if not callable(getattr(module, name, None))]
    assert not missing, f"{JOB_MODULES[command]} lacks {missing}"
    # called as postrain.jobs.plan.plan and the pipeline's plan call it: the recipe, then these keywords
    inspect.signature(module.plan).bind(object(), check_models=False, worker_args=["sft", "r.yaml"])


@pytest.mark.parametrize("command", ["sft", "dpo", "grpo", "eval", "merge", "pipeline"])
def test_a_commands_plan_is_the_shared_head_then_its_jobs(command, monkeypatch):
    """--dry-run's plan: command, run directory and hash, then exactly the lines of the command's job's `plan`,
    given the check_models and worker_args it was called with."""
    recipe = load_recipe(REPO / "recipes" / "demo" / f"{command}.yaml", [], command)
    seen = []

    def job_plan(recipe, check_models=True, worker_args=None):
        seen.append((recipe, check_models, worker_args))
        return {"job line": command}

    monkeypatch.setattr(job_module(command), "plan", job_plan)
    rows = plan_module.plan(recipe, check_models=False, worker_args=["w"])
    assert list(rows.items()) == [("command", command), ("run directory", recipe.cfg["output_dir"]),
                                  ("recipe hash", recipe.hash), ("job line", command)]
    assert seen == [(recipe, False, ["w"])]


def test_the_pipeline_plans_each_stage_with_the_stages_own_job(monkeypatch):
    """A pipeline's dry run loads every stage and plans it with its own job, without checking its models (earlier
    stages write them)."""
    pipeline = load_recipe(REPO / "recipes" / "demo" / "pipeline.yaml", [], "pipeline")
    stages = pipeline.cfg["stages"]
    planned = []
    for command in {stage["command"] for stage in stages.values()}:
        monkeypatch.setattr(job_module(command), "plan", lambda recipe, check_models=True, worker_args=None:
                            planned.append((recipe.command, check_models)) or {})
    rows = plan_module.plan(pipeline)
    assert planned == [(stage["command"], False) for stage in stages.values()]
    assert [key for key in rows if key.startswith("stage ")] == [f"stage {name}" for name in stages]


def command_switches(source: str, commands) -> list[str]:
    """Where `source` tells the commands apart by name: a comparison with a command's name (`cmd == "grpo"`,
    `cmd in ("sft", "dpo")`), a dict keyed by command names, a `case "grpo":`."""
    def names(node) -> set[str]:  # a name itself or in a tuple, list or set; not `cfg.get("eval")`, a section
        members = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return {n.value for n in members if isinstance(n, ast.Constant) and n.value in commands}

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            hits = names(node.left).union(*(names(c) for c in node.comparators))
        elif isinstance(node, ast.Dict):
            hits = set().union(*(names(k) for k in node.keys if k is not None))
        elif isinstance(node, ast.MatchValue):
            hits = names(node.value)
        else:
            continue
        if hits:
            found.append((node.lineno, ast.unparse(node)[:80]))
    return [f"line {line}: {text}" for line, text in sorted(found)]


def test_the_shared_plan_module_has_no_per_command_switch():
    """What differs between commands is in their job modules' `plan`; postrain/jobs/plan.py only calls it."""
    source = (REPO / "postrain" / "jobs" / "plan.py").read_text()
    assert command_switches(source, set(JOB_MODULES)) == []


def test_the_switch_finder_finds_the_switches_it_looks_for():
    """The checker itself, on the shapes of the old plan (a switch it missed would let one come back)."""
    source = '''
def plan(cmd, cfg):
    if cmd == "grpo":
        pass
    if check and cmd in ("sft", "dpo"):
        pass
    unit = {"dpo": "pairs", "sft": "sequences"}[cmd]
    match cmd:
        case "merge":
            pass
    if cmd == "other" or cfg.get("grpo_option") == 1 or (cfg.get("eval") or {}).get("backend") == "lm_eval":
        pass
'''
    found = command_switches(source, set(JOB_MODULES))
    assert [line.split(":")[0] for line in found] == ["line 3", "line 5", "line 7", "line 9"]
