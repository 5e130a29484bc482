"""What makes GPTQ overfit its calibration text, measured on the domain axis.

    python bench/gptq_domains.py [--eval-tokens 8192] [--rows ...] [--resume]

Every row quantizes SmolLM2-135M's decoder linears to Q4_0 (embedding and tied head stay
float) and scores the model against the float reference on every evaluation domain
(Austen prose, Python code, technical prose, C headers — the last never calibrated on by
any row). Rows vary the calibration text (Austen only vs ``calib:mix``), its size, the
damping, the Hessian's shrinkage toward its diagonal (``diag_mix``), activation order and
the importance-weighted scale search. The reference's logits are cached on disk once.
Results go to ``bench/results/gptq_domains.json`` after every row; ``--resume`` skips the
rows already there; the table renders only from that file.
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
from compactor.data.windows import domain_windows, windows_for
from compactor.evaluate import evaluate
from compactor.evaluate.backends import CachedBackend, TorchBackend
from compactor.models.load import load_model
from compactor.prune.sparsegpt import SparseGPTConfig, apply_sparsegpt
from compactor.prune.wanda import WandaConfig, apply_wanda
from compactor.quant.gptq import GPTQConfig, apply_gptq
from compactor.quant.rtn import RTNConfig

#: row name -> (method, calibration spec, windows, settings)
ROWS = {
    "rtn": ("rtn", None, 0, {}),
    "gptq austen": ("gptq", "austen:calib", 128, {}),
    "gptq mix": ("gptq", "calib:mix", 128, {}),
    # the baselines again, with the code the later rows ran (rows [1] predate the float64
    # Hessian and the new Cholesky): the comparison for choosing defaults is within one commit
    "gptq mix again": ("gptq", "calib:mix", 128, {"diag_mix": 0.0}),
    "gptq austen again": ("gptq", "austen:calib", 128, {"diag_mix": 0.0}),
    "gptq mix damp 0.05": ("gptq", "calib:mix", 128, {"dampening": 0.05}),
    "gptq mix damp 0.1": ("gptq", "calib:mix", 128, {"dampening": 0.1}),
    "gptq mix damp 0.3": ("gptq", "calib:mix", 128, {"dampening": 0.3}),
    "gptq mix diag 0.1": ("gptq", "calib:mix", 128, {"diag_mix": 0.1}),
    "gptq mix diag 0.25": ("gptq", "calib:mix", 128, {"diag_mix": 0.25}),
    "gptq mix diag 0.5": ("gptq", "calib:mix", 128, {"diag_mix": 0.5}),
    "gptq mix diag 1.0": ("gptq", "calib:mix", 128, {"diag_mix": 1.0}),
    "gptq mix no act-order": ("gptq", "calib:mix", 128, {"act_order": False}),
    "gptq mix no scale search": ("gptq", "calib:mix", 128, {"search": False}),
    "gptq mix 256 windows": ("gptq", "calib:mix", 256, {}),
    "gptq austen diag 0.25": ("gptq", "austen:calib", 128, {"diag_mix": 0.25}),
    "wanda austen": ("wanda", "austen:calib", 64, {}),
    "wanda mix": ("wanda", "calib:mix", 64, {}),
    "sparsegpt austen": ("sparsegpt", "austen:calib", 64, {}),
    "sparsegpt mix": ("sparsegpt", "calib:mix", 64, {}),
}
DOMAINS = "domains"
JSON = RESULTS / "gptq_domains.json"


def compress(model, method, calib, settings, dtype) -> dict:
    """Compress ``model`` in place; returns the full configuration it ran with."""
    if method == "rtn":
        cfg = RTNConfig(grid="q4_0")
        quantize_(model, cfg)
        return dataclasses.asdict(cfg)
    make, apply = {"gptq": (lambda: GPTQConfig(grid="q4_0", **settings), apply_gptq),
                   "wanda": (lambda: WandaConfig(sparsity=0.5, **settings), apply_wanda),
                   "sparsegpt": (lambda: SparseGPTConfig(sparsity=0.5, **settings), apply_sparsegpt)}[method]
    cfg = make()
    run_sequential(model, calib, apply, cfg, dtype=dtype, progress=False)
    return dataclasses.asdict(cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=8192, help="per domain")
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--resume", action="store_true", help="skip rows already in the JSON")
    ap.add_argument("--cache", default="/tmp/compactor-bench-reference",
                    help="directory of the reference's cached logits")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    records = json.loads(JSON.read_text()) if JSON.exists() and (args.resume or args.table_only) else []
    if args.table_only:
        return _write(records)
    provenance()  # taken now: the code this process runs
    dtype = calibration_dtype(args.dtype)
    ref = load_model("smollm2-135m")
    win = domain_windows(ref.tokenizer, DOMAINS, 512, max_tokens=args.eval_tokens)
    cached = CachedBackend(TorchBackend(ref.model, "reference"), half=True, directory=args.cache)
    calib_cache = {}
    for name in args.rows:
        if any(r["row"] == name for r in records):
            continue
        method, spec, n, settings = ROWS[name]
        if spec is not None and (spec, n) not in calib_cache:
            calib_cache[(spec, n)] = windows_for(ref.tokenizer, spec, 512, max_tokens=n * 512)
        calib = calib_cache.get((spec, n))
        model = copy.deepcopy(ref.model)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        config = compress(model, method, calib, settings, dtype)
        seconds = time.perf_counter() - t0
        r = evaluate(model, win, reference=cached, speed=False, name=name, progress=False)
        rec = {"row": name, "method": method, "calibration": spec, "calibration_windows": n,
               "settings": settings, "config": config, "seconds": round(seconds, 1), "load_before": round(load, 2),
               "kld_mean": r.kld_mean,
               "ppl": r.ppl, "domains": r.domains,
               "eval": {s: {"windows": len(w), "tokens_scored": w.n_scored} for s, w in win.items()},
               "calibration_dtype": str(dtype).replace("torch.", ""), "prov": provenance()}
        records.append(rec)
        JSON.write_text(json.dumps(records, indent=1))
        print(name, {s: round(d["kld_mean"], 4) for s, d in r.domains.items()}, flush=True)
        del model
        _write(records)


def _defaults(records: list[dict]) -> str:
    """What "defaults" meant, from the rows that recorded their full configuration."""
    full = [r["config"] for r in records if r.get("config") and r["method"] == "gptq" and not r["settings"]]
    if not full:
        return ("Settings not listed are GPTQConfig's defaults at the row's commit (these rows did "
                "not record the full configuration).")
    return "GPTQ defaults as recorded: " + ", ".join(f"{k}={v}" for k, v in full[0].items()) + "."


def _write(records: list[dict]) -> None:
    if not records:
        return
    specs = list(records[0]["domains"])
    calibrated = {r["calibration"] for r in records if r["calibration"]}
    head = ("| row | method | calibration | settings | " + " | ".join(f"{s} KLD" for s in specs)
            + " | mean KLD | wall s | load before | run |\n|" + "---|" * (len(specs) + 8) + "\n")
    lines = []
    for r in records:
        kl = [r["domains"][s]["kld_mean"] for s in specs]
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "defaults"
        cal = f"{r['calibration']} x {r['calibration_windows']}" if r["calibration"] else "none"
        lines.append(f"| {r['row']} | {r['method']} | {cal} | {settings} | "
                     + " | ".join(f"{k:.4f}" for k in kl) + f" | {sum(kl) / len(kl):.4f} | "
                     f"{r['seconds']:.0f} | {r.get('load_before', 'not recorded')} | {prov_ref(records, r)} |")
    ev = records[0]["eval"]
    body = (
        "Q4_0 on the decoder linears (embedding and tied head float) for the rtn/gptq rows; "
        "50 % unstructured sparsity for wanda/sparsegpt. KLD against the float reference in "
        "torch, per evaluation domain: "
        + ", ".join(f"{s} ({v['windows']} windows x 512, {v['tokens_scored']} scored tokens)"
                    for s, v in ev.items())
        + f". Calibration sets used: {', '.join(sorted(calibrated))}; c:eval (Linux C headers) "
        "is in no calibration set. Forward passes of calibration in "
        f"{records[0]['calibration_dtype']}. {_defaults(records)} GPTQConfig's default diag_mix became 0.1 "
        "after these rows, chosen from them: rows with empty settings ran with diag_mix 0, their "
        "commits' default. Wall seconds are the "
        "compression's, with the 1-minute load average before it where recorded (above ~0.5 another "
        "job shared the 2 cores: not a speed figure).\n\n"
        + head + "\n".join(lines) + "\n\nRuns:\n" + provenance_lines(records)
    )
    write_result("gptq_domains", "GPTQ / SparseGPT / Wanda across domains (SmolLM2-135M)", body)


if __name__ == "__main__":
    main()
