"""Recipes: the typed schema, the YAML loader (moerge and mergekit formats), parameter resolution."""

from moerge.recipe.loader import LoadedRecipe, load_recipe
from moerge.recipe.schema import ModelEntry, Recipe, Slice, SliceSource

__all__ = ["LoadedRecipe", "ModelEntry", "Recipe", "Slice", "SliceSource", "load_recipe"]
