"""`compactor distill` on the real model: a half-depth SmolLM2 student, a few KD steps (slow)."""

import json

import pytest

from compactor.cli import main

pytestmark = pytest.mark.slow


def test_cli_distill_half_depth_smollm2(tmp_path, capsys):
    out = tmp_path / "half"
    rc = main(["distill", "--teacher", "smollm2-135m", "--student", "layers:15", "--train-tokens", "6144",
               "--train-window", "256", "--batch", "8", "--micro-batch", "4", "--lr", "3e-4",
               "--eval-tokens", "1024", "--no-speed", "--checkpoint-every", "1", "--out", str(out)])
    assert rc == 0
    rep = next(r for r in json.loads((out / "provenance.json").read_text())["reports"] if r["step"] == "distill")
    assert rep["steps"] == 3 and rep["tokens"] == 6144
    assert rep["params"] < 0.65 * 134_515_008  # 15 of 30 layers gone (the embedding stays)
    assert rep["after"]["kld"] < rep["before"]["kld"]  # three KD steps already help a 15-layer cut
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 15
    assert not (tmp_path / "half.work").exists()
    assert "KLD vs teacher" in capsys.readouterr().out
