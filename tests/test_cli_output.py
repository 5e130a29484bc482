"""--quiet and --json on every subcommand (compactor.cli_output)."""

import json

from compactor.cli import build_parser, main


def _eval(tiny_dir, text_file, *extra):
    return ["eval", str(tiny_dir), "--reference", str(tiny_dir), "--eval-data", str(text_file),
            "--eval-tokens", "128", "--eval-window", "64", "--no-speed", *extra]


def test_every_subcommand_has_quiet_and_json():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, sp in sub.choices.items():
        flags = {o for a in sp._actions for o in a.option_strings}
        assert {"--quiet", "--json"} <= flags, name


def test_json_on_stdout_is_the_only_stdout(tiny_dir, text_file, capfd):
    assert main(_eval(tiny_dir, text_file, "--json")) == 0
    out, err = capfd.readouterr()
    doc = json.loads(out)  # nothing but the document on stdout
    assert doc["command"] == "eval" and doc["exit_code"] == 0
    assert doc["results"][0]["kld_mean"] == 0.0
    assert "KLD mean" in err  # the table a person reads moved to stderr


def test_quiet_prints_nothing_but_errors(tiny_dir, text_file, tmp_path, capfd):
    assert main(_eval(tiny_dir, text_file, "--quiet")) == 0
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert main(["eval", str(tmp_path / "missing"), "--quiet"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and err.startswith("error: ") and "missing" in err


def test_json_error_document_and_no_file_for_bad_input(tmp_path, capfd):
    assert main(["eval", str(tmp_path / "missing"), "--json"]) == 2
    doc = json.loads(capfd.readouterr().out)
    assert doc["exit_code"] == 2 and "missing" in doc["error"]
    out = tmp_path / "m.json"
    assert main(["eval", str(tmp_path / "missing"), "--json", str(out)]) == 2
    assert not out.exists()


def test_json_file_of_a_failed_gate_keeps_its_measurements(tiny_dir, text_file, tmp_path, capfd):
    out = tmp_path / "m.json"
    # The tiny model is 0.4 MB: a 0.01 MB budget must fail (exit 3).
    assert main(_eval(tiny_dir, text_file, "--max-size-mb", "0.01", "--json", str(out))) == 3
    doc = json.loads(out.read_text())
    assert doc["exit_code"] == 3 and "max_size_mb" in doc["error"] and doc["results"][0]["top1"] == 1.0
    assert "KLD mean" in capfd.readouterr().out  # a file leaves the terminal output as it is
