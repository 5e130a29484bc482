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


def _built(res):
    return [c for c in res["candidates"] if c.kld is not None]


@pytest.mark.parametrize("top", [1, 2])
def test_budget_search_ranks_by_rtn_and_picks_the_best_fitting(setup, top):
    loaded, calib, win, ref = setup
    params = sum(p.numel() for p in loaded.model.parameters())
    budget = grid_bytes(loaded.model, "q5_0", "q5_0") * 8 / params + 0.01  # q8_0 linears never fit
    res = search(loaded, Target(max_bpw=budget), calib, win, ref, grids=GRIDS, mixed=True, top=top,
                 methods=("rtn", "gptq", "awq+gptq"), progress=False)
    built = _built(res)
    assert not any(c.size_bytes * 8 / params > budget for c in built)  # nothing over budget is built
    assert not any(c.grid == "q8_0" for c in built)
    rtn = [c for c in built if c.method == "rtn"]
    # Per grid, RTN only with the largest embedding type that fits.
    assert sorted((c.grid, c.embed) for c in rtn) == [("q4_0", "q8_0"), ("q5_0", "q5_0")]
    assert all("larger embedding" in c.why_not or c.why_not == "over the budget" for c in res["candidates"]
               if c.method == "rtn" and c.kld is None)
    assert any("larger embedding" in (c.why_not or "") for c in res["candidates"])
    # The calibrated methods only on the best `top` configurations by RTN.
    best = {(c.grid, c.embed) for c in sorted(rtn, key=lambda c: c.kld)[:top]}
    for m in ("gptq", "awq+gptq"):
        assert {(c.grid, c.embed) for c in built if c.method == m} == best
    assert any(c.label.startswith("mixed") for c in built)
    chosen = res["chosen"]
    assert chosen.size_bytes * 8 / params <= budget and chosen.kld == min(c.kld for c in built)
    for a in res["front"]:  # non-dominated among everything measured
        assert not any(b.size_bytes <= a.size_bytes and b.kld < a.kld and b is not a for b in built)
    assert res["context"].loaded.model is not loaded.model  # the chosen model, kept built


def test_calibrated_methods_beat_rtn_on_held_out_text(setup):
    """What the ranking relies on: on the configuration it picks, GPTQ and AWQ+GPTQ (fitted
    on the calibration windows) score below RTN on the evaluation windows."""
    loaded, calib, win, ref = setup
    params = sum(p.numel() for p in loaded.model.parameters())
    budget = grid_bytes(loaded.model, "q4_0", "q8_0") * 8 / params + 0.001
    res = search(loaded, Target(max_bpw=budget), calib, win, ref, grids=("q4_0",), embeds=("q8_0",),
                 methods=("rtn", "gptq", "awq+gptq"), mixed=False, progress=False)
    by = {c.method: c.kld for c in _built(res)}
    assert by["gptq"] < by["rtn"] and by["awq+gptq"] < by["rtn"]


def test_floor_search_stops_at_the_smallest_file_that_meets_it(setup):
    loaded, calib, win, ref = setup
    loose = search(loaded, Target(max_kld=1e9), calib, win, ref, grids=GRIDS, progress=False)
    smallest = min(res.size_bytes for res in loose["candidates"])
    assert loose["chosen"].size_bytes == smallest and loose["chosen"].label == "rtn q4_0, embed q4_0"
    # The smallest grid at its largest embedding, then the smallest configuration: two builds.
    assert sorted(c.label for c in _built(loose)) == ["rtn q4_0, embed q4_0", "rtn q4_0, embed q8_0"]
    # A floor RTN meets only on a larger configuration.
    mid = search(loaded, Target(max_kld=1e9), calib, win, ref, grids=("q5_0",), embeds=("q5_0",),
                 methods=("rtn",), progress=False)["chosen"].kld
    tight = search(loaded, Target(max_kld=mid * 1.001), calib, win, ref, grids=GRIDS, progress=False)
    chosen, built = tight["chosen"], _built(tight)
    assert chosen.kld <= mid * 1.001
    assert not any(c.kld <= mid * 1.001 and c.size_bytes < chosen.size_bytes for c in built)
    rtn = [c for c in built if c.method == "rtn"]
    best_embed = {c.grid: max((d for d in tight["candidates"] if d.grid == c.grid), key=lambda d: d.size_bytes)
                  for c in rtn}
    for c in rtn:  # a grid whose largest embedding misses the floor is not tried with a smaller one
        top = best_embed[c.grid]
        if top.kld is not None and top.kld > mid * 1.001:
            assert c is top
    skipped = [c for c in tight["candidates"] if c.kld is None and "misses the floor already" in (c.why_not or "")]
    assert all(best_embed[c.grid].kld > mid * 1.001 for c in skipped)
    with pytest.raises(CompactorError, match="no candidate meets the quality floor"):
        search(loaded, Target(max_kld=0.0), calib, win, ref, grids=GRIDS, progress=False)


def test_an_interrupted_search_resumes_without_measuring_again(setup, tmp_path, monkeypatch):
    import compactor.search as search_mod

    loaded, calib, win, ref = setup
    params = sum(p.numel() for p in loaded.model.parameters())
    budget = grid_bytes(loaded.model, "q5_0", "q8_0") * 8 / params
    kw = dict(grids=GRIDS, mixed=False, progress=False, cache_file=tmp_path / "measured.json")
    first = search(loaded, Target(max_bpw=budget), calib, win, ref, **kw)
    calls = []
    monkeypatch.setattr(search_mod, "_apply", lambda *a, **k: calls.append(a) or 1 / 0)
    again = search(loaded, Target(max_bpw=budget), calib, win, ref, **kw)
    assert calls == [] and again["chosen"].label == first["chosen"].label
    assert [c.kld for c in _built(again)] == [c.kld for c in _built(first)]
    assert again["context"] is None  # measured before: the CLI builds it again from its recipe
    with pytest.raises(CompactorError, match="other settings"):
        search(loaded, Target(max_bpw=budget), calib, win, ref, **kw, settings={"eval_tokens": 1})


def test_sizes_follow_the_fallback_the_exporter_takes(setup):
    from compactor.api import quantize_
    from compactor.evaluate.size import gguf_size
    from compactor.quant.rtn import RTNConfig
    from compactor.search_space import uniform

    loaded, *_ = setup
    import copy

    m = copy.deepcopy(loaded.model)
    quantize_(m, RTNConfig(grid="q4_k"))  # 64-wide rows: llama.cpp's fallback for q4_k
    assert grid_bytes(loaded.model, "q4_k", "q5_0") == gguf_size(m, embed_type="q5_0")
    assert uniform(loaded.model, "q4_k", "q5_0", "rtn", 1000).size_bytes == gguf_size(m, embed_type="q5_0") + 1000


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
               "--eval-window", "64", "--methods", "gptq", "--embed-types", "q8_0", "--json", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "chosen: gptq q4_0, embed q8_0" in captured.err  # under --json the human output is on stderr
    doc = json.loads(captured.out)
    assert doc["search"]["chosen"]["label"] == "gptq q4_0, embed q8_0"
    steps = yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["steps"]
    assert steps == [{"embedding": steps[0]["embedding"]}, {"gptq": steps[1]["gptq"]}]
    assert steps[0]["embedding"]["grid"] == "q8_0" and steps[1]["gptq"]["grid"] == "q4_0"
    found = json.loads((out / "search.json").read_text())
    assert found["chosen"]["label"] == "gptq q4_0, embed q8_0" and (out / "report.html").exists()
    assert not (tmp_path / "found.search").exists()  # the scratch state goes once the answer is written
    # The written model is the candidate measured: its KLD is the search's.
    assert doc["results"][0]["kld_mean"] == pytest.approx(found["chosen"]["kld"], rel=1e-4)


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
            expected.append(f"drop {int(n)} + heal + gptq {g}, embed q8_0")
    cuts = [c for c in res["candidates"] if any("drop_layers" in s for s in c.steps)]
    assert expected and [c.label for c in cuts] == expected
    assert "drop 1 + heal + gptq q4_0, embed q8_0" not in expected  # q4_0 fits whole: no cut of it
    for cut in cuts:
        assert cut.kld is not None and cut.size_bytes <= budget
    cut = cuts[0]
    assert [next(iter(s)) for s in cut.steps] == ["drop_layers", "distill", "embedding", "gptq"]
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
    assert [next(iter(s)) for s in steps] == ["drop_layers", "distill", "embedding", "gptq"]
    assert main(["run", str(out / "recipe.yaml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert (tmp_path / "again" / "metrics.json").exists()


def test_floor_walk_rules_out_a_grid_its_best_embedding_fails():
    from compactor.search import _choose_floor

    truth = {("a", "e8"): (10, 0.5), ("a", "e4"): (8, 0.6), ("b", "e8"): (14, 0.2), ("b", "e4"): (11, 0.25),
             ("c", "e8"): (20, 0.05), ("c", "e4"): (12, 0.1)}
    pool = [Candidate(f"rtn {g} {e}", [], size, grid=g, embed=e, method="rtn") for (g, e), (size, _) in truth.items()]
    order = []

    def measure(c, rank=False):  # no ranking windows: every measurement is on the evaluation
        if c.kld is None:
            order.append(c.label)
            c.kld = truth[(c.grid, c.embed)][1]
            c.ppl_ratio = 1 + c.kld

    chosen = _choose_floor(Target(max_kld=0.3), pool, ("rtn",), 1, measure, ("a", "b", "c"))
    # a at its best embedding fails, so a's smaller file is never built; b passes, then b's smaller
    # file (11) is the smallest left and passes too; c's 12 is larger than that answer.
    assert order == ["rtn a e8", "rtn b e8", "rtn b e4"] and chosen.label == "rtn b e4"
    assert "misses the floor already" in next(c for c in pool if c.label == "rtn a e4").why_not


def test_floor_walk_ranks_on_the_subset_and_decides_on_the_whole():
    """Ranking measurements only order the walk; near the floor (or passing it) a candidate is
    measured on the whole evaluation, and only that measurement decides."""
    from compactor.search import RANK_MARGIN, _choose_floor

    # (size, KLD on the whole evaluation, KLD on the ranking windows)
    truth = {"a": (10, 0.50, 0.45), "b": (14, 0.33, 0.29), "c": (20, 0.05, 0.06)}
    pool = [Candidate(f"rtn {g}", [], size, grid=g, embed="e8", method="rtn") for g, (size, *_) in truth.items()]
    full = []

    def measure(c, rank=False):
        _, whole, sub = truth[c.grid]
        if rank and c.rank_kld is None and c.kld is None:
            c.rank_kld, c.rank_ppl_ratio = sub, 1 + sub
        elif not rank and c.kld is None:
            full.append(c.grid)
            c.kld, c.ppl_ratio = whole, 1 + whole

    chosen = _choose_floor(Target(max_kld=0.3), pool, ("rtn",), 1, measure, ("a", "b", "c"))
    # a misses by far on the subset: ranked only. b passes on the subset (0.29) but fails on the
    # whole (0.33): not chosen. c is measured in full and chosen.
    assert 0.45 > 0.3 * (1 + RANK_MARGIN)
    assert full == ["b", "c"] and chosen.grid == "c" and chosen.kld == 0.05
    assert pool[0].kld is None and pool[0].rank_kld == 0.45


def test_rank_subset_takes_the_first_windows_of_each_domain(setup):
    from compactor.search import rank_subset

    _, _, win, _ = setup
    per = int(win.score_mask[0].sum())
    sub = rank_subset({"x": win, "y": win}, per + 1)
    assert set(sub) == {"x", "y"} and len(sub["x"]) == 2 and torch.equal(sub["x"].input_ids, win.input_ids[:2])
    assert len(rank_subset(win, 10 ** 9)) == len(win) and len(rank_subset(win, 1)) == 1


@pytest.mark.parametrize("kind", ["budget", "floor"])
def test_search_with_ranking_windows_chooses_on_the_whole_evaluation(setup, kind):
    from compactor.search import front_table, rank_subset

    loaded, calib, win, ref = setup
    params = sum(p.numel() for p in loaded.model.parameters())
    sub = rank_subset(win, 64)
    assert len(sub) < len(win)
    if kind == "budget":
        target = Target(max_bpw=grid_bytes(loaded.model, "q5_0", "q8_0") * 8 / params)
    else:
        full = search(loaded, Target(max_kld=1e9), calib, win, ref, grids=("q5_0",), embeds=("q8_0",),
                      methods=("rtn",), progress=False)["chosen"]
        target = Target(max_kld=full.kld * 1.001)
    res = search(loaded, target, calib, win, ref, grids=GRIDS, mixed=False, progress=False, rank_windows=sub)
    chosen = res["chosen"]
    assert chosen.kld is not None and target.passes(chosen) if kind == "floor" else chosen.kld is not None
    ranked_only = [c for c in res["candidates"] if c.rank_kld is not None and c.kld is None]
    assert ranked_only and all(c.method == "rtn" for c in ranked_only)  # ranking saved whole evaluations
    assert all(c.kld is not None for c in res["front"]) and not any(c in res["front"] for c in ranked_only)
    measured = [c for c in res["candidates"] if c.kld is not None]
    assert chosen.kld == min(c.kld for c in measured if target.fits(c.size_bytes, params)) if kind == "budget" \
        else chosen.size_bytes == min(c.size_bytes for c in measured if target.passes(c))
    assert "measured on the ranking windows only" in front_table(res)
    assert res["tokens"]["ranking"] < res["tokens"]["evaluation"]
