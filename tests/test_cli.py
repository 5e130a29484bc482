import json
import subprocess
import sys

import pytest

from compactor.cli import main


def test_eval_json(tmp_path, tiny_dir, text_file, capsys):
    out = tmp_path / "m.json"
    rc = main(["eval", str(tiny_dir), "--reference", str(tiny_dir), "--eval-data", str(text_file),
               "--eval-tokens", "128", "--eval-window", "64", "--no-speed", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["command"] == "eval" and doc["exit_code"] == 0
    res = doc["results"][0]
    assert res["kld_mean"] == 0.0 and res["top1"] == 1.0
    assert "KLD mean" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (["eval", "/nonexistent/model"], "model not found: /nonexistent/model"),
    (["run", "/nonexistent.yaml"], "recipe not found"),
])
def test_bad_input_one_line_exit_2(args, match, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and len(err.splitlines()) == 1


def test_empty_text_and_dir_without_model(tmp_path, tiny_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["eval", str(tiny_dir), "--eval-data", str(empty), "--no-speed"]) == 2
    assert "contains no text" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_recipe_unknown_key_writes_nothing(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("model: x\nstages:\n  - name: s\n    steps:\n      - evaluate: {colour: red}\n")
    out = tmp_path / "out"
    assert main(["run", str(r), "--out", str(out)]) == 2
    assert "unknown key 'colour'" in capsys.readouterr().err
    assert not out.exists()


def test_quantize_defaults_to_a_grid_that_fits_and_says_so(tmp_path, tiny_dir, text_file, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--method", "rtn", "--eval-data", str(text_file), "--eval-tokens", "128",
                 "--eval-window", "64", "--no-speed", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "grid: q4_0 (the default" in printed
    # The size is the file's a runtime would load (GGUF tensors, embedding Q8_0), in the table
    # and the summary line, with the in-memory size (float32 embedding) beside it.
    import json

    from compactor.evaluate.size import gguf_size, model_size
    from compactor.models.load import load_model

    back = load_model(str(out)).model
    assert f"size: {gguf_size(back) / 1e6:.1f} MB as GGUF tensors" in printed
    assert f"{model_size(back)[0] / 1e6:.1f} MB in memory" in printed
    metrics = json.loads((out / "metrics.json").read_text())[-1]
    assert metrics["size_bytes"] == gguf_size(back) and metrics["memory_bytes"] == model_size(back)[0]
    import yaml

    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["steps"][0]["rtn"]["grid"] == "q4_0"
    assert main(["quantize", str(tiny_dir), "--method", "rtn", "--grid", "q4_0", "--group-size", "64",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "block geometry is fixed" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_help_for_every_command():
    for cmd in ([], ["fetch"], ["eval"], ["run"], ["quantize"]):
        proc = subprocess.run([sys.executable, "-m", "compactor.cli", *cmd, "--help"],
                              capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: compactor" in proc.stdout


def test_quantize_cli_writes_codes_and_reports_fallbacks(tmp_path, tiny_dir, text_file, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", str(tiny_dir), "--method", "gptq", "--grid", "q4_k",
               "--calib-data", str(text_file), "--samples", "4", "--calib-window", "64",
               "--eval-data", str(text_file), "--eval-tokens", "128", "--eval-window", "64", "--no-speed",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "12 modules: q4_k needs rows that are a multiple of 256 wide, got 64" in printed
    assert "2 modules: q4_k needs rows that are a multiple of 256 wide, got 128" in printed
    assert (out / "quantization.json").exists() and (out / "metrics.json").exists()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["calibration_data"]["n_windows"] == 4 and prov["reports"][0]["step"] == "gptq"
    res = json.loads((out / "metrics.json").read_text())[0]
    assert res["kld_mean"] > 0 and res["bpw"] < 32


@pytest.mark.parametrize("method, extra, steps", [
    ("mixed", ["--target-bpw", "5", "--candidates", "q4_0,q8_0", "--then", "gptq"], ["mixed_precision"]),
    ("w8a8", ["--act", "static"], ["smoothquant", "rtn", "activations"]),
    ("awq", ["--clip", "--grid", "int", "--bits", "3", "--group-size", "32"], ["awq"]),
])
def test_quantize_cli_other_methods(tmp_path, tiny_dir, text_file, method, extra, steps):
    out = tmp_path / "q"
    rc = main(["quantize", str(tiny_dir), "--method", method, *extra,
               "--calib-data", str(text_file), "--samples", "4", "--calib-window", "64",
               "--eval-data", str(text_file), "--eval-tokens", "128", "--eval-window", "64", "--no-speed",
               "--out", str(out)])
    assert rc == 0
    prov = json.loads((out / "provenance.json").read_text())
    assert [r["step"] for r in prov["reports"]] == steps
    if method == "mixed":
        assert prov["reports"][0]["achieved_bpw"] <= 5.0 and "model.embed_tokens" in prov["reports"][0]["plan"]
    if method == "awq":
        assert any("clip_gain" in p for p in prov["reports"][0]["pairs"])
    assert json.loads((out / "metrics.json").read_text())[0]["kld_mean"] > 0


def test_quantize_bad_group_size_writes_nothing(tmp_path, tiny_dir, text_file, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", str(tiny_dir), "--method", "rtn", "--grid", "int", "--group-size", "48",
               "--eval-data", str(text_file), "--eval-tokens", "128", "--eval-window", "64", "--no-speed", "--out", str(out)])
    assert rc == 2 and "group size 48 does not divide the input width 64" in capsys.readouterr().err
    assert not out.exists()


def test_gguf_of_unknown_architecture_exit_2(tmp_path, capsys):
    import numpy as np
    import gguf

    p = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(p), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "m.json"
    assert main(["eval", str(p), "--reference", str(p), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "GGUF architecture 'mamba'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_export_cli_gguf_verified(tmp_path, tiny_dir, text_file, capsys):
    pytest.importorskip("llama_cpp")
    q = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--method", "rtn", "--grid", "q4_0", "--no-eval",
                 "--out", str(q)]) == 0
    out = tmp_path / "m.gguf"
    assert main(["export", str(q), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "q4_0 " in printed and "verification passed: 14 code tensors" in printed and out.exists()
    assert main(["export", str(q), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_export_verification_top1_floor_is_enforced_as_given(tmp_path, tiny_dir, capsys):
    import re

    pytest.importorskip("llama_cpp")
    q = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--method", "rtn", "--grid", "q4_0", "--no-eval",
                 "--out", str(q)]) == 0
    assert main(["export", str(q), "--out", str(tmp_path / "a.gguf"), "--verify-min-top1", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "(min 0.5)" in printed
    top1 = float(re.search(r"top-1 ([0-9.]+) \(min", printed).group(1))
    # A floor just above what this file reaches refuses it, and nothing is written.
    assert top1 < 1.0  # the tiny random model's near-ties: a few flip under 8-bit activations
    floor = min(1.0, top1 + 0.002)
    assert main(["export", str(q), "--out", str(tmp_path / "b.gguf"), "--verify-min-top1", str(floor)]) == 2
    assert "verification FAILED" in capsys.readouterr().err and not (tmp_path / "b.gguf").exists()
    assert main(["export", str(q), "--out", str(tmp_path / "c.gguf"), "--verify-min-top1", "1.5"]) == 2
    assert "fraction in [0, 1]" in capsys.readouterr().err and not (tmp_path / "c.gguf").exists()
    assert main(["export", str(q), "--format", "onnx", "--out", str(tmp_path / "o"), "--verify-min-top1", "0.5"]) == 2
    assert "GGUF verification" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("method,extra", [("wanda", ["--pattern", "2:4"]), ("layers", ["--fraction", "0.5"])])
def test_prune_cli_and_stats(tmp_path, tiny_dir, text_file, capsys, method, extra):
    out = tmp_path / "p"
    rc = main(["prune", str(tiny_dir), "--method", method, *extra, "--calib-data", str(text_file),
               "--samples", "2", "--calib-window", "64", "--eval-data", str(text_file), "--eval-tokens", "128",
               "--eval-window", "64", "--no-speed", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    if method == "wanda":
        assert "sparsity: 50.00% over 14 matrices" in printed
        assert main(["stats", str(out)]) == 0
        assert "50.00%" in capsys.readouterr().out
    else:
        assert "parameters: " in printed
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1


@pytest.mark.parametrize("args,match", [
    (["--sparsity", "1.0"], "must be in [0, 1)"), (["--pattern", "4:4"], "N must be in 1..M-1"),
    (["--pattern", "3:48"], "group size 48 does not divide the width 64"),
    (["--method", "layers", "--fraction", "0.99"], "would leave none"),
])
def test_prune_bad_input_writes_nothing(tmp_path, tiny_dir, text_file, capsys, args, match):
    out = tmp_path / "p"
    rc = main(["prune", str(tiny_dir), *args, "--calib-data", str(text_file), "--samples", "2",
               "--calib-window", "64", "--eval-data", str(text_file), "--eval-tokens", "128", "--eval-window", "64",
               "--no-speed", "--out", str(out)])
    assert rc == 2 and match in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("fmt,grid", [("gguf", ["--grid", "q4_0"]),
                                      ("compressed-tensors", ["--grid", "int", "--group-size", "32"]),
                                      ("onnx", ["--grid", "q4_0"])])
def test_export_every_format_through_the_cli(tmp_path, tiny_dir, text_file, capsys, fmt, grid):
    """quantize -> export -> the printed summary, as a user runs it (the summary of the
    compressed-tensors and ONNX exports used to die on a missing 'bpw')."""
    pytest.importorskip({"gguf": "llama_cpp", "compressed-tensors": "compressed_tensors",
                         "onnx": "onnxruntime"}[fmt])
    q = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--method", "rtn", *grid, "--eval-data", str(text_file),
                 "--eval-tokens", "128", "--eval-window", "64", "--no-speed", "--out", str(q)]) == 0
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "m")
    capsys.readouterr()
    assert main(["export", str(q), "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verification passed" in printed and f"wrote {out}" in printed and "bits per weight" in printed
    assert out.exists()
    if fmt == "compressed-tensors":  # floats outside the quantized linears in bf16 by default
        from safetensors import safe_open

        with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
            assert f.get_tensor("model.embed_tokens.weight").dtype.is_floating_point
            assert str(f.get_tensor("model.embed_tokens.weight").dtype) == "torch.bfloat16"


@pytest.mark.parametrize("argv,msg", [
    (["eval", "m", "--data", "x"], "--data is now --eval-data"),
    (["quantize", "m", "--tokens=5", "--out", "o"], "--tokens is now --eval-tokens"),
    (["prune", "m", "--window", "64", "--out", "o"], "--window is now --eval-window"),
    (["distill", "--teacher", "t", "--data", "x", "--out", "o"], "--data is now --train-data"),
    (["qat", "m", "--tokens", "5", "--out", "o"], "--tokens is now --train-tokens"),
])
def test_renamed_flags_get_a_one_line_error(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_help_lists_every_subcommand_with_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for sub in ("fetch", "eval", "quantize", "export", "prune", "stats", "distill", "qat", "report", "run"):
        assert sub in out, sub


@pytest.mark.parametrize("args,match", [
    (["--format", "gguf", "--matmul-accuracy", "int8"], "MatMulNBits"),
    (["--format", "onnx", "--max-memory", "8GB"], "caps a GGUF export"),
    (["--format", "compressed-tensors", "--verify-min-top1", "0.5"], "GGUF verification"),
])
def test_export_flags_of_another_format_are_refused_before_loading(tmp_path, capsys, args, match):
    out = tmp_path / "o"
    assert main(["export", str(tmp_path / "no-such-model"), *args, "--out", str(out)]) == 2
    assert match in capsys.readouterr().err and not out.exists()
