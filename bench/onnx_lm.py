"""A compressed causal LM in onnxruntime: SmolLM2-135M GPTQ Q4_0 codes carried into
``MatMulNBits``, against the same codes in llama.cpp and in memory.

    python bench/onnx_lm.py [--eval-tokens 4096] [--resume] [--no-speed] [--table-only]

* The model: GPTQ on the GGUF Q4_0 grid (calib:mix, 128 x 512 tokens, the demo's settings),
  decoder linears only; the embedding / tied head stays float in memory.
* Files of those codes: ONNX with the 4-bit codes and fp16-exact scales in ``MatMulNBits`` (no
  re-rounding; the embedding float32, or Q8_0 as the GGUF holds it — that graph also with
  ``matmul_accuracy="int8"``, onnxruntime's int8-activation kernels), the float-embedding graph
  through onnxruntime's per-channel dynamic int8 (``--int8``), and GGUF (the embedding Q8_0) in
  llama.cpp.
* Every file is scored in its runtime on the four evaluation domains against the float
  reference (KLD, top-1, PPL), and against the quantized model in memory (the export's own
  verification on 2,048 tokens).
* Speed: prefill tokens/s of one 512-token window and decode tokens/s of 64 tokens on the
  runtime's KV cache (the ONNX graph's ``past_key_values`` / ``present`` since the cache graph;
  rows measured before it say "no KV cache"), median of 3, 2 threads, each runtime in turn in
  one pass. ``--resume --redo ONNX`` measures the ONNX rows again with today's export.

Rows are saved to bench/results/onnx_lm.json as they finish (``--resume`` skips them).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

from _common import RESULTS, prov_ref, provenance, provenance_lines, stored_rows, write_result

from compactor.calibration.sequential import calibration_dtype
from compactor.data.windows import domain_windows, sample_windows, windows_for
from compactor.evaluate import evaluate
from compactor.evaluate.backends import CachedBackend, TorchBackend
from compactor.export.api import export_model
from compactor.export.gguf import GGUFTypes
from compactor.io import home
from compactor.models.load import load_model

JSON = RESULTS / "onnx_lm.json"
ROWS = ("float (torch)", "GPTQ Q4_0 in memory (torch)", "GPTQ Q4_0 ONNX MatMulNBits (onnxruntime)",
        "GPTQ Q4_0 ONNX + onnxruntime dynamic int8", "GPTQ Q4_0 GGUF, embedding Q8_0 (llama.cpp)",
        "GPTQ Q4_0 ONNX MatMulNBits, embedding Q8_0 (onnxruntime)",
        "GPTQ Q4_0 ONNX MatMulNBits int8 activations, embedding Q8_0 (onnxruntime)")


def main() -> None:
    from quant_quality import GRIDS, quantize

    from compactor.export.onnx import OnnxBackend

    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=4096, help="per evaluation domain")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--redo", nargs="*", default=[],
                    help="with --resume: measure again the rows whose names contain any of these")
    args = ap.parse_args()
    rows = stored_rows(JSON, args.resume or args.table_only)
    rows = [r for r in rows if not any(s in r["name"] for s in args.redo)]
    if args.table_only:
        return render(rows)
    prov = provenance()
    work = home() / "bench" / "onnx_lm"
    work.mkdir(parents=True, exist_ok=True)
    ref = load_model("smollm2-135m")
    win = domain_windows(ref.tokenizer, "domains", 512, max_tokens=args.eval_tokens)
    cached = CachedBackend(TorchBackend(ref.model, "reference"), half=True,
                           directory=home() / "bench" / "vs_llamacpp" / "reference-logits")
    calib = windows_for(ref.tokenizer, "calib:mix", 512, max_tokens=128 * 512)
    done = {r["name"] for r in rows}
    if all(n in done for n in ROWS):  # only the speed pass is left
        if not args.no_speed:
            _speed(rows, ref)
        return render(rows)
    model = copy.deepcopy(ref.model)
    t0 = time.perf_counter()
    quantize(model, "gptq", GRIDS["q4_0"], calib, calibration_dtype("auto"))
    gptq_s = time.perf_counter() - t0
    loaded = copy.copy(ref)
    loaded.model = model
    verify_win = sample_windows(win, 2048)

    def record(name, target, extra):
        res = evaluate(target, win, reference=cached, speed=False, name=name, progress=False)
        rows.append({"name": name, "prov": prov, "load_before": os.getloadavg()[0], "size_bytes": res.size_bytes,
                     "kld_mean": res.kld_mean, "top1": res.top1, "ppl": res.ppl,
                     "domains": res.domains,
                     "setup": {"eval": {s: w.provenance for s, w in win.items()}, "calibration": calib.provenance,
                               "gptq_seconds": round(gptq_s, 1)}, **extra})
        JSON.write_text(json.dumps(rows, indent=1))
        print(f"{name}: {res.size_bytes / 1e6:.1f} MB, KLD {res.kld_mean:.4f}, top-1 {res.top1:.4f}", flush=True)

    if ROWS[0] not in done:
        record(ROWS[0], ref.model, {"file": None})
    if ROWS[1] not in done:
        record(ROWS[1], model, {"file": None})
    # The first two keep the embedding float32 (as the export did before its Q8_0 embedding).
    for name, int8, emb, acc in ((ROWS[2], False, "f32", "fp32"), (ROWS[3], True, "f32", "fp32"),
                                 (ROWS[5], False, "q8_0", "fp32"), (ROWS[6], False, "q8_0", "int8")):
        if name in done:
            continue
        out = work / ("onnx-int8" if int8 else "onnx" if emb == "f32" else f"onnx-embq8-{acc}")
        res = export_model(loaded, "onnx", out, overwrite=True, windows=verify_win, progress=False, int8=int8,
                           embed_type=emb, matmul_accuracy=acc)
        path = out / res.summary["file"]
        be = OnnxBackend(path)
        be.params = sum(p.numel() for p in model.parameters())
        be.vocab_size = be.vocab_size or model.config.vocab_size
        record(name, be, {"file": str(path), "export": _plain(res.summary), "verify_vs_memory": res.verification})
    if ROWS[4] not in done:
        path = work / "gptq-q4_0-embq8_0.gguf"
        res = export_model(loaded, "gguf", path, overwrite=True, windows=verify_win, progress=False,
                           types=GGUFTypes("f16", "q8_0"))
        record(ROWS[4], str(path), {"file": str(path), "verify_vs_memory": _plain(res.verification)})
    if not args.no_speed:
        _speed(rows, ref)
    render(rows)


def _plain(d):
    return json.loads(json.dumps(d, default=str))


def _speed(rows, ref) -> None:
    """Prefill (and decode where the runtime has a KV cache) of every file and of the float
    reference in torch, in one pass (the in-memory quantized model is a float simulation: its
    speed says nothing about a deployment, so it is not timed)."""
    import torch

    from compactor.evaluate.backends import LlamaCppBackend
    from compactor.export.onnx import OnnxBackend

    torch.set_num_threads(2)
    load = os.getloadavg()[0]
    for r in rows:
        f = r.get("file")
        if f and not os.path.exists(f):  # a stored row whose file is gone: measure it again (--redo)
            raise SystemExit(f"{r['name']}: its file {f} is gone; run with --resume --redo '{r['name']}'")
        if f and f.endswith(".onnx"):
            be = OnnxBackend(f, threads=2)
        elif f:
            be = LlamaCppBackend(f, n_threads=2)
        elif r["name"] == ROWS[0]:
            be = TorchBackend(ref.model, r["name"])
        else:
            continue
        r["speed"] = {**be.speed(512, 64, 3), "load_before_pass": load}
        JSON.write_text(json.dumps(rows, indent=1))
        print(f"{r['name']}: {r['speed']}", flush=True)


def render(rows: list[dict]) -> None:
    doms = sorted({d for r in rows for d in r.get("domains", {})})
    head = ("| file | size MB | mean KLD | top-1 | " + " | ".join(f"KLD {d}" for d in doms)
            + " | KLD vs in-memory (2,048 tokens) | prefill tok/s | decode tok/s | run |")
    lines = [head, "|" + "---|" * (8 + len(doms))]
    for r in rows:
        sp = r.get("speed") or {}
        v = r.get("verify_vs_memory") or {}
        dec = sp.get("decode_tok_s")
        lines.append(f"| {r['name']} | {r['size_bytes'] / 1e6:.1f} | {r['kld_mean']:.4f} | {r['top1']:.4f} | "
                     + " | ".join(f"{r['domains'][d]['kld_mean']:.4f}" for d in doms)
                     + f" | {v.get('kld_mean', float('nan')):.2e} | {sp.get('prefill_tok_s', float('nan')):.0f} "
                     f"| {'no KV cache' if sp and dec is None else f'{dec:.1f}' if dec else ''} | {prov_ref(rows, r)} |")
    loads = sorted({round(r["speed"]["load_before_pass"], 2) for r in rows if r.get("speed")})
    nbits = next((r["export"] for r in rows if r.get("export") and r["name"] == ROWS[2]), {})
    body = ("SmolLM2-135M-Instruct, GPTQ Q4_0 (calib:mix 128 x 512); KLD and top-1 against the float "
            "reference on each evaluation domain, scored in each file's own runtime. "
            f"MatMulNBits export: {nbits.get('matmul_nbits', 0)} linears carry their codes, kept float: "
            f"{json.dumps(nbits.get('kept_float', {}))}. The embedding (tied head) is float32 in the first "
            "MatMulNBits graph and Q8_0 in the 'embedding Q8_0' one (GatherBlockQuantized for the lookup, an "
            "8-bit MatMulNBits for the head, on the same codes, as the GGUF holds them); onnxruntime's dynamic "
            "int8 quantizes the float embedding (and every other float MatMul) to int8.\n\n"
            f"Speed pass: 1-minute load average before it {loads} (above ~0.5, another job shared the cores).\n\n"
            + "\n".join(lines) + "\n\nRuns:\n" + provenance_lines(rows))
    write_result("onnx_lm", "A compressed LM in onnxruntime (MatMulNBits) next to llama.cpp", body)


if __name__ == "__main__":
    main()
