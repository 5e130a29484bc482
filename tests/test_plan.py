"""The memory plan: estimated from the config before any weight loads, enforced by a cap."""

import pytest

from compactor.cli import main
from compactor.errors import CompactorError
from compactor.models.adapters import adapter_for
from compactor.models.stream import load_skeleton
from compactor.plan import plan_memory
from compactor.recipe.runner import run_recipe
from compactor.recipe.schema import Recipe


def _plan(tiny_dir, **kw):
    sk = load_skeleton(tiny_dir)
    args = dict(streamed=False, statistics={"hessian"}, calib=(128, 512), eval_windows=(16, 512),
                reference=True, base_rss=100 * 10**6, max_memory="100GB")
    args.update(kw)
    return plan_memory(sk, adapter_for(sk), **args)


def test_plan_items_scale_with_what_is_held(tiny_dir):
    mem, streamed = _plan(tiny_dir), _plan(tiny_dir, streamed=True)
    items = dict(mem.items)
    n_params = 258 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64
    assert items["model weights in memory (float32)"] == n_params * 4
    assert "reference model in memory (float32)" in items
    layer = dict(streamed.items)["largest decoder layer (streamed; float32, shadow, codes)"]
    assert layer == 36992 * 4 * 2 < items["model weights in memory (float32)"]
    assert "reference model in memory (float32)" not in dict(streamed.items)
    few = _plan(tiny_dir, calib=(16, 512))
    assert dict(few.items)["calibration activations"] * 8 == items["calibration activations"]
    spilled = dict(_plan(tiny_dir, spill=True).items)
    assert spilled["calibration activations (spilled: one batch)"] * 16 == items["calibration activations"]
    assert mem.fits and "estimated peak RSS" in mem.describe()


def test_whole_weight_rounding_counted_where_a_step_rounds_whole_weights(tiny_dir):
    """RTN rounds a whole weight at once (four float32 copies of the largest linear, in the
    layer phase when streamed); GPTQ rounds block by block and counts its solver instead."""
    key = "rounding the largest linear (float32 temporaries)"
    rtn = _plan(tiny_dir, streamed=True, statistics=set(), calib=None)
    assert dict(rtn.items)[key] == 64 * 128 * 4 * 4 and rtn.phases[key] == "layer"
    assert key not in dict(_plan(tiny_dir, streamed=True).items)


def test_over_the_cap_names_estimate_cap_and_what_fits(tiny_dir):
    plan = _plan(tiny_dir, max_memory="150MB", calib=(4096, 512))
    assert not plan.fits
    msg = plan.refusal()
    assert "over the cap of 150 MB (--max-memory)" in msg and "nothing was written" in msg
    assert "--stream" in msg and "--spill-activations" in msg and "--samples" in msg


def test_run_over_the_cap_writes_nothing_and_exits_2(tiny_dir, text_file, tmp_path, capsys):
    data = {"model": str(tiny_dir), "max_memory": "1MB",
            "eval": {"data": str(text_file), "tokens": 128, "window": 64, "speed": False},
            "calibration": {"data": str(text_file), "samples": 2, "window": 64},
            "stages": [{"name": "q", "steps": [{"gptq": {"grid": "q4_0"}}]}]}
    out = tmp_path / "out"
    with pytest.raises(CompactorError, match=r"estimated .* over the cap of 1 MB"):
        run_recipe(Recipe.from_dict(data), out=out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out*")) and not list(tmp_path.glob("out.work"))
    rc = main(["quantize", str(tiny_dir), "--method", "rtn", "--grid", "q4_0", "--eval-data", str(text_file),
               "--eval-tokens", "128", "--eval-window", "64", "--max-memory", "1MB", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "memory plan:" in err and "error: the memory plan needs an estimated" in err
    assert not out.exists()


def test_streamed_run_spills_activations_that_would_not_fit(tiny_dir, capsys):
    from compactor.recipe.runner import memory_plan

    data = {"model": str(tiny_dir), "stream": True,
            "calibration": {"data": "austen:calib", "samples": 4096, "window": 512},
            "stages": [{"name": "q", "steps": [{"gptq": {"grid": "q4_0"}}]}]}
    _, in_memory = memory_plan(Recipe.from_dict(data), show=False)
    _, spilled = memory_plan(Recipe.from_dict({**data, "spill_activations": True}), show=False)
    acts = dict(in_memory.items)["calibration activations"]
    assert acts > 500e6 and spilled.total < in_memory.total - acts / 2
    # A cap between the two: the run spills (and says so) instead of refusing.
    cap = int(spilled.total + acts / 2)
    recipe, plan = memory_plan(Recipe.from_dict({**data, "max_memory": cap}), show=False)
    assert recipe.spill_activations and plan.fits
    assert "they spill to disk" in capsys.readouterr().err
    # Not streamed: the weights, not the activations, are the problem; it refuses as before.
    with pytest.raises(CompactorError, match="over the cap"):
        memory_plan(Recipe.from_dict({**data, "stream": False, "max_memory": cap}), show=False)


def test_streamed_recipe_refuses_whole_model_steps(tiny_dir):
    from compactor.errors import ConfigError

    data = {"model": str(tiny_dir), "stream": True,
            "stages": [{"name": "cut", "steps": [{"drop_layers": {"fraction": 0.5}}]}]}
    with pytest.raises(ConfigError, match="'drop_layers' needs the whole model in memory"):
        run_recipe(Recipe.from_dict(data), progress=False)


def test_phases_count_only_the_larger_of_what_is_never_together():
    from compactor.plan import MemoryPlan

    items = [("base", 100), ("largest decoder layer", 500), ("largest Hessian", 300), ("embedding / head", 700)]
    flat = MemoryPlan(items, 10_000, "test")
    phased = MemoryPlan(items, 10_000, "test", phases={"largest decoder layer": "layer",
                                                         "largest Hessian": "layer", "embedding / head": "outer"})
    assert flat.total == 1600 and phased.total == 100 + 800
    assert "[layer phase]" in phased.describe() and phased.to_dict()["total"] == 900
