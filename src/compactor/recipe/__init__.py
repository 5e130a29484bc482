"""Recipes: validated data (YAML <-> configs) and the runner that applies them."""

from compactor.recipe.schema import Recipe, load_recipe
from compactor.recipe.runner import run_recipe

__all__ = ["Recipe", "load_recipe", "run_recipe"]
