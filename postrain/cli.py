"""The `postrain` command line: one small function per subcommand.

Heavy libraries (torch, transformers, trl) are imported only inside the jobs, so `--help`, `config`, `recipes`
and `--dry-run` answer at once.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from postrain.errors import PostrainError
from postrain.registry import FAMILIES, suggest

app = typer.Typer(
    name="postrain",
    help="Recipe-driven LLM post-training over Hugging Face TRL.\n\n"
    "Every job reads a YAML recipe; any key can be overridden as key=value, e.g.\n\n"
    "  postrain grpo recipes/math.yaml trainer.learning_rate=1e-6",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

RecipeArg = typer.Argument(..., help="Recipe file (a path, or a name under recipes/).")
OverridesArg = typer.Argument(None, help="key=value overrides (OmegaConf dotlist), applied last.")
DryRun = typer.Option(False, "--dry-run", help="Validate the recipe and print the plan; load no weights.")
Smoke = typer.Option(False, "--smoke", help="Run a few steps on the embedded tiny model and built-in data.")
Overwrite = typer.Option(False, "--overwrite", help="Replace an existing run directory.")
Resume = typer.Option(False, "--resume", help="Continue the run in an existing run directory (same recipe).")


NumProcesses = typer.Option(None, "--num-processes", help="Processes per machine (one per GPU): sets "
                            "launch.num_processes and runs under accelerate launch.")
LaunchConfig = typer.Option(None, "--launch-config", help="ddp, fsdp2, fsdp2_offload, zero2, zero3, zero3_offload, "
                            "or an accelerate config file: sets launch.config.")


def _fail(message: str, code: int = 2) -> None:
    # slow: omegaconf (through postrain.recipes, ~90 ms), --help does not need it
    from postrain.launch.launcher import record_rank_error

    if record_rank_error(message, code):  # a worker of postrain's launch: the calling process reports it, naming
        raise typer.Exit(code=code)     # the first failing rank
    # The message is plain text: it quotes recipe values like `[lo, hi]` that rich markup would swallow.
    err_console.print(Text("error: ", style="bold red") + Text(message), highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


def load(recipe: str, overrides: list[str] | None, command: str | None, smoke: bool = False):
    # slow: torch (through postrain.jobs), --help must not load it
    from postrain.jobs import load_recipe, load_smoke_recipe

    loaded = load_smoke_recipe(recipe, overrides or [], command) if smoke else load_recipe(recipe, overrides or [],
                                                                                          command)
    warn(loaded.warnings)
    return loaded


def warn(warnings: list[str]) -> None:
    """`warning: ...` lines on stderr (recipe keys set but never read), before the job starts."""
    for message in warnings:
        err_console.print(Text("warning: ", style="bold yellow") + Text(message), highlight=False, soft_wrap=True)


def _launch_overrides(overrides: list[str] | None, num_processes: int | None, launch_config: str | None) -> list[str]:
    """The --num-processes / --launch-config options as the `launch.*` overrides they stand for (applied last)."""
    extra = [f"launch.num_processes={num_processes}"] if num_processes is not None else []
    extra += [f"launch.config={launch_config}"] if launch_config is not None else []
    return [*(overrides or []), *extra]


def _worker_args(name: str, recipe: str, overrides: list[str], smoke: bool, overwrite: bool, resume: bool,
                 stage: str | None = None) -> list[str]:
    """The command line each launched worker runs: this one, with the --num-processes / --launch-config options
    already turned into overrides."""
    flags = [flag for flag, on in (("--smoke", smoke), ("--overwrite", overwrite), ("--resume", resume)) if on]
    return [name, recipe, *overrides, *flags, *(["--stage", stage] if stage else [])]


def _job(command: str, recipe: str, overrides, dry_run: bool, smoke: bool, overwrite: bool, resume: bool,
         stage: str | None = None) -> None:
    # slow: torch (through postrain.jobs), --help must not load it
    from postrain.jobs.signals import Interrupted
    # slow: omegaconf (through postrain.recipes, ~90 ms), --help does not need it
    from postrain.launch.launcher import launched_worker, record_rank_error

    started = time.time()  # the run's wall time counts from here: loading and checking the recipe included
    try:
        recipe_obj = load(recipe, overrides, command, smoke)
        name = "run" if command == "pipeline" else command
        worker_args = _worker_args(name, recipe, list(overrides or []), smoke, overwrite, resume, stage)
        if dry_run:
            _print_plan(recipe_obj, worker_args)
            return
        # slow: torch (through postrain.jobs), --help must not load it
        from postrain.jobs import RunOptions, run_job

        cmdline = " ".join(shlex.quote(a) for a in ["postrain", *sys.argv[1:]])
        options = RunOptions(overwrite=overwrite, resume=resume, command_line=cmdline, smoke=smoke,
                             overrides=list(overrides or []), stage=stage, started=started)
        # slow: omegaconf (through postrain.recipes, ~90 ms), --help does not need it
        from postrain.launch.launcher import launch_section, needs_launch

        if command != "pipeline" and needs_launch(launch_section(recipe_obj.cfg)):  # a pipeline launches per stage
            # slow: torch (through postrain.jobs), --help must not load it
            from postrain.jobs.common import run_launched

            run_launched(recipe_obj, options, worker_args)
            console.print(f"[green]done[/]: {recipe_obj.cfg['output_dir']}")
            return
        result = run_job(recipe_obj, options)
        if not launched_worker():  # the calling process of a launch says it once
            console.print(f"[green]done[/]: {result.get('run_dir', '')}")
    except PostrainError as e:
        _fail(str(e), getattr(e, "exit_code", 2))
    except Interrupted as e:  # SIGTERM / SIGINT: the run is marked interrupted (postrain.jobs.signals)
        if not launched_worker():  # the calling process of a launch says it once
            err_console.print(Text("stopped: ", style="bold yellow") + Text(str(e)), highlight=False,
                              soft_wrap=True)
        raise typer.Exit(code=e.exit_code) from None
    except Exception as e:  # a bug or a library error: a worker of a launch leaves it, traceback and all, for the
        # calling process, which prints the first failure only (not the peers that lost it)
        if record_rank_error(f"{type(e).__name__}: {e}", 1, traceback.format_exc()):
            raise typer.Exit(code=1) from None
        raise


def _print_plan(recipe_obj, worker_args: list[str] | None = None) -> None:
    # slow: torch (through postrain.jobs), --help must not load it
    from postrain.jobs.plan import plan

    rows = plan(recipe_obj, worker_args=worker_args)
    command = rows.get("launch", "")
    if command.startswith("accelerate launch"):  # printed whole below the table, to be copied as it is
        rows["launch"] = "accelerate launch (the command below)"
    table = Table(title=f"plan: {recipe_obj.cfg['name']}", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows.items():
        table.add_row(key, str(value))
    console.print(table)
    if command.startswith("accelerate launch"):
        typer.echo(f"launch command:\n  {command}")
    console.print("[green]recipe is valid[/] (dry run: nothing loaded, nothing written)")


@app.command(epilog="Example: postrain sft recipes/demo/sft.yaml trainer.num_train_epochs=2")
def sft(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg, dry_run: bool = DryRun,
        smoke: bool = Smoke, overwrite: bool = Overwrite, resume: bool = Resume,
        num_processes: Optional[int] = NumProcesses,
        launch_config: Optional[str] = LaunchConfig) -> None:
    """Supervised fine-tuning (TRL SFTTrainer)."""
    _job("sft", recipe, _launch_overrides(overrides, num_processes, launch_config), dry_run, smoke, overwrite,
         resume)


@app.command(epilog="Example: postrain dpo recipes/demo/dpo.yaml trainer.beta=0.1 'trainer.loss_type=[ipo]'")
def dpo(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg, dry_run: bool = DryRun,
        smoke: bool = Smoke, overwrite: bool = Overwrite, resume: bool = Resume,
        num_processes: Optional[int] = NumProcesses,
        launch_config: Optional[str] = LaunchConfig) -> None:
    """Preference optimization (TRL DPOTrainer): TRL's loss_type, or registry losses with loss: [...]."""
    _job("dpo", recipe, _launch_overrides(overrides, num_processes, launch_config), dry_run, smoke, overwrite,
         resume)


@app.command(epilog="Example: postrain grpo recipes/math.yaml trainer.learning_rate=1e-6")
def grpo(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg, dry_run: bool = DryRun,
         smoke: bool = Smoke, overwrite: bool = Overwrite, resume: bool = Resume,
         num_processes: Optional[int] = NumProcesses,
         launch_config: Optional[str] = LaunchConfig) -> None:
    """Online RL (TRL GRPOTrainer) with recipe rewards; registry parts with method: / rl: {...}."""
    _job("grpo", recipe, _launch_overrides(overrides, num_processes, launch_config), dry_run, smoke, overwrite,
         resume)


@app.command(name="eval", epilog="Example: postrain eval recipes/demo/eval.yaml model.name_or_path=runs/demo/sft")
def eval_(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg, dry_run: bool = DryRun,
          smoke: bool = Smoke, overwrite: bool = Overwrite) -> None:
    """Generate on eval sets and score with reward functions (accuracy, unparsable, length)."""
    _job("eval", recipe, overrides, dry_run, smoke, overwrite, False)


@app.command(epilog="Example: postrain merge recipes/demo/merge.yaml merge.merge_method=slerp")
def merge(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg, dry_run: bool = DryRun,
          smoke: bool = Smoke, overwrite: bool = Overwrite) -> None:
    """Merge models with mergekit (linear, slerp, task_arithmetic, ties, dare_ties, ...)."""
    _job("merge", recipe, overrides, dry_run, smoke, overwrite, False)


@app.command(epilog="Example: postrain run recipes/demo/pipeline.yaml")
def run(pipeline: str = typer.Argument(..., help="Pipeline recipe (command: pipeline)."),
        overrides: Optional[list[str]] = OverridesArg, dry_run: bool = DryRun, smoke: bool = Smoke,
        overwrite: bool = Overwrite,
        resume: bool = typer.Option(False, "--resume", help="With --stage: continue that stage's run directory."),
        stage: Optional[str] = typer.Option(None, "--stage", help="Run this stage alone (the stages it reads must "
                                            "have run); a stage with a launch: section runs so under accelerate.")
        ) -> None:
    """Run a pipeline of stages; finished stages with an unchanged recipe are skipped (resume)."""
    if resume and stage is None:
        _fail("--resume applies to one stage (--stage NAME); a pipeline resumes by itself: finished stages are "
              "skipped and an interrupted one continues from its last checkpoint")
    _job("pipeline", pipeline, overrides, dry_run, smoke, overwrite, resume, stage)


@app.command(name="vllm-serve", epilog="Example: postrain vllm-serve recipes/math.yaml trainer.vllm_server_port=8001")
def vllm_serve(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg, dry_run: bool = typer.Option(
                   False, "--dry-run", help="Print the vLLM server command; start nothing."),
               vllm_args: str = typer.Option("", "--vllm-args", help="Further `vllm serve` arguments, as one "
                                             "string (e.g. \"--enforce-eager --max-num-seqs 64\").")) -> None:
    """Start TRL's vLLM server for a GRPO recipe with trainer.vllm_mode: server (its model and vLLM settings)."""
    # slow: torch (through postrain.jobs), --help must not load it
    from postrain.jobs.common import quiet_libraries
    # slow: postrain.launch.vllm (model loading helpers, ~15 ms), --help does not need it
    from postrain.launch.vllm import check_serve_installed, serve, serve_command
    quiet_libraries()  # the tiny model may be built first: no progress bars around the printed command
    try:
        recipe_obj = load(recipe, overrides, "grpo")
        if not dry_run:
            check_serve_installed()
        extra = shlex.split(vllm_args)
        command = serve_command(recipe_obj.cfg, recipe_obj.origins, extra)
        shown = shlex.join(["VLLM_SERVER_DEV_MODE=1", "vllm", *command[command.index("serve"):]])
        if dry_run:
            typer.echo(shown)
            return
        err_console.print(f"starting: {shown}", highlight=False, markup=False, soft_wrap=True)
        serve(recipe_obj.cfg, recipe_obj.origins, extra)
    except PostrainError as e:
        _fail(str(e))


@app.command(epilog="Example: postrain config recipes/math.yaml trainer.learning_rate=1e-6")
def config(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg, smoke: bool = Smoke) -> None:
    """Print the fully resolved recipe (defaults, inheritance, overrides, interpolation); run nothing."""
    try:
        recipe_obj = load(recipe, overrides, None, smoke)
    except PostrainError as e:
        _fail(str(e))
    typer.echo(f"# {recipe_obj.path}  (command: {recipe_obj.command}, hash: {recipe_obj.hash})")
    typer.echo(recipe_obj.to_yaml(), nl=False)


@app.command(epilog="Example: postrain recipes --papers; postrain recipes --check --strict; "
                     "postrain recipes --inherited lite_ppo")
def recipes(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
            papers: bool = typer.Option(False, "--papers", help="Only the recipes that reproduce a paper."),
            root: Optional[Path] = typer.Option(None, help="Folder to list (default: recipes/)."),
            check: bool = typer.Option(False, "--check", help="Load every recipe (a pipeline: each stage) and report "
                                       "the method steps its batch layout leaves inert (liveness)."),
            strict: bool = typer.Option(False, "--strict", help="With --check: exit 2 when a step is inert (and its "
                                        "recipe's header does not say why) or a recipe does not load."),
            inherited: Optional[str] = typer.Option(None, "--inherited", metavar="RECIPE", help="List the fields "
                                                    "RECIPE (a path, or a paper recipe's name) does not set itself: "
                                                    "from base recipes, its method, postrain's and the registry "
                                                    "entries' defaults, and library defaults.")) -> None:
    """List the recipes under recipes/: command, method or losses, model and, for paper recipes, the paper."""
    if inherited is not None:
        _recipes_inherited(inherited, as_json)
        return
    if check:
        _recipes_check(root, papers, strict, as_json)
        return
    # slow: omegaconf (through postrain.recipes, ~90 ms), --help does not need it
    from postrain.recipes.catalog import list_recipes

    rows = [r for r in list_recipes(root) if r.get("paper") or not papers]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{'paper ' if papers else ''}recipes ({len(rows)})")
    for col in ("recipe", "command", "method / losses", "model", "paper", "arXiv"):
        table.add_column(col, overflow="fold", no_wrap=col in ("recipe", "command", "model", "arXiv"))
    for r in rows:
        table.add_row(r["path"], r["command"] or "?", r["method"], r["model"] or "", r.get("paper") or "",
                      r.get("arxiv") or "")
    Console(width=max(console.width, 160)).print(table)  # six columns: fold within a wide table, not a narrow one


def _recipes_check(root: Optional[Path], papers: bool, strict: bool, as_json: bool) -> None:
    """`postrain recipes --check`: liveness of every recipe (pipelines stage by stage, as the pipeline loads them)."""
    # slow: torch (through postrain.jobs), --help must not load it
    from postrain.jobs.catalog import check_recipes
    from postrain.jobs.pipeline import stage_recipe

    rows = check_recipes(root, papers, stage_loader=lambda pipeline, name, stage: stage_recipe(pipeline, name, stage,
                                                                                                 smoke=False))
    bad = [r for r in rows if r["findings"] or r["error"]]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            what = r["path"] + (f" (stage {r['stage']})" if r["stage"] else "")
            for message in ([f"does not load: {r['error']}"] if r["error"] else r["findings"]):
                typer.echo(f"{what}: {message}")
            for message in r["documented"]:
                typer.echo(f"{what}: (explained in its header) {message}")
        typer.echo(f"{len(rows)} recipe(s) or stage(s) checked: {sum(len(r['findings']) for r in rows)} inert "
                   f"step(s), {sum(len(r['documented']) for r in rows)} explained in their recipe's header, "
                   f"{sum(1 for r in rows if r['error'])} that do not load")
    if strict and bad:
        raise typer.Exit(code=2)


def _recipes_inherited(ref: str, as_json: bool) -> None:
    """`postrain recipes --inherited RECIPE`: the fields RECIPE leaves to others, grouped by where they come from."""
    # slow: torch (through postrain.jobs), --help must not load it
    from postrain.jobs import load_recipe
    from postrain.jobs.catalog import inherited_fields
    # slow: omegaconf (through postrain.recipes, ~90 ms), --help does not need it
    from postrain.recipes.catalog import resolve_recipe

    try:
        recipe = load_recipe(resolve_recipe(ref), liveness=False)
    except PostrainError as e:
        _fail(str(e))
    rows = inherited_fields(recipe)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    typer.echo(f"# {recipe.path}: {len(rows)} field(s) it does not set itself")
    for source in ("base recipe", "method", "postrain default", "entry default", "library default"):
        group = [r for r in rows if r["source"] == source]
        if not group:
            continue
        typer.echo(f"\n## {source} ({len(group)})")
        if source == "library default":  # many: one line each, grouped by the library's class
            for origin in dict.fromkeys(r["from"] for r in group):
                typer.echo(f"{origin}:")
                typer.echo("  " + ", ".join(f"{r['key'].split('.', 1)[1]}={r['value']!r}" for r in group
                                            if r["from"] == origin))
            continue
        width = max(len(r["key"]) for r in group)
        for r in group:
            typer.echo(f"  {r['key']:<{width}}  {r['value']!r:<24}  {r['from']}")


@app.command(epilog="Example: postrain variants --family preference --json")
def variants(family: Optional[str] = typer.Option(None, "--family", help="Only this family (e.g. preference, advantage)."),
             as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the registered method parts: preference losses, advantages, policy losses, aggregations, ..."""
    # slow: torch (through postrain.variants), --help must not load it
    from postrain.variants import all_variants

    rows = [v.as_dict() for v in all_variants(family)]
    if family is not None and family not in FAMILIES:
        _fail(f"unknown family {family!r}: {suggest(family, FAMILIES, 'families')}")
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title=f"variants ({len(rows)})")
    # old_logps: the behaviour log-probs, pi_old of an importance ratio (under vLLM the trainer's own, see README)
    for col in ("name", "family", "paper", "arXiv", "parameters (paper defaults)", "reads old_logps"):
        table.add_column(col, overflow="fold")
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        reads = {True: "yes", False: "no", None: "?"}[r["reads_behaviour_logps"]]
        table.add_row(r["name"], r["family"], r["paper"], r["arxiv"], params, reads)
    console.print(table)


@app.command(epilog="Example: postrain plot runs/grpo-a runs/grpo-b -o grpo.png")
def plot(runs: list[Path] = typer.Argument(..., help="Run directories (a pipeline directory: its training stages)."),
         output: Path = typer.Option(Path("curves.png"), "-o", "--output", help="The PNG to write; the plotted "
                                     "points go beside it as .json."),
         overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing figure.")) -> None:
    """Training curves (reward, task metric, KL, entropy, length, clip fraction, loss, ...) of runs, overlaid."""
    from postrain.reports.plot import plot as plot_runs  # slow: postrain.reports.plot (~40 ms), --help does not need it

    try:
        result = plot_runs(runs, output, overwrite)
    except PostrainError as e:
        _fail(str(e))
    for note in result.notes:
        err_console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"[green]wrote[/] {result.png} ({len(result.curves)} curves) and {result.data}")


@app.command(epilog="Example: postrain report runs/demo")
def report(run: Path = typer.Argument(..., help="A run directory, or a pipeline directory (every stage)."),
           output: Optional[Path] = typer.Option(None, "-o", "--output", help="The Markdown file to write "
                                                 "(default: RUN/report.md); figures go to <name>_files/ beside it."),
           samples: int = typer.Option(3, "--samples", help="Sample completions shown per eval set."),
           overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing report.")) -> None:
    """A one-page Markdown report: recipe, lineage, final metrics, curves and sample completions."""
    # slow: omegaconf (through postrain.recipes, ~90 ms), --help does not need it
    from postrain.reports.report import write_report

    try:
        path = write_report(run, output, overwrite, samples)
    except PostrainError as e:
        _fail(str(e))
    console.print(f"[green]wrote[/] {path}")


@app.command(epilog="Example: postrain push runs/demo-sft --repo-id your-name/demo-sft")
def push(run: Path = typer.Argument(..., help="A finished sft, dpo, grpo or merge run directory."),
         repo_id: Optional[str] = typer.Option(None, "--repo-id", help="The hub repository (default: the recipe's "
                                               "hub.repo_id)."),
         revision: Optional[str] = typer.Option(None, "--revision", help="A branch (default: the recipe's "
                                                "hub.revision, else the default branch).")) -> None:
    """Upload a finished run's model folder (weights, tokenizer, model card) to the Hugging Face hub; also retries a
    push that failed after a run."""
    # slow: torch (through postrain.jobs), --help must not load it
    from postrain.jobs.hub import push_finished_run

    try:
        push_finished_run(run, repo_id, revision)
    except PostrainError as e:
        _fail(str(e))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
