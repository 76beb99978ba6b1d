"""`hub:`: upload a finished run's model folder to the Hugging Face hub (schema.HubSpec says why postrain pushes,
not TRL's `trainer.push_to_hub`).

What is uploaded is `<output_dir>/model` as the run left it: safetensors weights, tokenizer, and README.md, the
model card (postrain.reports.model_card). It is uploaded once, after the run finished (status.json `done`), by the
main process only, with huggingface_hub's HfApi: create_repo (exist_ok; `private` applies to a new repository),
create_branch for a `revision`, upload_folder.

A push that fails does not make the run a failed run: the model is trained and saved. status.json stays `done`
and gets `push_error`; the job then stops with an error (exit status 2) that says the model is saved, why the
push failed and how to push again: `postrain push <run dir>`, which reads the run's own `hub:` section
(`--repo-id` / `--revision` override it) and records `pushed` (repo, revision, commit) in status.json on success.
A pipeline stops at that stage; rerun the push, then the pipeline (the finished stage is skipped).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import huggingface_hub  # HfApi through it: the tests replace it there
from huggingface_hub.utils import HFValidationError, validate_repo_id

from postrain.errors import PostrainError, RecipeError
from postrain.jobs.common import read_status, write_json
from postrain.models.loading import MODEL_SUBDIR
from postrain.recipes.schema import HubSpec
from postrain.recipes.validate import origin_of
from postrain.reports.model_card import CARD_FILE, write_model_card
from postrain.reports.rundir import read_json, read_recipe, run_kind

HUB_COMMANDS = ("sft", "dpo", "grpo", "merge")


def hub_target(cfg: dict) -> dict | None:
    """The recipe's `hub:` section when it asks for a push (a repo_id), else None."""
    hub = cfg.get("hub") or {}
    return hub if hub.get("repo_id") else None


def check_hub_section(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """At load time: TRL's own push is refused (it would upload the checkpoints folder), and hub.repo_id must be a
    repository id huggingface_hub accepts."""
    if command not in HUB_COMMANDS:
        return
    trainer = cfg.get("trainer") or {}
    if trainer.get("push_to_hub"):
        raise RecipeError(
            f"trainer.push_to_hub (from {origin_of(origins, 'trainer.push_to_hub')}) would make TRL upload its own "
            f"output folder, postrain's checkpoints/ (intermediate checkpoints, LoRA adapters not merged, no model "
            f"card), during training. Set hub.repo_id instead (e.g. hub.repo_id=your-name/model): postrain uploads "
            f"the finished model/ folder with its model card once the run succeeded; trainer.push_to_hub: false")
    hub = hub_target(cfg)
    if hub is None:
        return
    try:
        validate_repo_id(hub["repo_id"])
    except HFValidationError as e:
        raise RecipeError(f"hub.repo_id {hub['repo_id']!r} (from {origin_of(origins, 'hub.repo_id')}) is not a hub "
                          f"repository id: {str(e).rstrip('.')}. Expected 'name' or 'namespace/name' (letters, digits, '-', '_', "
                          f"'.')") from None


def describe_target(cfg: dict) -> str | None:
    """The push target in one line (`--dry-run`'s plan), None when the recipe pushes nothing."""
    hub = hub_target(cfg)
    if hub is None:
        return None
    where = f"branch {hub['revision']}" if hub.get("revision") else "the default branch"
    return (f"{hub['repo_id']} ({'private' if hub.get('private', True) else 'public'}, {where}): "
            f"{Path(cfg['output_dir']) / MODEL_SUBDIR} with its model card, after the run finished")


def push_model(folder: Path, hub: dict, commit_message: str) -> dict[str, Any]:
    """Upload `folder` to the hub repository `hub` describes; what was pushed (repo, revision, commit, url)."""
    api = huggingface_hub.HfApi()
    private = bool(hub.get("private", True))
    repo = api.create_repo(hub["repo_id"], private=private, repo_type="model", exist_ok=True)
    repo_id = getattr(repo, "repo_id", None) or hub["repo_id"]  # with the user's namespace filled in
    if private and not getattr(api.repo_info(repo_id, repo_type="model"), "private", True):
        # create_repo leaves an existing repository as it is: publishing weights the recipe calls private is
        # not something to do by accident
        raise PostrainError(f"hub repository {repo_id} exists and is public, but hub.private is true; make the "
                            f"repository private, or set hub.private: false to publish into it")
    revision = hub.get("revision")
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                               commit_message=hub.get("commit_message") or commit_message)
    return {"repo_id": repo_id, "revision": revision, "private": private,
            "commit": getattr(commit, "oid", None), "url": getattr(commit, "commit_url", None) or str(repo)}


def push_run(run_dir: Path, hub: dict | None = None) -> dict[str, Any] | None:
    """Push a finished run's model folder as its recipe's `hub:` (or `hub`, if given) says; record the outcome in
    status.json (`pushed`, or `push_error` and a PostrainError that says the model is saved). None when there is
    no repo_id."""
    run_dir = Path(run_dir)
    recipe = read_recipe(run_dir)
    hub = hub if hub is not None else hub_target(recipe)
    if hub is None:
        return None
    folder = run_dir / MODEL_SUBDIR
    env = read_json(run_dir / "env.json") or {}
    message = (f"postrain {recipe.get('command') or env.get('command') or ''} {recipe.get('name') or run_dir.name} "
               f"(recipe {env.get('recipe_hash') or '?'})")
    try:
        pushed = push_model(folder, hub, message)
    except Exception as e:  # noqa: BLE001  any failure of the upload (network, auth, the hub): the model stays
        status = read_status(run_dir)
        write_json(run_dir / "status.json", {**status, "push_error": f"{type(e).__name__}: {e}"[:500]})
        raise PostrainError(
            f"the run finished and its model is saved in {folder}, but pushing it to the hub repository "
            f"{hub['repo_id']} failed: {type(e).__name__}: {e}. Once the cause is fixed (e.g. `hf auth login`, the "
            f"network), push it with: postrain push {run_dir}") from e
    status = {k: v for k, v in read_status(run_dir).items() if k != "push_error"}
    write_json(run_dir / "status.json", {**status, "pushed": pushed})
    print(f"pushed {folder} to {pushed['url'] or pushed['repo_id']}", flush=True)
    return pushed


def push_finished_run(run_dir: Path, repo_id: str | None = None, revision: str | None = None) -> dict[str, Any]:
    """`postrain push RUN`: push a finished run's model folder as its recipe's `hub:` says, `repo_id` / `revision`
    given here overriding it (a run trained without hub.repo_id can be pushed too). A model folder without a
    card (a run from before model cards) gets one first."""
    run_dir = Path(run_dir)
    if run_kind(run_dir) == "pipeline":
        raise PostrainError(f"{run_dir} is a pipeline directory; push one of its stages: postrain push {run_dir}/<stage>")
    recipe = read_recipe(run_dir)
    if recipe.get("command") not in HUB_COMMANDS:
        raise PostrainError(f"{run_dir} is a `{recipe.get('command')}` run, which writes no model to push "
                            f"(sft, dpo, grpo and merge runs do)")
    status = read_status(run_dir).get("status")
    if status != "done" or not (run_dir / MODEL_SUBDIR / "config.json").is_file():
        raise PostrainError(f"{run_dir} has not finished (status {status}); only a finished run's model is pushed")
    hub = {**dataclasses.asdict(HubSpec()), **(recipe.get("hub") or {})}
    hub.update({k: v for k, v in (("repo_id", repo_id), ("revision", revision)) if v is not None})
    if not hub.get("repo_id"):
        raise PostrainError(f"the recipe of {run_dir} has no hub.repo_id: name the repository with --repo-id "
                            f"(e.g. --repo-id your-name/{recipe.get('name') or run_dir.name})")
    check_hub_section(recipe["command"], {"hub": hub}, {"hub.repo_id": "--repo-id" if repo_id else "recipe.yaml"})
    if not (run_dir / MODEL_SUBDIR / CARD_FILE).is_file():
        write_model_card(run_dir)
    return push_run(run_dir, hub)


def push_after_run(recipe, run_dir: Path, main_process: bool = True) -> None:
    """The jobs' call after a run finished: push when the recipe has a hub.repo_id, on the main process only."""
    if main_process and hub_target(recipe.cfg) is not None:
        push_run(run_dir, hub_target(recipe.cfg))
