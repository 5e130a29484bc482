"""report.html: built from a run's files, self-contained, and rendered by a real browser."""

import json
import shutil
import subprocess

import pytest

from compactor.errors import CompactorError
from compactor.recipe import Recipe, run_recipe
from compactor.report import build_report, write_report
from compactor.report.svg import _ticks, heatmap, lines, scatter


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from compactor.models.tiny import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("report")
    model = root / "tiny"
    tiny_model(num_hidden_layers=2).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    text = root / "text.txt"
    text.write_text("\n".join(f"Line {i}: a truth universally acknowledged, def f(x): return x + {i}"
                              for i in range(200)))
    r = Recipe.from_dict({
        "model": str(model), "reference": "original",
        "eval": {"data": str(text), "tokens": 512, "window": 64, "speed": False},
        "calibration": {"data": str(text), "samples": 8, "window": 64},
        "stages": [{"name": "reference", "steps": [{"evaluate": {"label": "reference"}}]},
                   {"name": "wanda 30%", "steps": [{"wanda": {"sparsity": 0.3}}]},
                   {"name": "heal", "steps": [{"distill": {"data": str(text), "tokens": 64 * 4 * 4, "window": 64,
                                                           "batch": 4, "micro_batch": 2, "eval_tokens": 256,
                                                           "eval_data": str(text), "eval_every": 2}}]},
                   {"name": "mixed", "steps": [{"mixed_precision": {"target_bpw": 5.0, "candidates": ["q4_0", "q8_0"]}}],
                    "gate": {"max_kld": 50.0}}]})
    out = root / "run"
    run_recipe(r, out=out)
    return out


def test_a_run_writes_its_report_with_every_section(run_dir):
    page = (run_dir / "report.html").read_text()
    for title in ("Stages", "Quality gates", "KL divergence against size", "sparsity", "distill:",
                  "Mixed precision", "Where calibration time went", "Provenance"):
        assert title in page, title
    assert page.count("<svg") >= 5  # KLD/size, 2 distillation curves, heat map, sensitivity, phases
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert all(r["name"] in page for r in rows)
    assert build_report(run_dir) == page  # drawn from the files alone: the same page again


def test_report_command_and_bad_input(run_dir, tmp_path, capsys):
    from compactor.cli import main

    assert main(["report", str(run_dir), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text() == (run_dir / "report.html").read_text()
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.json: not found" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    (bad / "provenance.json").write_text("{nope")
    with pytest.raises(CompactorError, match="provenance.json: not valid JSON"):
        write_report(bad)


def test_svg_primitives():
    assert _ticks(0.5, 0.9, True) == [0.1, 0.2, 0.5, 1.0, 2.0, 5.0]  # a narrow log range gets 2 and 5
    assert _ticks(0.0, 1.0, False)[0] == 0.0 and 1.0 in _ticks(0.0, 1.0, False)
    s = scatter([(1, 0.1, "a<b", "g1"), (2, 0.01, "c", "g2")], "x", "y", "t", logy=True)
    assert s.startswith("<svg") and "a&lt;b" in s and s.count("<circle") == 2
    assert lines({}, "x", "y", "t") == "" and scatter([], "x", "y", "t") == ""
    h = heatmap(["r1"], ["c1", "c2"], {("r1", "c1"): ("q4_0", 4.5)}, "t")
    assert h.count("<rect") == 1 and "q4_0" in h


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (make test installs it where apt-get is available)")
    shot = tmp_path / "shot.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1200,2400", f"--screenshot={shot}", "--enable-logging=stderr", "--v=0",
                           (run_dir / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    # Not a blank page: the screenshot has many distinct colours (tables, charts, text).
    from PIL import Image

    img = Image.open(shot).convert("RGB").resize((300, 600))
    assert len(set(img.getdata())) > 50
