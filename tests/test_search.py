"""compactor search on a tiny model: the front is non-dominated, the choice meets the target,
a quality floor stops at the smallest grid that meets it."""

import json

import pytest
import torch

from compactor.data.windows import windows_for
from compactor.errors import CompactorError
from compactor.evaluate.backends import CachedBackend, TorchBackend
from compactor.models.load import load_model
from compactor.search import Candidate, Pruning, Target, grid_bytes, layer_bytes, pareto, search

torch.set_num_threads(1)
GRIDS = ("q4_0", "q5_0", "q8_0")


@pytest.fixture
def setup(tiny_dir, text_file, tmp_path):
    loaded = load_model(str(tiny_dir))
    calib = windows_for(loaded.tokenizer, str(text_file), 64, max_tokens=512)
    win = windows_for(loaded.tokenizer, str(text_file), 64, max_tokens=256)
    ref = CachedBackend(TorchBackend(loaded.model, "reference"), half=True, directory=tmp_path / "ref")
    return loaded, calib, win, ref


def test_pareto_keeps_only_the_non_dominated():
    c = [Candidate("a", [], 10, kld=0.5), Candidate("b", [], 20, kld=0.6), Candidate("c", [], 30, kld=0.1),
         Candidate("d", [], 5, kld=0.9), Candidate("e", [], 7)]
    assert [x.label for x in pareto(c)] == ["d", "a", "c"]


def test_budget_search_picks_the_best_fitting_candidate(setup):
    loaded, calib, win, ref = setup
    params = sum(p.numel() for p in loaded.model.parameters())
    budget = grid_bytes(loaded.model, "q5_0") * 8 / params + 0.01  # q4_0 and q5_0 fit, q8_0 not
    res = search(loaded, Target(max_bpw=budget), calib, win, ref, grids=GRIDS, mixed=True, progress=False)
    built = [c for c in res["candidates"] if c.kld is not None]
    assert {c.label for c in built} >= {"rtn q4_0", "gptq q4_0", "rtn q5_0", "gptq q5_0"}
    assert not any("q8_0" in c.label and c.kld is not None for c in res["candidates"])  # never built
    chosen = res["chosen"]
    assert chosen.size_bytes * 8 / params <= budget and chosen.kld == min(c.kld for c in built)
    front = res["front"]
    for a in front:  # non-dominated among everything measured
        assert not any(b.size_bytes <= a.size_bytes and b.kld < a.kld and b is not a for b in built)


def test_floor_search_stops_at_the_smallest_grid_that_meets_it(setup):
    loaded, calib, win, ref = setup
    loose = search(loaded, Target(max_kld=1e9), calib, win, ref, grids=GRIDS, progress=False)
    assert loose["chosen"].label == "gptq q4_0"
    assert [c.label for c in loose["candidates"] if c.kld is not None] == ["gptq q4_0"]  # stopped at once
    q4, q5 = loose["chosen"].kld, None
    tight = search(loaded, Target(max_kld=q4 * 0.5), calib, win, ref, grids=GRIDS, progress=False)
    measured = [c for c in tight["candidates"] if c.kld is not None]
    assert tight["chosen"].kld <= q4 * 0.5
    assert all(c.kld > q4 * 0.5 for c in measured if c is not tight["chosen"])  # every smaller one failed
    assert tight["chosen"].size_bytes == max(c.size_bytes for c in measured)
    with pytest.raises(CompactorError, match="no candidate meets the quality floor"):
        search(loaded, Target(max_kld=0.0), calib, win, ref, grids=GRIDS, progress=False)


def test_targets_are_one_kind_and_budgets_must_fit(setup):
    loaded, calib, win, ref = setup
    with pytest.raises(CompactorError, match="one of the two kinds"):
        Target(max_bpw=4, max_kld=0.1)
    with pytest.raises(CompactorError, match="one of the two kinds"):
        Target()
    with pytest.raises(CompactorError, match="no candidate fits the budget"):
        search(loaded, Target(max_bpw=1.0), calib, win, ref, grids=GRIDS, progress=False)


def test_cli_search_writes_the_choice_with_its_recipe(tiny_dir, text_file, tmp_path, capsys):
    import yaml

    from compactor.cli import main

    out = tmp_path / "found"
    rc = main(["search", str(tiny_dir), "--max-kld", "1e9", "--grids", "q4_0,q8_0", "--calib-data", str(text_file),
               "--samples", "8", "--calib-window", "64", "--eval-data", str(text_file), "--eval-tokens", "256",
               "--eval-window", "64", "--json", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "chosen: gptq q4_0" in captured.err  # under --json the human output is on stderr
    assert json.loads(captured.out)["search"]["chosen"]["label"] == "gptq q4_0"
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["stages"][0]["steps"][0] == {"gptq": recipe["stages"][0]["steps"][0]["gptq"]}
    assert recipe["stages"][0]["steps"][0]["gptq"]["grid"] == "q4_0"
    found = json.loads((out / "search.json").read_text())
    assert found["chosen"]["label"] == "gptq q4_0" and (out / "report.html").exists()


def test_depth_cuts_are_built_only_where_they_can_matter(setup, text_file):
    loaded, calib, win, ref = setup
    model = loaded.model
    params = sum(p.numel() for p in model.parameters())
    # A budget just over q4_0 whole: the grids above it fit only cut, with at most 1 of the
    # 2 layers dropped (max_drop 0.5), and each with the fewest layers that make it fit.
    budget = grid_bytes(model, "q4_0") * 1.001
    prune = Pruning(max_drop=0.5, heal_tokens=512, heal_window=64)
    res = search(loaded, Target(max_bpw=budget * 8 / params), calib, win, ref, grids=GRIDS, mixed=False,
                 progress=False, pruning=prune, model_spec="tiny", calib_spec=str(text_file),
                 eval_spec=str(text_file))
    expected = []
    for g in GRIDS:
        over = grid_bytes(model, g) - budget
        n = -(-over // layer_bytes(model, g))
        if 0 < n <= 1:
            expected.append(f"drop {int(n)} + heal + gptq {g}")
    cuts = [c for c in res["candidates"] if any("drop_layers" in s for s in c.steps)]
    assert expected and [c.label for c in cuts] == expected
    assert "drop 1 + heal + gptq q4_0" not in expected  # q4_0 fits whole: no cut of it
    for cut in cuts:
        assert cut.kld is not None and cut.size_bytes <= budget
    cut = cuts[0]
    assert [next(iter(s)) for s in cut.steps] == ["drop_layers", "distill", "gptq"]
    assert cut.steps[1]["distill"]["data"] == str(text_file)  # healed on the calibration text
    chosen = res["chosen"]
    assert chosen.kld == min(c.kld for c in res["candidates"] if c.kld is not None)
    # Without --allow-pruning the space has no cuts.
    plain = search(loaded, Target(max_bpw=budget * 8 / params), calib, win, ref, grids=GRIDS, mixed=False,
                   progress=False)
    assert not any(any("drop_layers" in s for s in c.steps) for c in plain["candidates"])


def test_cut_size_prediction_equals_the_cut_model(setup):
    import copy

    from compactor.prune.structured import drop_layers

    loaded, *_ = setup
    cut = copy.deepcopy(loaded.model)
    drop_layers(cut, [1], loaded.adapter)
    for g in GRIDS:
        assert grid_bytes(cut, g) == grid_bytes(loaded.model, g) - layer_bytes(loaded.model, g)


def test_floor_search_with_cuts_keeps_the_smallest_that_meets_it(setup, text_file):
    loaded, calib, win, ref = setup
    prune = Pruning(max_drop=0.5, heal_tokens=512, heal_window=64)
    res = search(loaded, Target(max_kld=1e9), calib, win, ref, grids=GRIDS, progress=False, pruning=prune,
                 model_spec="tiny", calib_spec=str(text_file), eval_spec=str(text_file))
    measured = [c for c in res["candidates"] if c.kld is not None]
    cuts = [c for c in measured if any("drop_layers" in s for s in c.steps)]
    assert cuts  # a larger grid cut below q4_0 whole was tried
    assert res["chosen"].size_bytes == min(c.size_bytes for c in measured)


def test_cli_search_with_cuts_writes_a_runnable_recipe(tiny_dir, text_file, tmp_path, capsys):
    import yaml

    from compactor.cli import main

    out = tmp_path / "found"
    common = ["--calib-data", str(text_file), "--samples", "8", "--calib-window", "64", "--eval-data",
              str(text_file), "--eval-tokens", "256", "--eval-window", "64"]
    rc = main(["search", str(tiny_dir), "--max-kld", "1e9", "--grids", "q4_0,q8_0", *common, "--allow-pruning",
               "--max-drop", "0.5", "--heal-tokens", "512", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    steps = yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["steps"]
    assert [next(iter(s)) for s in steps] == ["drop_layers", "distill", "gptq"]
    assert main(["run", str(out / "recipe.yaml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert (tmp_path / "again" / "metrics.json").exists()
