"""Quantization quality on the real model: RTN / GPTQ / AWQ / AWQ+GPTQ on several grids.

    python bench/quant_quality.py [--calib-samples 64] [--eval-tokens 8192] [--grids ...]

Every row quantizes the decoder linears of SmolLM2-135M (embedding/head stay float) and is
scored against the float reference on the Austen evaluation split. The table is rewritten
after every row, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time

import torch
from _common import RESULTS, prov_ref, provenance, provenance_lines, write_result

from compactor.api import quantize_
from compactor.calibration.sequential import calibration_dtype, run_sequential
from compactor.data.windows import windows_for
from compactor.evaluate import evaluate
from compactor.evaluate.memory import peak_rss_bytes, reset_peak_rss
from compactor.models.load import load_model
from compactor.quant.activations import w8a8_
from compactor.quant.awq import AWQConfig, apply_awq
from compactor.quant.gptq import GPTQConfig, apply_gptq
from compactor.quant.qlinear import QuantizedLinear
from compactor.quant.rtn import RTNConfig
from compactor.quant.smoothquant import SmoothQuantConfig, apply_smoothquant

GRIDS = {
    "q4_0": dict(grid="q4_0"),
    "int3_g64": dict(grid="int", bits=3, group_size=64),  # g128 does not divide 576
    "iq4_nl": dict(grid="iq4_nl"),
    "q5_0": dict(grid="q5_0"),
    "q4_k": dict(grid="q4_k"),  # down_proj only; q5_0 fallback elsewhere
    "q3_k": dict(grid="q3_k"),  # down_proj only; q4_0 fallback elsewhere
    "int4_ch": dict(grid="int", bits=4, group_size=-1),
    "q4_1": dict(grid="q4_1"),  # the reference's own grid: reproduces it, not a comparison
    "int8_ch": dict(grid="int", bits=8, group_size=-1),  # W8A8 rows
}
METHODS = ("rtn", "gptq", "awq", "awq+clip", "awq+gptq")
# Weight + activation rows (int8 per-channel weights, int8 activations), on grid int8_ch.
W8A8 = ("w8a8_dynamic", "w8a8_static", "sq+w8a8_dynamic", "sq+w8a8_static")


def linear_bpw(model) -> tuple[float, dict]:
    """Average bits per weight over the quantized linears, and the mix of grids by share."""
    bits, n, mix = 0.0, 0, {}
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            k = m.out_features * m.in_features
            bits += k * m.bits_per_weight
            n += k
            mix[m.label] = mix.get(m.label, 0) + k
    return bits / n, {g: round(c / n, 3) for g, c in mix.items()}


def quantize(model, method, kw, calib, dtype) -> dict:
    """Quantize ``model`` in place; returns every setting used, by step (recorded per row)."""
    used = {}
    if method in W8A8:
        if method.startswith("sq+"):
            sq = SmoothQuantConfig(alpha=0.5)
            run_sequential(model, calib, apply_smoothquant, sq, dtype=dtype, progress=False)
            used["smoothquant"] = dataclasses.asdict(sq)
        used["w8a8"] = {"activations": method.rsplit("_", 1)[1], "weights": "int8 per-channel symmetric RTN"}
        w8a8_(model, calib, method.rsplit("_", 1)[1])
        return used
    if method == "rtn":
        cfg = RTNConfig(**kw)
        quantize_(model, cfg)
        return {"rtn": dataclasses.asdict(cfg)}
    if method in ("awq", "awq+clip", "awq+gptq"):
        then = "none" if method == "awq+gptq" else "rtn"
        cfg = AWQConfig(then=then, clip=method == "awq+clip", **kw)
        run_sequential(model, calib, apply_awq, cfg, dtype=dtype, progress=False)
        used["awq"] = dataclasses.asdict(cfg)
    if method in ("gptq", "awq+gptq"):
        cfg = GPTQConfig(**kw)
        run_sequential(model, calib, apply_gptq, cfg, dtype=dtype, progress=False)
        used["gptq"] = dataclasses.asdict(cfg)
    return used


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--grids", nargs="*", default=list(GRIDS))
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS + W8A8)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--table-only", action="store_true", help="re-render the table from the JSON")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of the previous run (rows measured again are replaced)")
    args = ap.parse_args()
    dtype = calibration_dtype(args.dtype)
    if args.table_only:
        return _write(json.loads((RESULTS / "quant_quality.json").read_text()))
    provenance()
    ref = load_model("smollm2-135m")
    win = windows_for(ref.tokenizer, "austen:eval", 512, max_tokens=args.eval_tokens)
    calib = windows_for(ref.tokenizer, "austen:calib", 512, max_tokens=args.calib_samples * 512)
    records = []
    if args.append and (RESULTS / "quant_quality.json").exists():
        records = json.loads((RESULTS / "quant_quality.json").read_text())
    for g in args.grids:
        for method in args.methods:
            if (method in W8A8) != (g == "int8_ch"):
                continue  # W8A8 rows only on int8_ch, weight-only methods on the others
            model = copy.deepcopy(ref.model)
            reset_peak_rss()
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            used = quantize(model, method, GRIDS[g], calib, dtype)
            wall = time.perf_counter() - t0
            rss = peak_rss_bytes()
            bpw, mix = linear_bpw(model)
            r = evaluate(model, win, reference=ref.model, speed=False, name=f"{g} {method}", progress=False)
            rec = dict(grid=g, method=method, linear_bpw=bpw, mix=mix, size_mb=r.size_bytes / 1e6,
                       ppl=r.ppl, ref_ppl=r.ref_ppl, kld_mean=r.kld_mean, kld_p99=r.kld_p99,
                       top1=r.top1, seconds=wall, peak_rss_gb=rss / 1e9, settings=used,
                       load_before=round(load, 2), eval_windows=len(win), eval_window=512,
                       eval_split="austen:eval", calib_split="austen:calib", calib_windows=len(calib),
                       calib_dtype=str(dtype).replace("torch.", ""), bos=False,
                       outer_dtype=str(next(ref.model.parameters()).dtype).replace("torch.", ""),
                       prov=provenance())
            # A re-measured (grid, method) replaces its earlier row.
            records = [x for x in records if (x["grid"], x["method"]) != (g, method)] + [rec]
            print(_row(records, rec), flush=True)
            del model
            _write(records)


def _row(records: list[dict], r: dict) -> str:
    mix = ", ".join(f"{k} {v:.0%}" for k, v in r["mix"].items())
    return (f"| {r['grid']} | {r['method']} | {r['linear_bpw']:.2f} | {mix} | {r['ppl']:.3f} | "
            f"{r['kld_mean']:.4f} | {r['kld_p99']:.3f} | {100 * r['top1']:.1f}% | {r['seconds']:.0f} | "
            f"{r.get('load_before', 'not recorded')} | {r['peak_rss_gb']:.2f} | "
            f"{prov_ref(records, r) or 'not recorded'} |")


def _order(r: dict) -> tuple[int, int]:
    methods = METHODS + W8A8
    return list(GRIDS).index(r["grid"]), methods.index(r["method"])


def _settings_line(records: list[dict]) -> str:
    """The settings each method ran with, from the rows that recorded them (one line per
    distinct setting set), so the table never restates defaults from code."""
    seen = {}
    for r in records:
        for step, cfg in r.get("settings", {}).items():
            key = json.dumps(cfg, sort_keys=True)
            seen.setdefault((step, key), []).append(f"{r['grid']} {r['method']}")
    if not seen:
        return "Settings: not recorded by these rows (they predate per-row settings)."
    return "Settings, as recorded per row:\n\n" + "\n".join(
        f"- {step}: `{key}` ({len(rows)} rows)" for (step, key), rows in seen.items())


def _write(stored: list[dict]) -> None:
    records = sorted(stored, key=_order)  # rendered grouped by grid, then method
    nr = "not recorded"
    r0 = next((r for r in records if "eval_windows" in r), {})
    ref_ppl = sorted({round(r["ref_ppl"], 3) for r in records})
    body = (
        f"Decoder linears quantized (embedding and tied head stay {r0.get('outer_dtype', nr)}). "
        f"Evaluation: {r0.get('eval_split', 'austen:eval')} (Persuasion), {r0.get('eval_windows', nr)} "
        f"windows x {r0.get('eval_window', nr)} tokens, BOS {r0.get('bos', nr)}; reference PPL "
        f"{', '.join(map(str, ref_ppl))}. Calibration: {r0.get('calib_split', nr)} (Sense and "
        f"Sensibility), {r0.get('calib_windows', nr)} x 512 tokens, forward passes in "
        f"{r0.get('calib_dtype', nr)}.\n\n" + _settings_line(records) + "\n\n"
        "int3_g64 stands in for the int3 g128 grid: 128 does not divide SmolLM2's 576-wide "
        "rows. quantize s / peak RSS: the whole bench process, which also holds the float "
        "reference; the GPTQ speed and memory target is measured alone in gptq_speed.md. Load "
        "before: the 1-minute load average when the row started (above ~0.5 another job shared "
        "the 2 cores).\n\n"
        "Caveat: the float reference is the dequantized Q4_1 GGUF, so every decoder weight "
        "already lies on an asymmetric 4-bit group-32 grid: the q4_1 rows reproduce the "
        "reference (near zero KLD) and are not a quality comparison.\n\n"
        "| grid | method | linear bpw | grid mix (share of linear weights) | PPL | KLD mean | "
        "KLD p99 | top-1 | quantize s | load before | peak RSS GB | run |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(_row(records, r) for r in records)
        + "\n\nRuns:\n\n" + (provenance_lines(records) or "- rows recorded before per-row provenance")
    )
    write_result("quant_quality", "Quantization quality (SmolLM2-135M)", body)
    (RESULTS / "quant_quality.json").write_text(json.dumps(stored, indent=1))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
