import pytest
import yaml

from compactor.errors import ConfigError
from compactor.evaluate.step import EvaluateConfig
from compactor.recipe.schema import Recipe, load_recipe

BASE = {"model": "m", "stages": [{"name": "s", "steps": [{"evaluate": {}}]}]}


def test_round_trip_yaml():
    r = Recipe.from_dict({**BASE, "eval": {"tokens": 1024, "window": 128}})
    again = Recipe.from_dict(yaml.safe_load(r.to_yaml()))
    assert again.to_dict() == r.to_dict()
    assert isinstance(again.stages[0].steps[0].config, EvaluateConfig)
    assert again.eval.tokens == 1024


@pytest.mark.parametrize("data,match", [
    ({**BASE, "modle": "x"}, "unknown key 'modle'; allowed keys: model"),
    ({**BASE, "eval": {"tokenz": 5}}, "eval: unknown key 'tokenz'; allowed keys: data, tokens"),
    ({**BASE, "eval": {"bos": "always"}}, "eval.bos: got 'always', expected one of 'auto', 'none', 'prepend'"),
    ({**BASE, "eval": {"tokens": "many"}}, "eval.tokens: got 'many'"),
    ({**BASE, "eval": {"tokens": 10}}, r"eval.tokens \(10\) must be >= eval.window"),
    ({**BASE, "stages": [{"name": "s", "steps": [{"evaluate": {"sorce": "x"}}]}]},
     r"stages\[0\].steps\[0\]: evaluate: unknown key 'sorce'; allowed keys: source, against, label"),
    ({**BASE, "stages": [{"name": "s", "steps": [{"evaluate": {"against": "teacher"}}]}]},
     "evaluate.against: got 'teacher', expected one of 'reference', 'none'"),
    ({**BASE, "stages": [{"name": "s", "steps": [{"quantise": {}}]}]}, "unknown step 'quantise'; known steps: "),
    ({**BASE, "stages": []}, "'stages' must be a non-empty list"),
    ({"stages": BASE["stages"]}, "'model' is required"),
    ({**BASE, "stages": [{"name": "s", "steps": [{"evaluate": {}, "extra": {}}]}]}, "one-key mapping"),
])
def test_bad_recipes_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        Recipe.from_dict(data)


def test_load_recipe_errors(tmp_path):
    from compactor.errors import CompactorError

    with pytest.raises(CompactorError, match="recipe not found"):
        load_recipe(tmp_path / "none.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2:1: not valid YAML \(expected"):
        load_recipe(p)


def test_demo_recipe_is_valid():
    from pathlib import Path

    r = load_recipe(Path(__file__).parents[2] / "recipes" / "demo.yaml")
    assert r.model == "smollm2-135m"
