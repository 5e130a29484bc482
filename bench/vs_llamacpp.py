"""Head to head: compactor's GGUF files against llama.cpp's own quantization types, all scored
inside llama.cpp on the same tokens.

    python bench/vs_llamacpp.py [--eval-tokens 16384] [--calib-samples 128] [--resume] [--no-speed]

* llama.cpp's files: the float reference exported as F32 GGUF, then ``llama_model_quantize``
  (through llama-cpp-python) to each type, without and with an importance matrix. The
  importance matrix is what ``llama-imatrix`` collects — per input column of every ``blk.*``
  matrix multiply, the mean of x² — gathered by compactor's sequential runner on the float
  model over the same calibration windows our methods use (``compactor.export.llamacpp``).
* compactor's files: GPTQ / AWQ+GPTQ on a GGUF grid, exported with the codes as chosen and
  the embedding (tied head) at the type named in the row, verified in llama.cpp; and mixed
  precision (KL-planned grid per linear and for the embedding, then GPTQ) at a budget in
  bits per weight over those weights.
* Every file: real file size, bits per weight = bytes·8 / parameters, and on every evaluation
  domain (Austen prose, Python code, technical prose, C headers — the last calibrated on by
  nobody) PPL, mean KL(reference ‖ file) and p99, top-1 agreement; then, in a second phase with
  nothing else running, prompt (512 tokens) and generation (128 tokens) speed, 2 threads.
* The calibration axis (``--calib``): both tools calibrate on the same set — ``calib:mix``
  for the headline, Austen alone (``austen:calib``) as the in-domain control. llama.cpp's
  files without an importance matrix do not depend on it and are scored once.

Rows are saved to bench/results/vs_llamacpp.json as they finish (``--resume`` skips them) and
files are kept under $COMPACTOR_HOME/bench/vs_llamacpp.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from _common import RESULTS, write_result
from quant_quality import GRIDS, quantize

from compactor.calibration.sequential import calibration_dtype
from _common import prov_ref, provenance, provenance_lines

from compactor.data.windows import domain_windows, sample_windows, windows_for
from compactor.evaluate import evaluate
from compactor.evaluate.backends import CachedBackend, LlamaCppBackend, TorchBackend
from compactor.export.api import export_model
from compactor.export.gguf import GGUFTypes, export_gguf
from compactor.export.llamacpp import collect_imatrix, llamacpp_quantize
from compactor.io import home
from compactor.models.load import load_model
from compactor.quant.mixed import MixedPrecisionConfig, plan_mixed_precision
from compactor.quant.plan import apply_planned

LLAMACPP = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_1", "q4_0", "iq4_xs", "q3_k_m", "q2_k")
#: (method, grid, embedding types to export with)
OURS = (
    ("awq+gptq", "q4_0", ("q8_0", "q5_0", "q4_0")),
    # plain GPTQ (the default method) at equal type: the independent check's like-for-like row
    ("gptq", "q4_0", ("q8_0",)),
    ("gptq", "q4_k", ("q8_0", "q5_0")),
    ("awq+gptq", "iq4_nl", ("q8_0", "q5_0")),
    ("gptq", "q3_k", ("q8_0", "q4_0")),
    # Mixed precision: KL-planned grids for every linear and the embedding, then GPTQ; the
    # grid here is the budget in bits per weight over linears + embedding.
    ("mixed", "5.25", ("planned",)),
    ("mixed", "4.5", ("planned",)),
    # Budgets that fill llama.cpp's IQ4_XS and Q3_K_M files (90.90 / 93.51 MB) to within 0.1 MB:
    # the planned weights take 5.29 / 5.44 bpw, the header and norms ~1.93 MB more.
    ("mixed", "5.29", ("planned",)),
    ("mixed", "5.44", ("planned",)),
    # AutoRound's and llama.cpp's Q4_K_M file (105.45 MB): 6.15 bpw fills it to ~0.2 MB.
    ("mixed", "6.15", ("planned",)),
    # The same planner with IQ4_NL (4.5 bpw, a non-uniform 16-level grid on 32-weight blocks)
    # among the candidates: at SmolLM2's 576-wide rows the K-quants fall back on every
    # 576-column tensor, so the 4.5-bpw choices there are Q4_0 and IQ4_NL.
    ("mixed+iq4_nl", "5.25", ("planned",)),
    ("mixed+iq4_nl", "5.29", ("planned",)),
)
JSON = RESULTS / "vs_llamacpp.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=4096, help="per evaluation domain")
    ap.add_argument("--eval-data", default="domains")
    ap.add_argument("--calib", nargs="*", default=["calib:mix", "austen:calib"],
                    help="calibration sets, each used by both tools")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--only", choices=["llamacpp", "ours"], default=None)
    ap.add_argument("--types", nargs="*", default=list(LLAMACPP), help="llama.cpp types to make")
    ap.add_argument("--methods", nargs="*", default=None, help="only our rows of these methods (e.g. mixed gptq)")
    ap.add_argument("--grids", nargs="*", default=None, help="only our rows on these grids (e.g. q4_0)")
    ap.add_argument("--render-only", action="store_true", help="re-render the tables from the stored JSON")
    args = ap.parse_args()
    work = home() / "bench" / "vs_llamacpp"
    work.mkdir(parents=True, exist_ok=True)
    # --render-only reads the stored rows too: rendering must never start from an empty list
    # (it rewrites the JSON, and the rows it did not read would be gone).
    rows = json.loads(JSON.read_text()) if (args.resume or args.render_only) and JSON.exists() else []
    rows = [r for r in rows if "domains" in r]  # rows of the Austen-only protocol are not comparable
    done = {(r["name"], r.get("calibration")) for r in rows}
    prov = provenance()
    ref = load_model("smollm2-135m")
    win = domain_windows(ref.tokenizer, args.eval_data, 512, max_tokens=args.eval_tokens)
    cached_ref = CachedBackend(TorchBackend(ref.model, "reference"), half=True,
                               directory=work / "reference-logits")
    setup = {"eval": {s: w.provenance for s, w in win.items()}, "calibration": {}}
    if args.render_only:
        _write(rows, setup)
        return
    ref_params = sum(p.numel() for p in ref.model.parameters())
    for spec in args.calib:
        calib = windows_for(ref.tokenizer, spec, 512, max_tokens=args.calib_samples * 512)
        setup["calibration"][spec] = calib.provenance
        _one_calibration(args, ref, ref_params, win, calib, spec, cached_ref, rows, done, setup, work, prov)
    _speeds(args, rows, setup)


def _one_calibration(args, ref, ref_params, win, calib, spec, cached_ref, rows, done, setup, work, prov):
    tag = "mix" if spec == "calib:mix" else spec.split(":")[0]

    def score(path: Path, name: str, tool: str, extra: dict, calibrated: bool = True) -> None:
        r = evaluate(str(path), win, reference=cached_ref, speed=False, name=name, progress=False)
        rows.append(dict(name=name, tool=tool, file=str(path), size_bytes=path.stat().st_size,
                         calibration=spec if calibrated else None, params=r.params,
                         bpw=path.stat().st_size * 8 / ref_params, ppl=r.ppl, ref_ppl=r.ref_ppl,
                         kld_mean=r.kld_mean, kld_p99=r.kld_p99, top1=r.top1, domains=r.domains,
                         calibration_windows=calib.provenance.get("n_windows") if calibrated else None,
                         prov=prov, **extra))
        print(f"{name} [{spec}]: {rows[-1]['bpw']:.3f} bpw mean KLD {r.kld_mean:.4f}", flush=True)
        _write(rows, setup)

    if args.only != "ours":
        f32 = work / "reference-f32.gguf"
        if not f32.exists():
            export_gguf(ref.model, f32, types=GGUFTypes("f32", "f32"), tokenizer_gguf=ref.gguf,
                        tokenizer=ref.tokenizer, adapter=ref.adapter)
        imatrix = None
        for ftype in args.types:
            for use_im in (False, True):
                name = f"llama.cpp {ftype.upper()}{' + imatrix' if use_im else ''}"
                if (name, spec if use_im else None) in done:
                    continue
                if use_im and imatrix is None:
                    t0 = time.perf_counter()
                    imatrix = collect_imatrix(ref, calib)
                    setup["imatrix_seconds"] = round(time.perf_counter() - t0, 1)
                path = work / f"llamacpp-{ftype}{f'-imatrix-{tag}' if use_im else ''}.gguf"
                t0 = time.perf_counter()
                llamacpp_quantize(f32, path, ftype, imatrix if use_im else None)
                score(path, name, "llama.cpp", {"type": ftype, "imatrix": use_im,
                                                "seconds": round(time.perf_counter() - t0, 1)},
                      calibrated=use_im)
                done.add((name, spec if use_im else None))
    if args.only != "llamacpp":
        dtype = calibration_dtype("auto")
        for method, grid, embeds in OURS:
            if (args.methods is not None and method not in args.methods) or \
                    (args.grids is not None and grid not in args.grids):
                continue
            todo = [e for e in embeds if (_our_name(method, grid, e), spec) not in done]
            if not todo:
                continue
            model = copy.deepcopy(ref.model)
            t0 = time.perf_counter()
            if method.startswith("mixed"):
                extra = tuple(method.split("+")[1:])
                cfg = MixedPrecisionConfig(target_bpw=float(grid), then="gptq",
                                           candidates=MixedPrecisionConfig.candidates + extra)
                apply_planned(model, calib, cfg, plan_mixed_precision, adapter=ref.adapter, progress=False)
            else:
                quantize(model, method, GRIDS[grid], calib, dtype)
            seconds = time.perf_counter() - t0
            loaded = copy.copy(ref)
            loaded.model = model
            for embed in todo:
                name = _our_name(method, grid, embed)
                path = work / f"compactor-{method.replace('+', '-')}-{grid}-emb{embed}-{tag}.gguf"
                etype = "q8_0" if embed == "planned" else embed  # a planned embedding keeps its codes
                path.unlink(missing_ok=True)
                res = export_model(loaded, "gguf", path, windows=sample_windows(win, 2048), progress=False,
                                   types=GGUFTypes("f16", etype),
                                   provenance={"calibration": calib.provenance})
                score(path, name, "compactor", {"method": method, "grid": grid, "embed": embed,
                                                "seconds": round(seconds, 1),
                                                "type_mix": res.summary["type_mix"],
                                                "verify_kld": res.verification["kld_mean"]})
            del model, loaded


def _speeds(args, rows, setup) -> None:
    if not args.no_speed:
        for r in rows:
            if "prefill_tok_s" in r or not Path(r["file"]).exists():
                continue
            be = LlamaCppBackend(r["file"], n_ctx=1024)
            r.update(be.speed())
            be.close()
            print(f"{r['name']}: prefill {r['prefill_tok_s']:.0f} tok/s, decode {r['decode_tok_s']:.1f} tok/s",
                  flush=True)
            _write(rows, setup)
    _write(rows, setup)


def _our_name(method: str, grid: str, embed: str) -> str:
    if method.startswith("mixed"):
        extra = "".join(f", +{c.upper()}" for c in method.split("+")[1:])
        return f"compactor mixed {grid} bpw (KL{extra}) + GPTQ, embed planned"
    return f"compactor {method.upper()} {grid.upper()}, embed {embed.upper()}"


def _goal(rows: list[dict], spec: str, target: float = 0.5) -> list[str]:
    """For each llama.cpp + imatrix file (calibrated on ``spec``) smaller than Q4_1: the best
    compactor file (same calibration) of no larger size by mean KLD over domains, and its KLD
    ratio against theirs on every domain; the goal is ≤ ``target`` on every domain."""
    q41 = next((r for r in rows if r.get("type") == "q4_1" and not r.get("imatrix")), None)
    ours = [r for r in rows if r["tool"] == "compactor" and r.get("calibration") == spec]
    theirs = [r for r in rows if r["tool"] == "llama.cpp" and r.get("imatrix") and r.get("calibration") == spec]
    specs = list(rows[0]["domains"]) if rows else []
    out = []
    for r in sorted(theirs, key=lambda r: r["bpw"]):
        if q41 is None or r["size_bytes"] >= q41["size_bytes"] or r.get("type") == "q4_1":
            continue
        fit = [o for o in ours if o["size_bytes"] <= r["size_bytes"]]
        if not fit:
            out.append(f"| {r['name']} | {r['bpw']:.3f} | none of ours is this small |" + " |" * (len(specs) + 1))
            continue
        best = min(fit, key=lambda o: o["kld_mean"])
        ratios = [best["domains"][d]["kld_mean"] / r["domains"][d]["kld_mean"] for d in specs]
        out.append(f"| {r['name']} | {r['bpw']:.3f} | {best['name']} ({best['bpw']:.3f}) | "
                   + " | ".join(f"{x:.2f}" for x in ratios)
                   + f" | {'met' if max(ratios) <= target else 'not met'} |")
    return out


def _same_type(rows: list[dict], spec: str) -> list[str]:
    """Our Q4_0 files against llama.cpp's Q4_0 + imatrix, same calibration, per domain."""
    theirs = next((r for r in rows if r.get("type") == "q4_0" and r.get("imatrix")
                   and r.get("calibration") == spec), None)
    if theirs is None:
        return []
    specs = list(theirs["domains"])
    out = []
    for o in rows:
        if o["tool"] == "compactor" and o.get("grid") == "q4_0" and o.get("calibration") == spec:
            ratios = [o["domains"][d]["kld_mean"] / theirs["domains"][d]["kld_mean"] for d in specs]
            out.append(f"| {o['name']} ({o['bpw']:.3f}) vs {theirs['name']} ({theirs['bpw']:.3f}) | "
                       + " | ".join(f"{x:.2f}" for x in ratios)
                       + f" | {'wins on every domain' if max(ratios) < 1 else 'loses somewhere'} |")
    return out


def _vs_autoround(rows: list[dict]) -> list[str]:
    """For each AutoRound file: the best compactor file (calib:mix) no larger, its KLD ratio on every
    domain (the goal: ≤ 0.9, i.e. ≥ 10 % lower), llama.cpp's same type + imatrix, and both build times."""
    ours = [r for r in rows if r["tool"] == "compactor" and r.get("calibration") == "calib:mix"]
    out = []
    for a in sorted((r for r in rows if r["tool"] == "AutoRound"), key=lambda r: r["bpw"]):
        specs = list(a["domains"])
        lc = next((r for r in rows if r["tool"] == "llama.cpp" and r.get("imatrix") and r.get("type") == a["type"]
                   and r.get("calibration") == a["calibration"]), None)
        lc_txt = "—" if lc is None else f"{lc['kld_mean']:.4f}"
        fit = [o for o in ours if o["size_bytes"] <= a["size_bytes"]]
        if not fit:
            out.append(f"| {a['name']} ({a['bpw']:.3f}) | {a['kld_mean']:.4f} | {a['seconds']:.0f} | {lc_txt} | "
                       "none of ours is this small |" + " |" * (len(specs) + 3))
            continue
        best = min(fit, key=lambda o: o["kld_mean"])
        ratios = [best["domains"][d]["kld_mean"] / a["domains"][d]["kld_mean"] for d in specs]
        out.append(f"| {a['name']} ({a['bpw']:.3f}) | {a['kld_mean']:.4f} | {a['seconds']:.0f} | {lc_txt} | "
                   f"{best['name']} ({best['bpw']:.3f}) | {best['kld_mean']:.4f} | "
                   + " | ".join(f"{x:.2f}" for x in ratios)
                   + f" | {best.get('seconds', float('nan')):.0f} | {'met' if max(ratios) <= 0.9 else 'not met'} |")
    return out


def _autoround_section(rows: list[dict], specs: list[str]) -> str:
    lines = _vs_autoround(rows)
    if not lines:
        return ""
    return ("\n\n## AutoRound's GGUF files (bench/autoround.py, its own venv, the same calib:mix windows)\n\n"
            "Goal: at each AutoRound file's size, a compactor file no larger with ≥ 10 % lower KLD on every "
            "domain (ratio ≤ 0.9), built in less wall time than AutoRound's tuned mode. Build times come from "
            "each row's own run (see its provenance), not from one side-by-side run.\n\n"
            "| AutoRound file (bpw) | mean KLD | AutoRound s | llama.cpp same type + imatrix KLD | "
            "best compactor file no larger (bpw) | its mean KLD | " + " | ".join(f"{d} ratio" for d in specs)
            + " | compactor s | goal |\n|" + "---|" * (len(specs) + 8) + "\n" + "\n".join(lines))


def _plot(rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    head = rows[0].get("calibration") or "calib:mix"
    groups = {"llama.cpp": lambda r: r["tool"] == "llama.cpp" and not r.get("imatrix"),
              f"llama.cpp + imatrix ({head})": lambda r: r["tool"] == "llama.cpp" and r.get("imatrix")
              and r.get("calibration") == "calib:mix",
              "compactor (calib:mix)": lambda r: r["tool"] == "compactor" and r.get("calibration") == "calib:mix",
              "AutoRound (calib:mix)": lambda r: r["tool"] == "AutoRound"}
    for (label, pick), marker in zip(groups.items(), "osD^"):
        pts = sorted((r["bpw"], r["kld_mean"], r["name"]) for r in rows if pick(r))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=label, alpha=0.8)
    ax.set_xlabel("file bits per weight (bytes·8 / parameters)")
    ax.set_ylabel("mean KL(reference ‖ file) in llama.cpp, mean over domains")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("SmolLM2-135M across domains: quality per byte")
    fig.tight_layout()
    fig.savefig(RESULTS / "vs_llamacpp.png", dpi=110)
    plt.close(fig)


def _calibrations(rows: list[dict], setup: dict) -> dict:
    """Every calibration set some stored row used (calib:mix, the headline, first), with its window
    count: from the rows where they recorded it, else from this run's setup, else None. The goal
    tables render for all of them, not only for the sets this run calibrated on."""
    specs = sorted({r["calibration"] for r in rows if r.get("calibration")}, key=lambda s: (s != "calib:mix", s))
    out = {}
    for spec in specs:
        counts = {r["calibration_windows"] for r in rows
                  if r.get("calibration") == spec and r.get("calibration_windows")}
        here = setup["calibration"].get(spec, {}).get("n_windows")
        out[spec] = "/".join(str(c) for c in sorted(counts | ({here} if here else set()))) or None
    return out


def _write(rows: list[dict], setup: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    JSON.write_text(json.dumps(rows, indent=1))
    if not rows:
        return
    specs = list(rows[0]["domains"])
    head = ("| file | calibration | MB | bpw | " + " | ".join(f"{d} KLD" for d in specs)
            + " | mean KLD | mean top-1 % | prompt tok/s | gen tok/s | run |\n|" + "---|" * (len(specs) + 9))
    table = []
    for r in sorted(rows, key=lambda r: (r["bpw"], str(r.get("calibration")))):
        spd = (f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f}" if "prefill_tok_s" in r else " | ")
        note = " (reference grid)" if r.get("type") == "q4_1" else ""
        table.append(f"| {r['name']}{note} | {r.get('calibration') or '—'} | {r['size_bytes'] / 1e6:.1f} | "
                     f"{r['bpw']:.3f} | " + " | ".join(f"{r['domains'][d]['kld_mean']:.4f}" for d in specs)
                     + f" | {r['kld_mean']:.4f} | {100 * r['top1']:.1f} | {spd} | {prov_ref(rows, r)} |")
    ev = setup["eval"]
    cal = _calibrations(rows, setup)
    goals = []
    for spec in cal:
        goals.append(f"\n### Calibrated on {spec}\n\n"
                     "| llama.cpp + imatrix file | bpw | best compactor file no larger (bpw) | "
                     + " | ".join(f"{d} ratio" for d in specs) + " | goal ≤ 0.5× on every domain |\n|"
                     + "---|" * (len(specs) + 4) + "\n" + "\n".join(_goal(rows, spec))
                     + "\n\n| equal type | " + " | ".join(f"{d} ratio" for d in specs) + " | |\n|"
                     + "---|" * (len(specs) + 2) + "\n" + "\n".join(_same_type(rows, spec)))
    body = (
        "Evaluation, per domain: " + ", ".join(f"{s} ({v.get('n_windows')} windows x 512, "
                                               f"{v.get('tokens_scored')} scored tokens)" for s, v in ev.items())
        + "; no BOS; KLD against the float reference in torch. Calibration sets (each used by both "
        "tools: our GPTQ/AWQ and llama.cpp's importance matrix): "
        + "; ".join(f"{s} ({n} x 512)" if n else f"{s} (window count not recorded)" for s, n in cal.items())
        + ". c:eval is in no calibration set. All files run in llama.cpp (llama-cpp-python), 2 threads. "
        "Speed: median of 3 runs per file, on a shared machine.\n\n"
        "Caveat: the reference is the dequantized Q4_1 GGUF, so llama.cpp's Q4_1 reproduces it almost "
        "exactly; it is shown as the size limit of the comparison, not as a competitor.\n\n"
        + head + "\n" + "\n".join(table)
        + "\n\n## The goal: at each llama.cpp (+imatrix) size below Q4_1's, a compactor file no larger "
        "with ≤ 0.5× their KLD on every domain; at equal type, a win on every domain\n" + "\n".join(goals)
        + _autoround_section(rows, specs)
        + "\n\n![KLD against size](vs_llamacpp.png)\n\nRuns:\n" + provenance_lines(rows))
    write_result("vs_llamacpp", "compactor vs llama.cpp's own quantizer across domains (SmolLM2-135M, in llama.cpp)",
                 body)
    _plot(rows)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
