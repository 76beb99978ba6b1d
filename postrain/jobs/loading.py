"""The full load a command does: read the recipe (postrain.recipes.loader: layers, overrides, the schema), then the
job's own load-time checks (`check(cfg, origins)` of the command's job module, reached through the per-command
table postrain.jobs.JOB_MODULES), the keys nothing reads (postrain.recipes.unread) and the liveness of its method
steps (postrain.jobs.liveness). The command line, pipelines and `postrain recipes --check` load through here.
"""

from __future__ import annotations

from pathlib import Path

from postrain.data.transforms import keys_besides_fields
from postrain.jobs.table import job_module
from postrain.jobs.liveness import report
from postrain.jobs.smoke import smoke_layer
from postrain.recipes.loader import COMMAND_LINE, Recipe, read_recipe
from postrain.recipes.unread import unread_keys
from postrain.trainers import config_class


def check_recipe(recipe: Recipe) -> None:
    """The load-time checks of the recipe's job: a RecipeError naming the key and the file that set it."""
    job_module(recipe.command).check(recipe.cfg, recipe.origins)


def load_recipe(path: str | Path | None, overrides: list[str] | dict | None = None, command: str | None = None,
                liveness: bool = True) -> Recipe:
    """Read a recipe (postrain.recipes.loader.read_recipe), run its job's checks and note the keys it sets that
    nothing reads (`warnings`). `liveness` reports method steps the batch layout leaves inert (postrain.jobs.liveness;
    as the recipe's `liveness:` key says: a warning, or a RecipeError)."""
    recipe = read_recipe(path, overrides, command, config_class=config_class, other_keys=keys_besides_fields)
    check_recipe(recipe)
    recipe.warnings = unread_keys(recipe.command, recipe.cfg, recipe.origins, own=(str(recipe.path), COMMAND_LINE))
    if liveness:
        recipe.liveness = report(recipe.command, recipe.cfg, recipe.origins, recipe.path)
    return recipe


def load_smoke_recipe(path: str | Path, overrides: list[str] | dict | None = None, command: str | None = None,
                      data_wins: bool = False) -> Recipe:
    """Load a recipe with the `--smoke` layer: tiny model, built-in data, a few steps (postrain.jobs.smoke).

    The layer sits below the overrides, so a user's explicit override still applies. With `data_wins` (pipeline
    stages) its datasets go above the overrides: a stage reading an earlier smoke stage's samples would find
    no usable data (an untrained model's samples give no preference pairs), while models still flow on. The recipe
    is read once without the layer to build it (unchecked: the checks judge the recipe that runs), then with it and
    checked. Liveness is not judged: the layout is the smoke layer's, not the recipe's.
    """
    first = read_recipe(path, overrides, command, config_class=config_class, other_keys=keys_besides_fields)
    layer = smoke_layer(first.command, first.cfg)
    top = {k: layer[k] for k in ("data", "sets") if k in layer} if data_wins else None
    smoked = read_recipe(path, overrides, command, config_class=config_class, other_keys=keys_besides_fields, smoke_layer=layer, top_layer=top)
    check_recipe(smoked)
    # The recipe's own unread keys, not the ones the smoke layer makes unread (it turns checkpoints off).
    smoked.warnings = unread_keys(first.command, first.cfg, first.origins, own=(str(first.path), COMMAND_LINE))
    return smoked
