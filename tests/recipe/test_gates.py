"""Quality gates: pass and fail paths, the exit code, and the output kept."""

import json

import pytest
import yaml

from compactor.cli import main
from compactor.errors import ConfigError, GateFailed
from compactor.models.load import load_model
from compactor.recipe.gates import Gate, check_gate
from compactor.recipe.runner import run_recipe
from compactor.recipe.schema import Recipe


def _recipe(tiny_dir, text_file, gate2, gate1=None):
    stage = lambda name, steps, gate: {"name": name, "steps": steps, **({"gate": gate} if gate else {})}
    return Recipe.from_dict({
        "model": str(tiny_dir),
        "eval": {"data": str(text_file), "tokens": 128, "window": 64, "speed": False},
        "calibration": {"data": str(text_file), "samples": 2, "window": 64},
        "stages": [stage("q8", [{"rtn": {"grid": "q8_0"}}], gate1),
                   stage("q2", [{"rtn": {"grid": "q2_k"}}], gate2)]})


def test_gate_passes_and_is_recorded(tmp_path, tiny_dir, text_file):
    out = tmp_path / "out"
    ctx = run_recipe(_recipe(tiny_dir, text_file, {"max_kld": 50.0, "max_bpw": 100.0}), out=out, progress=False)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["gate_failed"] is None and all(c["passed"] for c in prov["gates"][0]["checks"])
    assert {c["gate"] for c in ctx.gates[0]["checks"]} == {"max_kld", "max_bpw"}


def test_failed_gate_exit_3_keeps_last_passed_stage(tmp_path, tiny_dir, text_file, capsys):
    out = tmp_path / "out"
    rec = _recipe(tiny_dir, text_file, {"max_kld": 1e-6}, gate1={"max_kld": 10.0})
    with pytest.raises(GateFailed, match=r"stage 'q2' failed its gate \(max_kld: measured .* vs limit 1e-06\); "
                                         r"the output holds the model after stage 'q8'"):
        run_recipe(rec, out=out, progress=False)
    kept = load_model(out)  # a whole output directory: the q8_0 model, not q2_k, not half-written
    labels = {json.loads((out / "quantization.json").read_text())[n]["grid"] for n in
              json.loads((out / "quantization.json").read_text())}
    assert labels == {"q8_0"} and kept.info["quantized_modules"] == 14
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["gate_failed"].startswith("stage 'q2' failed")
    assert not list(tmp_path.glob("out.work"))
    # through the CLI: one line, exit code 3
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(rec.to_dict()))
    assert main(["run", str(r), "--out", str(tmp_path / "cli"), "--force"]) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: stage 'q2' failed its gate")
    # --json: the document carries the error and the kept output's figures
    assert main(["run", str(r), "--out", str(tmp_path / "cli"), "--force", "--json"]) == 3
    doc = json.loads(capsys.readouterr().out)
    assert doc["exit_code"] == 3 and "failed its gate" in doc["error"]
    assert doc["results"] == json.loads((tmp_path / "cli" / "metrics.json").read_text()) and doc["results"]


def test_gate_on_the_first_stage_keeps_the_input(tmp_path, tiny_dir, text_file):
    out = tmp_path / "out"
    rec = _recipe(tiny_dir, text_file, None, gate1={"min_top1": 0.9999})
    with pytest.raises(GateFailed, match="the output holds the input model"):
        run_recipe(rec, out=out, progress=False)
    assert load_model(out).info["quantized_modules"] == 0


def test_gate_checks_and_bad_limits():
    class R:
        kld_mean, ppl, ref_ppl, top1, size_bytes, bpw, decode_tok_s = 0.1, 11.0, 10.0, 0.8, 5e6, 4.5, 20.0

    c = {x["gate"]: x for x in check_gate(Gate(max_ppl_ratio=1.05, min_top1=0.8, max_size_mb=4,
                                                 min_decode_speedup=1.5), R(), reference_decode=10.0)}
    assert c["max_ppl_ratio"]["measured"] == pytest.approx(1.1) and not c["max_ppl_ratio"]["passed"]
    assert c["min_top1"]["passed"] and not c["max_size_mb"]["passed"] and c["min_decode_speedup"]["passed"]
    with pytest.raises(ConfigError, match="gate.max_kld must be positive"):
        Gate(max_kld=-1)
    with pytest.raises(ConfigError, match="unknown key 'max_klD'"):
        Gate.from_dict({"max_klD": 1})
    with pytest.raises(ConfigError, match="needs a task model's accuracy"):
        check_gate(Gate(min_accuracy_retention=0.95), None)  # an LM evaluation has no task metric


def test_eval_gate_flags(tiny_dir, text_file, capsys):
    base = ["eval", str(tiny_dir), "--reference", str(tiny_dir), "--eval-data", str(text_file),
            "--eval-tokens", "128", "--eval-window", "64", "--no-speed"]
    assert main(base + ["--max-kld", "0.01", "--min-top1", "0.99"]) == 0
    assert "gate passed: max_kld 0" in capsys.readouterr().out
    assert main(base + ["--max-bpw", "1"]) == 3
    assert "failed its gate (max_bpw: measured 32 vs limit 1)" in capsys.readouterr().err
    assert main(["eval", str(tiny_dir), "--eval-data", str(text_file), "--eval-tokens", "128", "--eval-window", "64",
                 "--no-speed", "--max-kld", "1"]) == 2
    assert "need --reference" in capsys.readouterr().err
