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
* Every file: real file size, bits per weight = bytes·8 / parameters, PPL, mean KL(reference ‖
  file) and p99, top-1 agreement on the Austen evaluation split; then, in a second phase with
  nothing else running, prompt (512 tokens) and generation (128 tokens) speed, 2 threads.

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
from compactor.data.windows import windows_for
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
    ("gptq", "q4_k", ("q8_0", "q5_0")),
    ("awq+gptq", "iq4_nl", ("q8_0", "q5_0")),
    ("gptq", "q3_k", ("q8_0", "q4_0")),
    # Mixed precision: KL-planned grids for every linear and the embedding, then GPTQ; the
    # grid here is the budget in bits per weight over linears + embedding.
    ("mixed", "5.25", ("planned",)),
    ("mixed", "4.5", ("planned",)),
)
JSON = RESULTS / "vs_llamacpp.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--only", choices=["llamacpp", "ours"], default=None)
    ap.add_argument("--methods", nargs="*", default=None, help="only our rows of these methods (e.g. mixed gptq)")
    args = ap.parse_args()
    work = home() / "bench" / "vs_llamacpp"
    work.mkdir(parents=True, exist_ok=True)
    rows = json.loads(JSON.read_text()) if args.resume and JSON.exists() else []
    done = {r["name"] for r in rows}
    ref = load_model("smollm2-135m")
    win = windows_for(ref.tokenizer, "austen:eval", 512, max_tokens=args.eval_tokens)
    calib = windows_for(ref.tokenizer, "austen:calib", 512, max_tokens=args.calib_samples * 512)
    cached_ref = CachedBackend(TorchBackend(ref.model, "reference"))
    setup = {"eval": win.provenance, "calibration": calib.provenance}

    def score(path: Path, name: str, tool: str, extra: dict) -> None:
        r = evaluate(str(path), win, reference=cached_ref, speed=False, name=name, progress=False)
        rows.append(dict(name=name, tool=tool, file=str(path), size_bytes=path.stat().st_size,
                         params=r.params, bpw=path.stat().st_size * 8 / ref_params, ppl=r.ppl,
                         ref_ppl=r.ref_ppl, kld_mean=r.kld_mean, kld_p99=r.kld_p99, top1=r.top1, **extra))
        print(f"{name}: {rows[-1]['bpw']:.3f} bpw KLD {r.kld_mean:.4f} top-1 {r.top1:.3f}", flush=True)
        _write(rows, setup)

    ref_params = sum(p.numel() for p in ref.model.parameters())
    if args.only != "ours":
        f32 = work / "reference-f32.gguf"
        if not f32.exists():
            export_gguf(ref.model, f32, types=GGUFTypes("f32", "f32"), tokenizer_gguf=ref.gguf,
                        tokenizer=ref.tokenizer, adapter=ref.adapter)
        imatrix = None
        for ftype in LLAMACPP:
            for use_im in (False, True):
                name = f"llama.cpp {ftype.upper()}{' + imatrix' if use_im else ''}"
                if name in done:
                    continue
                if use_im and imatrix is None:
                    t0 = time.perf_counter()
                    imatrix = collect_imatrix(ref, calib)
                    setup["imatrix_seconds"] = round(time.perf_counter() - t0, 1)
                path = work / f"llamacpp-{ftype}{'-imatrix' if use_im else ''}.gguf"
                t0 = time.perf_counter()
                llamacpp_quantize(f32, path, ftype, imatrix if use_im else None)
                score(path, name, "llama.cpp", {"type": ftype, "imatrix": use_im,
                                                "seconds": round(time.perf_counter() - t0, 1)})
    if args.only != "llamacpp":
        dtype = calibration_dtype("auto")
        for method, grid, embeds in OURS:
            if args.methods is not None and method not in args.methods:
                continue
            todo = [e for e in embeds if _our_name(method, grid, e) not in done]
            if not todo:
                continue
            model = copy.deepcopy(ref.model)
            t0 = time.perf_counter()
            if method == "mixed":
                cfg = MixedPrecisionConfig(target_bpw=float(grid), then="gptq")
                apply_planned(model, calib, cfg, plan_mixed_precision, adapter=ref.adapter, progress=False)
            else:
                quantize(model, method, GRIDS[grid], calib, dtype)
            seconds = time.perf_counter() - t0
            loaded = copy.copy(ref)
            loaded.model = model
            for embed in todo:
                name = _our_name(method, grid, embed)
                path = work / f"compactor-{method.replace('+', '-')}-{grid}-emb{embed}.gguf"
                etype = "q8_0" if embed == "planned" else embed  # a planned embedding keeps its codes
                path.unlink(missing_ok=True)
                res = export_model(loaded, "gguf", path, windows=win.head(4), progress=False,
                                   types=GGUFTypes("f16", etype),
                                   provenance={"calibration": calib.provenance})
                score(path, name, "compactor", {"method": method, "grid": grid, "embed": embed,
                                                "seconds": round(seconds, 1),
                                                "type_mix": res.summary["type_mix"],
                                                "verify_kld": res.verification["kld_mean"]})
            del model, loaded
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
    if method == "mixed":
        return f"compactor mixed {grid} bpw (KL) + GPTQ, embed planned"
    return f"compactor {method.upper()} {grid.upper()}, embed {embed.upper()}"


def _goal(rows: list[dict]) -> list[str]:
    """For each llama.cpp (+imatrix) file smaller than its Q4_1: the best compactor file of
    no larger size, and the KLD ratio against the 0.75 target."""
    q41 = next((r for r in rows if r.get("type") == "q4_1" and not r.get("imatrix")), None)
    ours = [r for r in rows if r["tool"] == "compactor"]
    out = []
    for r in sorted((r for r in rows if r["tool"] == "llama.cpp" and r.get("imatrix")), key=lambda r: r["bpw"]):
        if q41 is None or r["size_bytes"] >= q41["size_bytes"] or r.get("type") == "q4_1":
            continue
        fit = [o for o in ours if o["size_bytes"] <= r["size_bytes"]]
        if not fit:
            out.append(f"| {r['name']} | {r['bpw']:.3f} | {r['kld_mean']:.4f} | none of ours is this small | | | not met |")
            continue
        best = min(fit, key=lambda o: o["kld_mean"])
        ratio = best["kld_mean"] / r["kld_mean"]
        out.append(f"| {r['name']} | {r['bpw']:.3f} | {r['kld_mean']:.4f} | {best['name']} ({best['bpw']:.3f} bpw) | "
                   f"{best['kld_mean']:.4f} | {ratio:.2f} | {'met' if ratio <= 0.75 else 'not met'} |")
    return out


def _plot(rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = {"llama.cpp": lambda r: r["tool"] == "llama.cpp" and not r.get("imatrix"),
              "llama.cpp + imatrix": lambda r: r["tool"] == "llama.cpp" and r.get("imatrix"),
              "compactor": lambda r: r["tool"] == "compactor"}
    for (label, pick), marker in zip(groups.items(), "osD"):
        pts = sorted((r["bpw"], r["kld_mean"], r["name"]) for r in rows if pick(r))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=label, alpha=0.8)
    ax.set_xlabel("file bits per weight (bytes·8 / parameters)")
    ax.set_ylabel("mean KL(reference ‖ file) in llama.cpp")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("SmolLM2-135M on Austen (Persuasion): quality per byte")
    fig.tight_layout()
    fig.savefig(RESULTS / "vs_llamacpp.png", dpi=110)
    plt.close(fig)


def _write(rows: list[dict], setup: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    JSON.write_text(json.dumps(rows, indent=1))
    table = []
    for r in sorted(rows, key=lambda r: r["bpw"]):
        spd = (f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f}" if "prefill_tok_s" in r else " | ")
        note = " (reference grid)" if r.get("type") == "q4_1" else ""
        table.append(f"| {r['name']}{note} | {r['size_bytes'] / 1e6:.1f} | {r['bpw']:.3f} | {r['ppl']:.3f} | "
                     f"{r['kld_mean']:.4f} | {r['kld_p99']:.3f} | {100 * r['top1']:.1f} | {spd} |")
    ev, cal = setup["eval"], setup["calibration"]
    ref_ppl = rows[0]["ref_ppl"] if rows else float("nan")
    body = (
        f"Evaluation: Austen eval split (Persuasion), {ev.get('n_windows')} windows × 512 tokens, no BOS, "
        f"{ev.get('tokens_scored')} scored tokens; reference (float, torch) PPL {ref_ppl:.3f}. Calibration "
        f"for GPTQ/AWQ and for the importance matrix: Austen calib split (Sense and Sensibility), "
        f"{cal.get('n_windows')} × 512 tokens. All files run in llama.cpp (llama-cpp-python), 2 threads.\n\n"
        "Speed: median of 3 runs per file in llama.cpp on a shared machine; files with identical "
        "tensor types (Q8_0 with/without imatrix, our Q4_0 file vs llama.cpp's Q4_0) differ by up to "
        "1.6×, so smaller speed differences are noise.\n\n"
        "Caveat: the reference is the dequantized Q4_1 GGUF, so llama.cpp's Q4_1 reproduces it almost "
        "exactly; it is shown as the size limit of the comparison, not as a competitor.\n\n"
        "| file | MB | bpw | PPL | KLD mean | KLD p99 | top-1 % | prompt tok/s | gen tok/s |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(table) +
        "\n\n## The goal: at each llama.cpp (+imatrix) size below Q4_1's, a compactor file no larger "
        "with mean KLD ≤ 0.75× theirs\n\n"
        "| llama.cpp file | bpw | KLD | best compactor file no larger | KLD | ratio | goal |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(_goal(rows)) +
        "\n\n![KLD against size](vs_llamacpp.png)\n")
    write_result("vs_llamacpp", "compactor vs llama.cpp's own quantizer (SmolLM2-135M, in llama.cpp)", body)
    _plot(rows)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
