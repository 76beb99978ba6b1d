"""The `postrain` command line: one small function per subcommand.

Heavy libraries (torch, transformers, trl) are imported only inside the jobs, so `--help`, `config`, `recipes`
and `--dry-run` answer at once.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from postrain.errors import PostrainError

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


def _fail(message: str) -> None:
    from rich.text import Text

    # The message is plain text: it quotes recipe values like `[lo, hi]` that rich markup would swallow.
    err_console.print(Text("error: ", style="bold red") + Text(message), highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def load(recipe: str, overrides: list[str] | None, command: str | None, smoke: bool = False):
    from postrain.recipes import load_recipe, load_smoke_recipe

    if smoke:
        return load_smoke_recipe(recipe, overrides or [], command)
    return load_recipe(recipe, overrides or [], command)


def _job(command: str, recipe: str, overrides, dry_run: bool, smoke: bool, overwrite: bool, resume: bool) -> None:
    try:
        recipe_obj = load(recipe, overrides, command, smoke)
        if dry_run:
            _print_plan(recipe_obj)
            return
        from postrain.jobs import RunOptions, run_job

        cmdline = " ".join(shlex.quote(a) for a in ["postrain", *sys.argv[1:]])
        result = run_job(recipe_obj, RunOptions(overwrite=overwrite, resume=resume, command_line=cmdline, smoke=smoke))
        console.print(f"[green]done[/]: {result.get('run_dir', '')}")
    except PostrainError as e:
        _fail(str(e))


def _print_plan(recipe_obj) -> None:
    from postrain.jobs.plan import plan

    table = Table(title=f"plan: {recipe_obj.cfg['name']}", show_header=False)
    for key, value in plan(recipe_obj).items():
        table.add_row(key, str(value))
    console.print(table)
    console.print("[green]recipe is valid[/] (dry run: nothing loaded, nothing written)")


@app.command(epilog="Example: postrain sft recipes/demo/sft.yaml trainer.num_train_epochs=2")
def sft(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg, dry_run: bool = DryRun,
        smoke: bool = Smoke, overwrite: bool = Overwrite, resume: bool = Resume) -> None:
    """Supervised fine-tuning (TRL SFTTrainer)."""
    _job("sft", recipe, overrides, dry_run, smoke, overwrite, resume)


@app.command(epilog="Example: postrain dpo recipes/demo/dpo.yaml trainer.beta=0.1 'trainer.loss_type=[ipo]'")
def dpo(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg, dry_run: bool = DryRun,
        smoke: bool = Smoke, overwrite: bool = Overwrite, resume: bool = Resume) -> None:
    """Preference optimization (TRL DPOTrainer): TRL's loss_type, or registry losses with loss: [...]."""
    _job("dpo", recipe, overrides, dry_run, smoke, overwrite, resume)


@app.command(epilog="Example: postrain grpo recipes/math.yaml trainer.learning_rate=1e-6")
def grpo(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg, dry_run: bool = DryRun,
         smoke: bool = Smoke, overwrite: bool = Overwrite, resume: bool = Resume) -> None:
    """Online RL (TRL GRPOTrainer) with recipe rewards; registry parts with method: / rl: {...}."""
    _job("grpo", recipe, overrides, dry_run, smoke, overwrite, resume)


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
        overwrite: bool = Overwrite) -> None:
    """Run a pipeline of stages; finished stages with an unchanged recipe are skipped (resume)."""
    _job("pipeline", pipeline, overrides, dry_run, smoke, overwrite, False)


@app.command(epilog="Example: postrain config recipes/math.yaml trainer.learning_rate=1e-6")
def config(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg, smoke: bool = Smoke) -> None:
    """Print the fully resolved recipe (defaults, inheritance, overrides, interpolation); run nothing."""
    try:
        recipe_obj = load(recipe, overrides, None, smoke)
    except PostrainError as e:
        _fail(str(e))
    typer.echo(f"# {recipe_obj.path}  (command: {recipe_obj.command}, hash: {recipe_obj.hash})")
    typer.echo(recipe_obj.to_yaml(), nl=False)


@app.command(epilog="Example: postrain recipes --json")
def recipes(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
            papers: bool = typer.Option(False, "--papers", help="Only the recipes that reproduce a paper."),
            root: Optional[Path] = typer.Option(None, help="Folder to list (default: recipes/).")) -> None:
    """List the recipes under recipes/: command, method or losses, model and, for paper recipes, the paper."""
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


@app.command(epilog="Example: postrain variants --family preference --json")
def variants(family: Optional[str] = typer.Option(None, "--family", help="Only this family (e.g. preference, advantage)."),
             as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the registered method parts: preference losses, advantages, policy losses, aggregations, ..."""
    from postrain.registry import FAMILIES, all_variants, suggest

    rows = [v.as_dict() for v in all_variants(family)]
    if family is not None and family not in FAMILIES:
        _fail(f"unknown family {family!r}: {suggest(family, FAMILIES, 'families')}")
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title=f"variants ({len(rows)})")
    for col in ("name", "family", "paper", "arXiv", "parameters (paper defaults)"):
        table.add_column(col, overflow="fold")
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        table.add_row(r["name"], r["family"], r["paper"], r["arxiv"], params)
    console.print(table)


@app.command(epilog="Example: postrain plot runs/grpo-a runs/grpo-b -o grpo.png")
def plot(runs: list[Path] = typer.Argument(..., help="Run directories (a pipeline directory: its training stages)."),
         output: Path = typer.Option(Path("curves.png"), "-o", "--output", help="The PNG to write; the plotted "
                                     "points go beside it as .json."),
         overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing figure.")) -> None:
    """Training curves (reward, task metric, KL, entropy, length, clip fraction, loss, ...) of runs, overlaid."""
    from postrain.reports.plot import plot as plot_runs

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
    from postrain.jobs.hub import push_finished_run

    try:
        push_finished_run(run, repo_id, revision)
    except PostrainError as e:
        _fail(str(e))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
