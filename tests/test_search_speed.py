"""The search's speed axis: a decode speed-up limit decides what can be chosen, and the probe
times real files in llama.cpp."""

import importlib.util
import json

import pytest
import torch

from compactor.data.windows import windows_for
from compactor.errors import CompactorError
from compactor.evaluate.backends import CachedBackend, TorchBackend
from compactor.models.load import load_model
from compactor.search import Candidate, Target, search
from compactor.search import _choose_budget, _choose_floor  # noqa: PLC2701 (the choice rules, tested alone)

torch.set_num_threads(1)
needs_llamacpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                    reason="llama-cpp-python is not installed")


def _space():
    """RTN and GPTQ on three grids; the smallest grid is the fastest, the largest the best."""
    out = []
    for grid, size, kld, speedup in (("q4_0", 10, 0.30, 2.0), ("q5_0", 12, 0.20, 1.6), ("q8_0", 20, 0.05, 1.1)):
        for method, factor in (("rtn", 1.0), ("gptq", 0.5)):
            c = Candidate(f"{method} {grid}", [], size, grid=grid, embed="q8_0", method=method)
            c.fields["_truth"] = (kld * factor, speedup)
            out.append(c)
    return out


def _measure(c, rank=False):  # no ranking windows: measured on the evaluation
    if c.kld is None:
        c.kld, c.fields["decode_speedup"] = c.fields["_truth"]
        c.ppl_ratio = 1 + c.kld


@pytest.mark.parametrize("limit, best", [(None, "gptq q8_0"), (1.5, "gptq q5_0"), (1.9, "gptq q4_0")])
def test_a_budget_choice_meets_the_speed_limit(limit, best):
    cands = _space()
    chosen = _choose_budget(Target(max_size_mb=100, min_decode_speedup=limit), cands, ("rtn", "gptq"), 1, _measure)
    assert chosen.label == best
    if limit is not None:  # GPTQ is not built on a configuration RTN showed too slow
        slow = [c for c in cands if c.method == "gptq" and c.fields["_truth"][1] < limit]
        assert slow and all(c.kld is None and c.why_not == "its configuration is too slow" for c in slow)


def test_a_floor_choice_meets_the_speed_limit_or_says_none_does():
    cands = _space()
    chosen = _choose_floor(Target(max_kld=0.25, min_decode_speedup=1.5), cands, ("rtn", "gptq"), 1, _measure, ())
    assert chosen.label == "gptq q4_0"  # the smallest file meeting both (q4_0 GPTQ: 0.15, 2.0x)
    with pytest.raises(CompactorError, match="no candidate reaches a decode speed-up of 5"):
        _choose_floor(Target(max_kld=0.25, min_decode_speedup=5), _space(), ("rtn", "gptq"), 1, _measure, ())
    with pytest.raises(CompactorError, match="no candidate reaches a decode speed-up of 5"):
        _choose_budget(Target(max_size_mb=100, min_decode_speedup=5), _space(), ("rtn", "gptq"), 1, _measure)


def test_a_speed_limit_without_a_probe_is_refused(tiny_dir, text_file, tmp_path):
    loaded = load_model(str(tiny_dir))
    win = windows_for(loaded.tokenizer, str(text_file), 64, max_tokens=128)
    with pytest.raises(CompactorError, match="needs the llama.cpp speed probe"):
        search(loaded, Target(max_kld=1.0, min_decode_speedup=1.2), win, win, None, grids=("q4_0",))


@needs_llamacpp
def test_the_probe_times_each_built_candidate_in_llamacpp(tiny_dir, text_file, tmp_path):
    from compactor.search import front_table
    from compactor.search_speed import SpeedProbe

    loaded = load_model(str(tiny_dir))
    calib = windows_for(loaded.tokenizer, str(text_file), 64, max_tokens=256)
    win = windows_for(loaded.tokenizer, str(text_file), 64, max_tokens=128)
    ref = CachedBackend(TorchBackend(loaded.model, "reference"), half=True, directory=tmp_path / "ref")
    probe = SpeedProbe(loaded, tmp_path / "speed", threads=1, prompt_len=32, gen_tokens=8, repeats=1)
    res = search(loaded, Target(max_kld=1e9, min_decode_speedup=1e-3), calib, win, ref, grids=("q4_0", "q8_0"),
                 methods=("rtn",), embeds=("q8_0",), progress=False, speed=probe)
    built = [c for c in res["candidates"] if c.kld is not None]
    assert built and all(c.fields["decode_tok_s"] > 0 and c.fields["prefill_tok_s"] > 0 for c in built)
    for c in built:  # every speed-up is over the one F16 timing of the original
        assert c.fields["decode_speedup"] == pytest.approx(c.fields["decode_tok_s"] / probe.reference()["decode_tok_s"])
    assert "decode tok/s (x F16)" in front_table(res)
    assert not list((tmp_path / "speed").glob("*.gguf"))  # scratch files go once timed


@needs_llamacpp
def test_cli_search_refuses_a_speed_no_candidate_reaches(tiny_dir, text_file, tmp_path, capsys):
    from compactor.cli import main

    out = tmp_path / "found"
    rc = main(["search", str(tiny_dir), "--max-kld", "1e9", "--grids", "q8_0", "--calib-data", str(text_file),
               "--samples", "4", "--calib-window", "64", "--eval-data", str(text_file), "--eval-tokens", "128",
               "--eval-window", "64", "--methods", "rtn", "--embed-types", "q8_0", "--threads", "1",
               "--min-decode-speedup", "1000", "--json", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 2
    assert json.loads(captured.out)["error"].startswith("search: no candidate reaches a decode speed-up of 1000")
    assert not out.exists()


def test_cli_refuses_a_speed_limit_that_is_not_positive(tiny_dir, tmp_path, capsys):
    from compactor.cli import main

    out = tmp_path / "found"
    rc = main(["search", str(tiny_dir), "--max-kld", "1", "--min-decode-speedup", "0", "--out", str(out)])
    assert rc == 2
    assert "--min-decode-speedup must be positive, got 0.0" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "found.search").exists()
