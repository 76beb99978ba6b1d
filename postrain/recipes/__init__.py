"""Recipes: load, layer (`defaults:`), override, validate, save the resolved config."""

from postrain.recipes.loader import Recipe, find_recipe, load_recipe, load_smoke_recipe, recipe_hash, recipes_root

__all__ = ["Recipe", "find_recipe", "load_recipe", "load_smoke_recipe", "recipe_hash", "recipes_root"]
