"""Wall time and peak RSS of GPTQ on SmolLM2-135M with 128 x 512 calibration tokens.

    python bench/gptq_speed.py [--samples 128] [--dtype auto] [--grid q4_0] [--table-only]

Target (issue 3): <= 3 minutes and <= 2 GB peak RSS on 2 cores. Every row is appended to
``bench/results/gptq_speed.json`` with its provenance and the load average before it; the
table renders only from that file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

from _common import RESULTS, prov_ref, provenance, provenance_lines, write_result

from compactor.calibration.sequential import calibration_dtype, run_sequential
from compactor.data.windows import windows_for
from compactor.evaluate.memory import peak_rss_bytes, reset_peak_rss
from compactor.models.load import load_model
from compactor.quant.gptq import GPTQConfig, apply_gptq

JSON = RESULTS / "gptq_speed.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--grid", default="q4_0")
    ap.add_argument("--dtype", nargs="*", default=["auto"])
    ap.add_argument("--true-sequential", nargs="*", type=int, default=[1])
    ap.add_argument("--table-only", action="store_true", help="re-render the table from the JSON")
    args = ap.parse_args()
    records = json.loads(JSON.read_text()) if JSON.exists() else []
    if args.table_only:
        return render(records)
    provenance()
    for dt, ts in itertools.product(args.dtype, args.true_sequential):
        reset_peak_rss()
        smol = load_model("smollm2-135m")
        loaded_rss = peak_rss_bytes()
        calib = windows_for(smol.tokenizer, "austen:calib", 512, max_tokens=args.samples * 512)
        dtype = calibration_dtype(dt)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        rep = run_sequential(smol.model, calib, apply_gptq, GPTQConfig(grid=args.grid), dtype=dtype,
                             true_sequential=bool(ts), progress=False)
        records.append({"grid": args.grid, "windows": len(calib), "window": 512,
                        "dtype": str(dtype).replace("torch.", ""), "true_sequential": bool(ts),
                        "seconds": round(time.perf_counter() - t0, 1), "peak_rss_gb": peak_rss_bytes() / 1e9,
                        "loaded_rss_gb": loaded_rss / 1e9, "modules": len(rep.modules),
                        "load_before": round(load, 2), "prov": provenance()})
        JSON.write_text(json.dumps(records, indent=1))
        print(records[-1], flush=True)
    render(records)


def render(records: list[dict]) -> None:
    """Write gptq_speed.md from the stored rows."""
    nr = "not recorded"
    rows = [f"| {r['grid']} | {r['windows']} x {r['window']} | {r['dtype']} | {r['true_sequential']} | "
            f"{r['seconds']:.0f} | {r.get('load_before', nr)} | {r['peak_rss_gb']:.2f} | "
            f"{r['loaded_rss_gb']:.2f} | {r['modules']} | {prov_ref(records, r)} |" for r in records]
    body = ("Peak RSS is the process's largest resident set (getrusage), over loading and "
            "quantization; 'after load' is the same figure when the float model had been loaded, "
            "before calibration. Later passes over a layer replay cached o_proj / down_proj inputs "
            "instead of recomputing attention and gate/up. Load before: the 1-minute load average "
            "when the row started (above ~0.5 another job shared the 2 cores).\n\n"
            "| grid | calibration | forward dtype | true-sequential | wall s | load before | "
            "peak RSS GB | RSS after load GB | modules | run |\n|---|---|---|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n\nRuns:\n\n" + provenance_lines(records))
    write_result("gptq_speed", "GPTQ speed and memory (SmolLM2-135M)", body)


if __name__ == "__main__":
    main()
