"""Quantization-aware distillation (QAD) against GPTQ at the same bytes, every file scored in
llama.cpp on every evaluation domain.

    python bench/qat.py [--rows ...] [--eval-tokens 4096] [--resume] [--table-only]

* PTQ rows: GPTQ on the decoder linears of SmolLM2-135M (calib:mix, 128 x 512 tokens),
  exported to GGUF with the embedding (tied head) at Q8_0 and verified in llama.cpp.
* QAD rows: the same GPTQ output as initialization, then the ``qat`` step — KL to the float
  original through straight-through fake quantization in the exact GGUF grid, latent weights
  and the format's fp16 scales learned, trained on ``calib:mix`` text (window 256) for the
  row's token budget — exported with the trained codes repacked (no re-rounding) and
  verified in llama.cpp like every export.
* Every file: size, and per evaluation domain (Austen prose, Python code, technical prose,
  C headers; the C headers are in no calibration or training set) mean KLD against the float
  reference, p99, top-1 and PPL, all computed from llama.cpp's logits.

Rows are stored in bench/results/qat.json as they finish (``--resume`` skips them and
continues an interrupted QAD from its checkpoints); the table renders only from that file.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from _common import RESULTS, prov_ref, provenance, provenance_lines, write_result

from compactor.data.windows import domain_windows
from compactor.evaluate import evaluate
from compactor.evaluate.backends import CachedBackend, LlamaCppBackend, TorchBackend
from compactor.io import home
from compactor.models.load import load_model
from compactor.recipe import Recipe, run_recipe

BASE = "smollm2-135m"
#: row -> (kind, grid, QAD tokens, qat settings)
ROWS = {
    "gptq q4_0": ("ptq", "q4_0", 0, {}),
    "qad q4_0 16k": ("qad", "q4_0", 16384, {}),  # a first look: 8 optimizer steps
    "qad q4_0 64k": ("qad", "q4_0", 65536, {}),
    "qad q4_0 64k scales only": ("qad", "q4_0", 65536, {"learn": "scales", "scale_lr": 1.0}),
    "qad q4_0 256k": ("qad", "q4_0", 262144, {}),
    "gptq q3_k": ("ptq", "q3_k", 0, {}),
    "qad q3_k 64k": ("qad", "q3_k", 65536, {}),
    # LoRA r16 by KD over the GPTQ Q4_0 base: the adapter file beside the base in llama.cpp,
    # then the same adapter merged (GPTQ re-quantization on the grid / float linears)
    "lora r16 128k q4_0 (adapter)": ("lora", "q4_0", 131072, {"rank": 16, "alpha": 32.0}),
    "lora r16 128k q4_0 merged requantize": ("merge", "q4_0", 131072, {"merge": "requantize"}),
    "lora r16 128k q4_0 merged float (f16 linears)": ("merge", "q4_0", 131072, {"merge": "float"}),
    # The peer path, as a torchao user ships to llama.cpp: QAT of the float model with torchao's
    # int4 g32 symmetric fake quantization (its own venv: bench/qat_torchao.py), the trained
    # float weights exported, then llama.cpp's Q4_0 + imatrix; and the same without QAT.
    "llama.cpp q4_0 + imatrix (no QAT)": ("llamacpp", "q4_0", 0, {}),
    "torchao qat 64k -> llama.cpp q4_0 + imatrix": ("torchao", "q4_0", 65536, {"weight": "int4 g32 symmetric"}),
}
LORA = {"window": 256, "batch": 8, "micro_batch": 4, "lr": 2e-4, "eval_tokens": 4096, "checkpoint_every": 8}
JSON = RESULTS / "qat.json"
PTQ = {"diag_mix": 0.1}  # the GPTQ settings of every PTQ row and QAD init (recorded per row)
# lr: at 32 steps (64k tokens) Adam moves a latent weight by at most ~32 x 5e-5 = 1.6e-3, about a
# tenth of a typical Q4_0 step on SmolLM2, so codes can flip near their boundaries; scales move
# at a fifth of that rate. Chosen a priori (not tuned on any evaluation split).
QAT = {"window": 256, "batch": 8, "micro_batch": 4, "lr": 5e-5, "scale_lr": 0.2, "eval_tokens": 4096,
       "eval_data": "chat:eval", "checkpoint_every": 8}


def _ptq_dir(work, grid):
    out = work / f"ptq-{grid}"
    if not (out / "model.gguf").exists():
        recipe = Recipe.from_dict({
            "model": BASE, "eval": {"after_each_stage": False, "speed": False},
            "calibration": {"data": "calib:mix", "samples": 128, "window": 512},
            "stages": [{"name": "gptq", "steps": [{"gptq": {"grid": grid, **PTQ}},
                                                  {"export": {"format": "gguf", "embed_type": "q8_0", "score": False}}]}]})
        run_recipe(recipe, out=out, overwrite=True, progress=False)
    return out


def _qad_dir(work, grid, tokens, settings, name, resume):
    ptq = _ptq_dir(work, grid)
    out = work / name.replace(" ", "-")
    if (out / "model.gguf").exists():
        return out, json.loads((out / "provenance.json").read_text())
    recipe = Recipe.from_dict({
        "model": str(ptq), "reference": BASE, "eval": {"after_each_stage": False, "speed": False},
        "stages": [{"name": "qad", "steps": [
            {"qat": {"teacher": BASE, "tokens": tokens, **QAT, **settings}},
            {"export": {"format": "gguf", "embed_type": "q8_0", "score": False}}]}]})
    run_recipe(recipe, out=out, overwrite=not resume, resume=resume)
    return out, json.loads((out / "provenance.json").read_text())


def _lora_dir(work, grid, tokens, settings, resume):
    ptq = _ptq_dir(work, grid)
    out = work / f"lora-{grid}-{tokens}"
    if not (out / "model.gguf").exists():
        recipe = Recipe.from_dict({
            "model": str(ptq), "reference": BASE, "eval": {"after_each_stage": False, "speed": False},
            "stages": [{"name": "lora", "steps": [
                {"lora": {"teacher": BASE, "tokens": tokens, **LORA, **settings}},
                {"export": {"format": "gguf", "embed_type": "q8_0", "score": False}}]}]})
        run_recipe(recipe, out=out, overwrite=not resume, resume=resume)
    return out


def _merged_dir(work, grid, tokens, settings):
    src = work / f"lora-{grid}-{tokens}"
    if not (src / "model.gguf").exists():
        raise SystemExit(f"{src}: run the adapter row first")
    out = work / f"lora-{grid}-{tokens}-{settings['merge']}"
    if not (out / "model.gguf").exists():
        export = {"format": "gguf", "embed_type": "q8_0", "score": False, **({"type": "f16"} if settings["merge"] == "float" else {})}
        recipe = Recipe.from_dict({
            "model": str(src), "reference": BASE, "eval": {"after_each_stage": False, "speed": False},
            "calibration": {"data": "calib:mix", "samples": 128, "window": 512},
            "stages": [{"name": "merge", "steps": [{"lora_merge": settings}, {"export": export}]}]})
        run_recipe(recipe, out=out, overwrite=True, progress=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--eval-tokens", type=int, default=4096, help="per evaluation domain")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    records = json.loads(JSON.read_text()) if JSON.exists() and (args.resume or args.table_only) else []
    if args.table_only:
        return render(records)
    provenance()
    work = home() / "bench" / "qat"
    work.mkdir(parents=True, exist_ok=True)
    ref = load_model(BASE)
    win = domain_windows(ref.tokenizer, "domains", 512, max_tokens=args.eval_tokens)
    cached = CachedBackend(TorchBackend(ref.model, "reference"), half=True, directory=work / "reference-logits")
    for name in args.rows:
        if any(r["row"] == name for r in records):
            continue
        kind, grid, tokens, settings = ROWS[name]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        lora_file = None
        if kind == "ptq":
            out, train = _ptq_dir(work, grid), None
        elif kind in ("lora", "merge"):
            out = _lora_dir(work, grid, tokens, settings, args.resume) if kind == "lora" else \
                _merged_dir(work, grid, tokens, settings)
            src = work / f"lora-{grid}-{tokens}"
            prov = json.loads((src / "provenance.json").read_text())
            train = next(r for r in prov["reports"] if r["step"] == "lora")
            lora_file = out / "model.lora.gguf" if kind == "lora" else None
        elif kind in ("llamacpp", "torchao"):
            from qat_torchao import peer_dir

            out, train = peer_dir(work, ref, name, kind, tokens, QAT, args.resume)
        else:
            out, prov = _qad_dir(work, grid, tokens, settings, name, args.resume)
            train = next(r for r in prov["reports"] if r["step"] == "qat")
        seconds = time.perf_counter() - t0
        gguf = out / "model.gguf"
        runtime = LlamaCppBackend(gguf, n_ctx=1024, lora_path=lora_file)
        r = evaluate(runtime, win, reference=cached, speed=False, name=name, progress=False)
        runtime.close()
        rec = {"row": name, "kind": kind, "grid": grid, "tokens": tokens, "settings": settings,
               "ptq": PTQ, "qat": QAT if kind in ("qad", "torchao") else None, "lora": LORA if kind in ("lora", "merge") else None,
               "file_bytes": gguf.stat().st_size + (lora_file.stat().st_size if lora_file else 0),
               "adapter_bytes": lora_file.stat().st_size if lora_file else 0,
               "kld_mean": r.kld_mean, "ppl": r.ppl, "domains": r.domains, "seconds": round(seconds, 1),
               "load_before": round(load, 2),
               "train": None if train is None else {k: train.get(k) for k in (
                   "tokens", "steps", "train_seconds", "train_tok_s", "learned", "frozen_modules", "rank", "alpha",
                   "before", "after", "precision", "resumed_from", "torchao", "weight_config")},
               "eval": {s: {"windows": len(w), "tokens_scored": w.n_scored} for s, w in win.items()},
               "prov": provenance()}
        records.append(rec)
        JSON.write_text(json.dumps(records, indent=1))
        print(name, {s: round(d["kld_mean"], 4) for s, d in r.domains.items()}, flush=True)
        render(records)


def _peer_text(records: list[dict]) -> str:
    """What the peer rows did, from their recorded settings."""
    out = ""
    for r in records:
        if r["kind"] == "torchao":
            t = r["train"]
            out += (f"'{r['row']}': torchao {t['torchao']} QAT ({t['weight_config']}) trained on the QAD rows' "
                    "data, objective and optimizer; its trained float weights exported and quantized by llama.cpp "
                    "(Q4_0 + an importance matrix of the trained model on calib:mix 128 x 512). ")
    if any(r["kind"] == "llamacpp" for r in records):
        out += "'llama.cpp q4_0 + imatrix (no QAT)': the same export and quantization of the untrained float model. "
    return out


def render(records: list[dict]) -> None:
    """Write qat.md from the stored rows."""
    if not records:
        return
    specs = list(records[0]["domains"])
    ptq = {r["grid"]: r for r in records if r["kind"] == "ptq"}
    head = ("| row | grid | QAD tokens | settings | file MB | " + " | ".join(f"{s} KLD" for s in specs)
            + " | mean KLD | share of GPTQ's KLD removed | top-1 (mean) | train tok/s (steps) | wall s "
            "| load before | run |\n|" + "---|" * (len(specs) + 12) + "\n")
    lines = []
    for r in records:
        kl = [r["domains"][s]["kld_mean"] for s in specs]
        mean = sum(kl) / len(kl)
        base = ptq.get(r["grid"])
        if base and r["kind"] != "ptq":
            b = sum(base["domains"][s]["kld_mean"] for s in specs) / len(specs)
            removed = f"{100 * (1 - mean / b):.1f} %"
        else:
            removed = "—"
        top1 = sum(r["domains"][s]["top1"] for s in specs) / len(specs)
        tok_s = f"{r['train']['train_tok_s']:.0f}" if r.get("train") else "—"
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "defaults"
        lines.append(f"| {r['row']} | {r['grid']} | {r['tokens'] or '—'} | {settings} | "
                     f"{r['file_bytes'] / 1e6:.2f} | " + " | ".join(f"{k:.4f}" for k in kl)
                     + f" | {mean:.4f} | {removed} | {100 * top1:.1f} % | {tok_s} | {r['seconds']:.0f} | "
                     f"{r['load_before']} | {prov_ref(records, r)} |")
    ev = records[0]["eval"]
    qat = next((r["qat"] for r in records if r.get("qat")), None)
    body = (
        "Every file is scored in llama.cpp (llama-cpp-python) against the float reference's logits, "
        "per evaluation domain: " + ", ".join(f"{s} ({v['windows']} x 512, {v['tokens_scored']} scored "
                                              "tokens)" for s, v in ev.items())
        + ". c:eval is in no calibration or training set. PTQ: GPTQ "
        + ", ".join(f"{k}={v}" for k, v in records[0]["ptq"].items())
        + " on calib:mix (128 x 512), embedding Q8_0. QAD: the qat step from that GPTQ output, KL to "
        "the float original, trained on calib:mix"
        + (" with " + ", ".join(f"{k}={v}" for k, v in qat.items()) if qat else "")
        + ". LoRA rows: adapters of the recorded rank by KD on calib:mix over the GPTQ Q4_0 base "
        "(its codes frozen); '(adapter)' runs base + adapter GGUF in llama.cpp (file MB counts both), "
        "the merged rows fold that same adapter in and re-quantize with GPTQ, or keep f16 linears "
        "(a reference: bigger file). " + _peer_text(records) + "'Share removed' compares mean KLD with the GPTQ row of the same grid (equal bytes: "
        "same types, same file size). Wall seconds include PTQ/training and export with its "
        "llama.cpp verification; load before above ~0.5 means another job shared the 2 cores.\n\n"
        + head + "\n".join(lines) + "\n\nRuns:\n\n" + provenance_lines(records))
    write_result("qat", "Quantization-aware distillation vs GPTQ at equal bytes (SmolLM2-135M, llama.cpp)",
                 body)


if __name__ == "__main__":
    main()
