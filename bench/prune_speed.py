"""Speed of the structured cuts, interleaved so that machine drift hits every model alike.

    python bench/prune_speed.py [--repeats 7] [--table-only]

Builds the original and each structured cut of bench/prune_quality.py (same calibration),
exports each as an F16 GGUF, then measures in rounds: every round runs every model once, in
an order rotated round by round — llama.cpp prefill (512 tokens) and decode (128 tokens), and
the same in torch. Reports the median over rounds, the spread (min–max), the ratio of medians
to the original, and whether that ratio is *established*: the cut's whole range lies beyond the
original's range (faster: its slowest round beats the original's fastest). Every sample is
stored in bench/results/prune_speed.json; the table renders only from it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch
from _common import RESULTS, provenance, provenance_lines, write_result
from prune_quality import STRUCTURED, structured

from compactor.data.windows import windows_for
from compactor.evaluate.backends import LlamaCppBackend, TorchBackend
from compactor.export.gguf import GGUFTypes, export_gguf
from compactor.models.load import load_model

JSON = RESULTS / "prune_speed.json"
METRICS = ("llamacpp_prefill_tok_s", "llamacpp_decode_tok_s", "torch_prefill_tok_s", "torch_decode_tok_s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args()
    if a.table_only:
        return render(json.loads(JSON.read_text()))
    prov = provenance()
    ref = load_model("smollm2-135m")
    calib = windows_for(ref.tokenizer, "austen:calib", 512, max_tokens=a.calib_samples * 512)
    work = Path(tempfile.mkdtemp())
    models = {"original": ref.model}
    for row in STRUCTURED:
        m = copy.deepcopy(ref.model)
        structured(m, row, calib)
        models[row] = m
    files = {}
    for name, m in models.items():
        files[name] = work / f"{len(files)}.gguf"
        export_gguf(m, files[name], types=GGUFTypes("f16", "f16"), tokenizer_gguf=ref.gguf, progress=False)
    samples = {n: {k: [] for k in METRICS} for n in models}
    loads = []
    names = list(models)
    for r in range(a.repeats):
        loads.append(os.getloadavg()[0])
        order = names[r % len(names):] + names[:r % len(names)]  # rotated: no model always first
        for n in order:
            be = LlamaCppBackend(files[n], n_ctx=1024)
            for k, v in be.speed(repeats=1).items():
                samples[n][f"llamacpp_{k}"].append(v)
            be.close()
            for k, v in TorchBackend(models[n]).speed(repeats=1).items():
                samples[n][f"torch_{k}"].append(v)
        print(f"round {r + 1}/{a.repeats}", {n: round(samples[n]['llamacpp_decode_tok_s'][-1], 1) for n in names},
              flush=True)
    rec = {"repeats": a.repeats, "threads": torch.get_num_threads(), "prompt_tokens": 512, "gen_tokens": 128,
           "gguf_type": "f16", "calibration": calib.provenance, "load_per_round": loads,
           "params": {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()},
           "samples": samples, "prov": prov}
    JSON.write_text(json.dumps(rec, indent=1))
    render(rec)


def render(rec: dict) -> None:
    """Write prune_speed.md from the stored samples."""
    s = rec["samples"]
    base = s["original"]
    head = ("| model | params (M) | " + " | ".join(
        f"{k.replace('_tok_s', '').replace('_', ' ')} tok/s median [min–max] | ratio | established"
        for k in METRICS) + " |\n|" + "---|" * (2 + 3 * len(METRICS)) + "\n")
    lines = []
    for n, d in s.items():
        cells = []
        for k in METRICS:
            v, b = d[k], base[k]
            med, bmed = statistics.median(v), statistics.median(b)
            if n == "original":
                verdict = "—"
            elif min(v) > max(b):
                verdict = "faster"
            elif max(v) < min(b):
                verdict = "slower"
            else:
                verdict = "no (ranges overlap)"
            cells.append(f"{med:.1f} [{min(v):.1f}–{max(v):.1f}] | {med / bmed:.2f}× | {verdict}")
        lines.append(f"| {n} | {rec['params'][n] / 1e6:.1f} | " + " | ".join(cells) + " |")
    body = (f"{rec['repeats']} rounds; each round measures every model once (order rotated per round): "
            f"prefill of {rec['prompt_tokens']} tokens and decode of {rec['gen_tokens']} tokens, in "
            f"llama.cpp ({rec['gguf_type'].upper()} GGUF) and in torch, {rec['threads']} threads. Ratio: "
            "median over the original's median. Established: the cut's range over the rounds lies "
            "entirely beyond the original's. 1-minute load average at the start of each round: "
            + ", ".join(f"{x:.2f}" for x in rec["load_per_round"])
            + " (above ~0.5 another job shared the cores).\n\n" + head + "\n".join(lines)
            + "\n\nRuns:\n\n" + provenance_lines([{"prov": rec["prov"]}]))
    write_result("prune_speed", "Speed of the structured cuts, interleaved rounds (SmolLM2-135M)", body)


if __name__ == "__main__":
    main()
