import json
import subprocess
import sys

import pytest

from compactor.cli import main


def test_eval_json(tmp_path, tiny_dir, text_file, capsys):
    out = tmp_path / "m.json"
    rc = main(["eval", str(tiny_dir), "--reference", str(tiny_dir), "--data", str(text_file),
               "--tokens", "128", "--window", "64", "--no-speed", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())[0]
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
    assert main(["eval", str(tiny_dir), "--data", str(empty), "--no-speed"]) == 2
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


def test_help_for_every_command():
    for cmd in ([], ["fetch"], ["eval"], ["run"], ["quantize"]):
        proc = subprocess.run([sys.executable, "-m", "compactor.cli", *cmd, "--help"],
                              capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: compactor" in proc.stdout
