"""The DistilBERT table on this CPU: all-MiniLM-L6-v2 fine-tuned on the labeled tweets, 3-layer
students by plain fine-tuning and by task KD, ONNX fp32 and onnxruntime int8 (dynamic, static).

    python bench/encoder.py [--models ...] [--resume] [--no-speed] [--speed-only] [--table-only]

* Data: ``tweets:train`` (12,762 texts after deduplication) to train, ``tweets:dev`` for the
  per-epoch dev scores in each model's log, ``tweets:test`` (3,715) for every figure below;
  max 64 tokens (the longest training tweet has 74, the 95th percentile 51).
* Teacher: ``minilm-l6`` + a mean-pooled linear head, cross-entropy (``compactor.task.api.finetune``).
* Every model trains one epoch (batches grouped by length, 50 at a time, to pad little).
* Students: 3 of the 6 layers, initialized from the teacher (every other / lowest /
  block-influence), trained with CE only or with KD (α·T²·KL + (1−α)·CE, optionally the
  hidden-state cosine loss); one student also trims its vocabulary to the train texts' tokens.
* Every model is scored in torch and, exported, in onnxruntime (fp32 fused graph; int8 dynamic;
  int8 static QDQ calibrated on 512 train texts); exports are verified against the torch
  model (agreement on test) before they are scored.
* Latency: onnxruntime / torch with 2 threads, batch-1 median over 200 test texts and
  batch-32 sentences/s over 640, measured for all rows in one ``--speed-only`` pass so they
  are side by side; the 1-minute load average before that pass is recorded.

Settings were fixed before any test score was seen; nothing was tuned on ``tweets:test``.
Rows are stored in bench/results/encoder.json as they finish (``--resume`` skips them).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _common import RESULTS, prov_ref, provenance, provenance_lines, write_result

from compactor.errors import CompactorError
from compactor.io import home
from compactor.task.api import distill_task, eval_task, export_task, finetune
from compactor.task.train import TaskTrainConfig

JSON = RESULTS / "encoder.json"
TRAIN, DEV, TEST = "tweets:train", "tweets:dev", "tweets:test"
BASE = dict(max_length=64, batch=32, lr=1e-4, head_lr=1e-3, checkpoint_every=50)
#: model -> (kind, student spec, settings, trim vocabulary)
MODELS = {
    "teacher": ("finetune", None, dict(epochs=1.0), False),
    "student CE": ("distill", "layers:0.5", dict(epochs=1.0, alpha=0.0), False),
    "student KD": ("distill", "layers:0.5", dict(epochs=1.0, alpha=0.7, temperature=2.0), False),
    "student KD trim": ("distill", "layers:0.5", dict(epochs=1.0, alpha=0.7, temperature=2.0), True),
    # Michel head-mask importance on the 3-layer student, half its heads kept, then KD
    "student KD heads:0.5": ("distill", "layers:0.5+heads:0.5", dict(epochs=1.0, alpha=0.7, temperature=2.0), False),
    # the ablation: which initialization, and the hidden-state cosine term
    "student KD lower": ("distill", "layers:0.5:lower", dict(epochs=1.0, alpha=0.7, temperature=2.0), False),
    "student KD importance": ("distill", "layers:0.5:importance", dict(epochs=1.0, alpha=0.7, temperature=2.0), False),
    "student KD + cosine": ("distill", "layers:0.5", dict(epochs=1.0, alpha=0.7, temperature=2.0, cosine=1.0), False),
}
FORMATS = ("torch", "torch int8 dynamic", "onnx fp32", "onnx int8 dynamic", "onnx int8 static")
#: PyTorch's own dynamic int8 of the Linear layers (torch.ao, deprecated in 2.13): the seeds'
#: baseline, scored in torch; not a compactor deployment path.
TORCH_INT8 = "torch int8 dynamic"


def _work() -> Path:
    return home() / "bench" / "encoder"


def _dir(name: str) -> Path:
    return _work() / name.replace(" ", "_").replace("+", "plus").replace(":", "")


def _train(name: str, resume: bool) -> tuple[Path, dict]:
    kind, spec, settings, trim = MODELS[name]
    out = _dir(name)
    if (out / "task_run.json").exists():
        return out, json.loads((out / "task_run.json").read_text())
    cfg = TaskTrainConfig(**BASE, **settings)
    if kind == "finetune":
        rec = finetune("minilm-l6", TRAIN, DEV, out, cfg, resume=resume, overwrite=True)
    else:
        teacher = _train("teacher", resume)[0]
        rec = distill_task(str(teacher), spec, TRAIN, DEV, out, cfg, trim_vocab=trim, resume=resume, overwrite=True)
    return out, rec


def _torch_int8(model_dir: Path):
    """(task, quantized model, serialized bytes) of PyTorch's dynamic int8 of the Linears."""
    import io
    import warnings

    import torch

    from compactor.task.model import load_task

    task = load_task(str(model_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        q = torch.ao.quantization.quantize_dynamic(task.model, {torch.nn.Linear}, dtype=torch.qint8)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    return task, q, buf.tell()


def _eval_torch_int8(model_dir: Path) -> dict:
    from compactor.data.labeled import load_labeled
    from compactor.task.batches import encode
    from compactor.task.evaluate import predict_torch

    task, q, size = _torch_int8(model_dir)
    lab = load_labeled(TEST, names=task.model.labels)
    pred = predict_torch(q, encode(task.tokenizer, lab.texts, lab.labels, BASE["max_length"]))
    return {**pred.scores, "size_bytes": size}


def _file(model_dir: Path, fmt: str) -> tuple[str, dict | None]:
    """The path ``eval`` scores for ``fmt`` (exporting, and verifying, first)."""
    if fmt in ("torch", TORCH_INT8):
        return str(model_dir), None
    mode = {"onnx fp32": None, "onnx int8 dynamic": "dynamic", "onnx int8 static": "static"}[fmt]
    out = model_dir.with_name(model_dir.name + f".onnx-{mode or 'fp32'}")
    run = out / "task_run.json"
    if not run.exists():
        export_task(str(model_dir), out, mode, TRAIN, TEST, overwrite=True, max_length=BASE["max_length"])
    rec = json.loads(run.read_text())
    return str(out / rec["file"]), rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--formats", nargs="*", default=list(FORMATS))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--speed-only", action="store_true", help="measure latency of the stored rows lacking it")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    records = json.loads(JSON.read_text()) if JSON.exists() and (args.resume or args.table_only or args.speed_only) else []
    prov = provenance()
    if not args.table_only and not args.speed_only:
        done = {(r["model"], r["format"]) for r in records}
        for name in args.models:
            model_dir, train_rec = _train(name, args.resume)
            for fmt in args.formats:
                if (name, fmt) in done:
                    continue
                try:
                    path, export_rec = _file(model_dir, fmt)
                except CompactorError as exc:  # a graph that fails verification is a result too
                    records.append({"model": name, "format": fmt, "prov": prov, "export_failed": str(exc)})
                    JSON.write_text(json.dumps(records, indent=1))
                    print(f"{name} / {fmt}: {exc}", flush=True)
                    continue
                res = (_eval_torch_int8(model_dir) if fmt == TORCH_INT8 else
                       eval_task(path, TEST, speed=False, max_length=BASE["max_length"]))
                records.append({"model": name, "format": fmt, "prov": prov, "load_before": os.getloadavg()[0],
                                "train": {k: train_rec.get(k) for k in ("kind", "student", "layers", "vocabulary",
                                                                         "params", "seconds", "steps", "config")},
                                "dev_last": (train_rec.get("dev") or [{}])[-1].get("macro_f1"),
                                "export": export_rec and {k: export_rec[k] for k in ("fused_ops", "int8", "verify")},
                                **{k: res[k] for k in ("accuracy", "macro_f1", "f1", "confusion", "size_bytes")}})
                JSON.parent.mkdir(parents=True, exist_ok=True)
                JSON.write_text(json.dumps(records, indent=1))
                print(f"{name} / {fmt}: acc {res['accuracy']:.4f} macro-F1 {res['macro_f1']:.4f} "
                      f"{res['size_bytes'] / 1e6:.1f} MB", flush=True)
    if args.speed_only or not args.no_speed:
        _speed(records, prov)
    render(records)


def _speed(records: list[dict], prov: dict) -> None:
    """Latency of every row lacking it, in one pass (side by side), load average recorded."""
    from compactor.data.labeled import load_labeled
    from compactor.task.batches import encode
    from compactor.task.evaluate import OnnxClassifier, latency
    from compactor.task.model import load_task, load_task_meta

    load = os.getloadavg()[0]
    for r in records:
        if r.get("latency") or r.get("export_failed"):
            continue
        model_dir = _dir(r["model"])
        path, _ = _file(model_dir, r["format"])
        if r["format"] in ("torch", TORCH_INT8):
            import torch

            torch.set_num_threads(2)
            task = load_task(path)
            model = _torch_int8(model_dir)[1] if r["format"] == TORCH_INT8 else task.model
            tok, names = task.tokenizer, task.model.labels

            def run(ids, mask, m=model):
                return m(ids, mask).logits
        else:
            tok, names = load_task_meta(Path(path).parent)
            run = OnnxClassifier(path, threads=2)
        lab = load_labeled(TEST, names=names)
        enc = encode(tok, lab.texts, lab.labels, BASE["max_length"])
        r["latency"] = {**latency(run, enc), "load_before_pass": load, "prov": prov}
        JSON.write_text(json.dumps(records, indent=1))
        print(f"{r['model']} / {r['format']}: {r['latency']['batch1_ms']:.2f} ms, "
              f"{r['latency']['batch32_sent_s']:.0f} sent/s", flush=True)


def render(records: list[dict]) -> None:
    by = {(r["model"], r["format"]): r for r in records}
    t = by.get(("teacher", "torch"))
    t_onnx = by.get(("teacher", "onnx fp32"))
    lines = ["| model | format | params | file MB | accuracy | macro-F1 | retention (macro-F1) | size vs teacher fp32 "
             "| batch-1 ms | batch-32 sent/s | batch-1 speed-up vs teacher (same runtime) | agreement with torch | run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("export_failed"):
            lines.append(f"| {r['model']} | {r['format']} | refused: {r['export_failed'][:160]} |" + " |" * 10)
            continue
        ret = f"{r['macro_f1'] / t['macro_f1']:.3f}" if t else ""
        size_ratio = f"{r['size_bytes'] / t_onnx['size_bytes']:.3f}" if t_onnx else ""
        lat = r.get("latency") or {}
        ref = by.get(("teacher", "torch" if r["format"].startswith("torch") else "onnx fp32"), {}).get("latency") or {}
        speedup = f"{ref['batch1_ms'] / lat['batch1_ms']:.2f}×" if lat and ref else ""
        agree = (r.get("export") or {}).get("verify") or []
        agree = f"{agree[-1]['agreement']:.4f}" if agree else ""
        lines.append(f"| {r['model']} | {r['format']} | {(r['train'] or {}).get('params') or 0:,} "
                     f"| {r['size_bytes'] / 1e6:.1f} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {ret} | {size_ratio} "
                     f"| {lat.get('batch1_ms', float('nan')):.2f} | {lat.get('batch32_sent_s', float('nan')):.0f} "
                     f"| {speedup} | {agree} | {prov_ref(records, r)} |")
    train = ["| model | student | layers | vocabulary | steps | train s | dev macro-F1 (last epoch) | settings |",
             "|---|---|---|---|---|---|---|---|"]
    seen = set()
    for r in records:
        if r["model"] in seen or "train" not in r:
            continue
        seen.add(r["model"])
        tr = r["train"] or {}
        cfg = {k: v for k, v in (tr.get("config") or {}).items() if k in ("epochs", "lr", "alpha", "temperature",
                                                                         "cosine", "attention", "batch")}
        voc = tr.get("vocabulary")
        voc = f"{voc['kept']:,} of {voc['of']:,}" if voc else "full"
        train.append(f"| {r['model']} | {tr.get('student') or 'fine-tuned'} | {tr.get('layers') or 'all 6'} "
                     f"| {voc} | {tr.get('steps')} "
                     f"| {tr.get('seconds') or 0:.0f} | {r.get('dev_last') or float('nan'):.4f} | `{json.dumps(cfg)}` |")
    loads = sorted({round(r['latency']['load_before_pass'], 2) for r in records if r.get("latency")})
    n_test = sum(map(sum, records[0]["confusion"])) if records and "confusion" in records[0] else 0
    body = (f"Task: 3-way tweet sentiment (`tweets:test`, {n_test} texts). "
            "Retention = macro-F1 / the teacher's torch macro-F1. File MB: the torch row counts its safetensors "
            "files, the torch int8 row its serialized state dict (PyTorch's `quantize_dynamic` of the Linear "
            "layers, the seeds' baseline, deprecated in torch 2.13), ONNX rows the graph. Speed-up: batch-1 latency of the teacher in the same runtime "
            "(torch vs torch, ONNX vs ONNX fp32) over the row's.\n\n"
            f"Latency pass: 1-minute load average before it {loads} (above ~0.5, another job shared the cores).\n\n"
            + "\n".join(lines) + "\n\nTraining:\n\n" + "\n".join(train)
            + "\n\nRuns:\n" + provenance_lines(records))
    write_result("encoder", "Encoders: task distillation and onnxruntime int8 (all-MiniLM-L6-v2 on tweets)", body)


if __name__ == "__main__":
    main()
