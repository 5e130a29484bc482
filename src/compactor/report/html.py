"""``report.html``: one self-contained page (inline CSS and SVG, no script, no network) for a
run directory — the per-stage table, gates, KLD against size, the mixed-precision plan as a
heat map with the measured sensitivities, distillation curves, sparsity, where calibration
time went, and the provenance. Everything comes from the files the run wrote
(``metrics.json``, ``provenance.json``, ``recipe.yaml``); nothing is recomputed."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from compactor.errors import CompactorError
from compactor.report import svg

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ddd;padding:3px 7px;
text-align:right}th{background:#f4f6f8}td:first-child,th:first-child{text-align:left}
.pass{color:#137333;font-weight:600}.fail{color:#b3261e;font-weight:600}.muted{color:#666}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px}.chart{max-width:100%;height:auto}
"""


def _read(run_dir: Path) -> tuple[list[dict], dict, str]:
    loaded = []
    for p in (run_dir / "metrics.json", run_dir / "provenance.json"):
        if not p.is_file():
            raise CompactorError(f"{p}: not found; `compactor report` takes the output directory of a run")
        try:
            loaded.append(json.loads(p.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CompactorError(f"{p}: not valid JSON ({exc})") from None
    recipe = (run_dir / "recipe.yaml").read_text() if (run_dir / "recipe.yaml").exists() else ""
    return loaded[0], loaded[1], recipe


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _table(heads: list[str], rows: list[list[str]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in heads) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def _stages(rows: list[dict]) -> str:
    base = rows[0]
    out = []
    for r in rows:
        ratio = base["size_bytes"] / r["size_bytes"] if r["size_bytes"] else None
        ref_ppl = r.get("ref_ppl") or base["ppl"]
        out.append([escape(r["name"]), escape(r["runtime"]), f"{r['size_bytes'] / 1e6:.2f}", f"{r['bpw']:.2f}",
                    _num(ratio, ".2f") + "×", _num(None if ratio is None else 100 * (1 - 1 / ratio), ".1f"),
                    f"{r['ppl']:.3f}", _num(r["ppl"] / ref_ppl if ref_ppl else None, ".3f"),
                    _num(r.get("kld_mean"), ".4f"), _num(r.get("kld_p99"), ".3f"),
                    _num(None if r.get("top1") is None else 100 * r["top1"], ".1f"),
                    _num(r.get("prefill_tok_s"), ".0f"), _num(r.get("decode_tok_s"), ".1f"),
                    f"{r['peak_rss_bytes'] / 1e6:.0f}"])
    return _table(["stage", "runtime", "size MB", "bpw", "compression", "memory saved %", "PPL",
                   "PPL ratio", "KLD mean", "KLD p99", "top-1 %", "prefill tok/s", "decode tok/s",
                   "peak RSS MB"], out)


def _domains(rows: list[dict]) -> str:
    specs = list(dict.fromkeys(s for r in rows for s in (r.get("domains") or {})))
    if not specs:
        return ""
    body = [[escape(r["name"])] + [_num((r["domains"].get(s) or {}).get("kld_mean"), ".4f") + " / "
                                   + _num((r["domains"].get(s) or {}).get("ppl"), ".2f") for s in specs]
            for r in rows if r.get("domains")]
    return "<h2>Per domain (KLD mean / PPL)</h2>" + _table(["stage", *specs], body)


def _gates(meta: dict) -> str:
    gates = meta.get("gates") or []
    if not gates:
        return ""
    body = [[escape(g["stage"]), escape(c["gate"]), _num(c.get("measured"), ".4g"), _num(c.get("limit"), ".4g"),
             '<span class="pass">passed</span>' if c["passed"] else '<span class="fail">FAILED</span>']
            for g in gates for c in g["checks"]]
    failed = meta.get("gate_failed")
    return ("<h2>Quality gates</h2>" + _table(["stage", "gate", "measured", "limit", "result"], body)
            + (f'<p class="fail">{escape(failed)}</p>' if failed else ""))


def _kld_vs_size(rows: list[dict]) -> str:
    pts = [(r["size_bytes"] / 1e6, r["kld_mean"], r["name"],
            "llama.cpp's own quantizer" if "llama.cpp" in r["name"] and r["runtime"] == "llama.cpp"
            and "compactor" not in r["name"].lower() else f"compactor ({r['runtime']})")
           for r in rows if r.get("kld_mean")]
    if not pts:
        return ""
    return ("<h2>KL divergence against size</h2>"
            + svg.scatter(pts, "size (MB)", "mean KL(reference ‖ model)", "KLD against size", logy=True))


def _mixed(rep: dict) -> str:
    from compactor.primitives.ggml import GGML_TYPES

    plan = rep.get("plan") or {}
    cells, rows, cols = {}, [], []
    for module, grid in plan.items():
        parts = module.split(".")
        layer = next((f"layer {p}" for p in parts if p.isdigit()), "outside layers")
        col = parts[-1]
        rows.append(layer)
        cols.append(col)
        t = GGML_TYPES.get(grid)
        cells[(layer, col)] = (grid, t.bpw if t is not None else 0.0)
    rows, cols = list(dict.fromkeys(rows)), list(dict.fromkeys(cols))
    out = (f"<h2>Mixed precision: {escape(str(rep.get('target_bpw')))} bpw target, "
           f"{_num(rep.get('achieved_bpw'), '.3f')} achieved</h2>"
           '<p class="muted">Grid chosen per linear (darker: more bits per weight).</p>'
           + svg.heatmap(rows, cols, cells, "bit allocation"))
    kl = rep.get("measured_kl") or {}
    items = []
    for k, v in kl.items():
        if isinstance(v, dict):
            items += [(f"{k} @ {g}", float(x)) for g, x in v.items()]
        else:
            items.append((f"{k} @ {rep.get('probe', 'probe')}", float(v)))
    if items:
        out += ('<p class="muted">Measured sensitivity: KL of the model with only this part at the probe '
                "grid.</p>" + svg.bars(items, "KL(reference ‖ probed)", "sensitivity"))
    return out


def _distill(rep: dict) -> str:
    evals = [e for e in rep.get("evals") or [] if e.get("kld") is not None]
    if len(evals) < 2:
        return ""
    kld = svg.lines({"student KLD to teacher": [(e["step"], e["kld"]) for e in evals]}, "optimizer step",
                    "KL(teacher ‖ student), held-out", "distillation KLD", logy=True)
    ppl = svg.lines({"student PPL": [(e["step"], e["ppl"]) for e in evals],
                     "teacher PPL": [(e["step"], e["teacher_ppl"]) for e in evals if e.get("teacher_ppl")]},
                    "optimizer step", "perplexity, held-out", "distillation PPL")
    return (f"<h2>{escape(rep['step'])}: {rep.get('tokens', 0):,} tokens, {rep.get('steps')} steps, "
            f"{_num(rep.get('train_seconds'), '.0f')} s</h2>" + kld + ppl)


def _sparsity(rep: dict) -> str:
    s = rep["sparsity"]
    return (f"<h2>{escape(rep['step'])}: sparsity</h2>"
            + _table(["target", "measured", "matrices", "least sparse matrix", "most sparse matrix"],
                     [[_num(s.get("target_sparsity"), ".2%"), _num(s.get("measured_sparsity"), ".2%"),
                       str(s.get("layers", "")), _num(s.get("min_layer"), ".2%"), _num(s.get("max_layer"), ".2%")]]))


def _phases(reports: list[dict]) -> str:
    items = [(f"{r['step']}: {k}", v) for r in reports for k, v in (r.get("phase_seconds") or {}).items()]
    if not items:
        return ""
    return "<h2>Where calibration time went</h2>" + svg.bars(items, "wall seconds, summed over layers", "phases")


def build_report(run_dir: str | Path) -> str:
    """The HTML page of a run directory (see the module docstring)."""
    run_dir = Path(run_dir)
    rows, meta, recipe = _read(run_dir)
    if not rows:
        raise CompactorError(f"{run_dir / 'metrics.json'}: the run measured nothing (no evaluated stage)")
    reports = meta.get("reports") or []
    parts = [f"<h1>compactor report: {escape(str(meta.get('model_source')))}</h1>",
             f'<p class="muted">started {escape(str(meta.get("started", "")))} · '
             f"{_num(meta.get('seconds'), '.0f')} s · compactor {escape(str((meta.get('environment') or {}).get('compactor')))}"
             "</p>",
             "<h2>Stages</h2>", _stages(rows), _domains(rows), _gates(meta), _kld_vs_size(rows)]
    for rep in reports:
        if rep.get("plan"):
            parts.append(_mixed(rep))
        if rep.get("evals"):
            parts.append(_distill(rep))
        if rep.get("sparsity"):
            parts.append(_sparsity(rep))
    parts.append(_phases(reports))
    prov = {k: meta.get(k) for k in ("eval_data", "calibration_data", "calibration_domains", "environment",
                                     "steps", "memory_plan")}
    parts += ["<h2>Provenance</h2>", "<h3>Recipe</h3>", f"<pre>{escape(recipe)}</pre>",
              "<h3>Data, environment, steps, memory plan</h3>", f"<pre>{escape(json.dumps(prov, indent=1))}</pre>"]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>compactor report</title>"
            f"<style>{_CSS}</style></head><body>" + "".join(p for p in parts if p) + "</body></html>")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (or ``out``) atomically; its path."""
    page = build_report(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
