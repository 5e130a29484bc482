"""Every recipe shipped in recipes/ validates (unknown keys and bad values would be rejected)."""

from pathlib import Path

import pytest

from compactor.recipe import load_recipe
from compactor.registry import lookup_config

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates(path):
    from compactor.recipe.task import STEPS, TaskRecipe

    r = load_recipe(path)
    if isinstance(r, TaskRecipe):  # an encoder's pipeline: its own steps
        assert r.stages and all(type(s) in STEPS.values() for st in r.stages for s in st.steps)
        return
    assert r.stages and all(lookup_config(s.config) for st in r.stages for s in st.steps)
