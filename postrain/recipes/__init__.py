"""Recipes: the vocabulary (schema), reading, layering (`defaults:`), overrides, schema validation, the hash.

The full load a command does (read + the job's own checks) is postrain.jobs.load_recipe.
"""

from postrain.recipes.loader import Recipe, find_recipe, read_recipe, recipe_hash, recipes_root

__all__ = ["Recipe", "find_recipe", "read_recipe", "recipe_hash", "recipes_root"]
