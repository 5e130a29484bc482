"""The task path's operations as functions: fine-tune a teacher, distill a student, evaluate,
export to ONNX. Each writes its output directory atomically with ``task_run.json`` beside the
model (the settings, data provenance, scores and timings of the run)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from compactor.data.labeled import load_labeled
from compactor.errors import CompactorError
from compactor.io import atomic_dir
from compactor.task.batches import encode
from compactor.task.model import TaskModel, load_task, parameter_count, save_task
from compactor.task.train import TaskTrainConfig, TaskTrainer

RUN_FILE = "task_run.json"


def _data(spec: str, tokenizer, cfg: TaskTrainConfig, names=None):
    lab = load_labeled(spec, names=names)
    if len(lab) == 0:
        raise CompactorError(f"{spec}: the split is empty")
    return lab, encode(tokenizer, lab.texts, lab.labels, cfg.max_length)


def _work(out: Path) -> Path:
    return out.with_name(f".{out.name}.work")  # checkpoints live beside the output, for --resume


def finetune(source: str, train: str, dev: str | None, out: str | Path, cfg: TaskTrainConfig,
             progress: bool = True, resume: bool = False, overwrite: bool = False) -> dict:
    """Fine-tune an encoder (+ a new mean-pooled head, seeded by ``cfg.seed``) on ``train``
    with cross-entropy: the task teacher."""
    out = Path(out)
    lab = load_labeled(train)
    with torch.random.fork_rng(devices=[]):  # the head's init from the run's seed, global RNG untouched
        torch.manual_seed(cfg.seed)
        task = load_task(source, lab.names)
    if task.has_head and cfg.alpha:
        raise CompactorError("fine-tuning trains on labels only (alpha 0); use distill --task classify for KD")
    tr = encode(task.tokenizer, lab.texts, lab.labels, cfg.max_length)
    dv = _data(dev, task.tokenizer, cfg, lab.names)[1] if dev else None
    trainer = TaskTrainer(task.model, tr, cfg, _work(out), dev=dv, progress=progress)
    rec = trainer.run(resume=resume)
    record = {"kind": "finetune", "source": source, "train": lab.provenance, "dev": dev,
              "params": parameter_count(task.model), **rec}
    _save(task.model, task.tokenizer, out, record, overwrite)
    trainer.cleanup()
    return record


def distill_task(teacher_dir: str, student_spec: str, train: str, dev: str | None, out: str | Path,
                 cfg: TaskTrainConfig, trim_vocab: bool = False, progress: bool = True,
                 resume: bool = False, overwrite: bool = False) -> dict:
    """A student of ``teacher_dir`` (``layers:...``, see :mod:`compactor.task.students`),
    optionally with the vocabulary trimmed to the train texts, trained by task KD."""
    from compactor.task.students import choose_layers, kept_tokens, layer_student, trim_vocabulary

    out = Path(out)
    teacher = load_task(teacher_dir)
    if not teacher.has_head:
        raise CompactorError(f"{teacher_dir}: the teacher has no classification head (fine-tune it first: "
                             "compactor finetune)")
    lab, tr = _data(train, teacher.tokenizer, cfg, teacher.model.labels)
    parts = student_spec.split("+")
    layer_spec = [p for p in parts if p.startswith("layers:")]
    head_spec = [p for p in parts if p.startswith("heads:")]
    if len(layer_spec) + len(head_spec) != len(parts) or len(layer_spec) > 1 or len(head_spec) > 1:
        raise CompactorError(f"student {student_spec!r}: expected layers:..., heads:F, or layers:...+heads:F")
    sample = [tr.batch(idx) for idx in list(tr.by_length(32))[::16]]  # importance: ~1/16 of train
    n_layers = teacher.model.config.num_hidden_layers
    keep = choose_layers(teacher, layer_spec[0], [b[:2] for b in sample]) if layer_spec else list(range(n_layers))
    student = layer_student(teacher, keep)
    heads = None
    if head_spec:
        from compactor.task.heads import choose_heads, head_importance, prune_heads

        try:
            fraction = float(head_spec[0].split(":", 1)[1])
        except ValueError:
            raise CompactorError(f"student {student_spec!r}: heads:F takes a fraction such as 0.5") from None
        heads = choose_heads(head_importance(student, teacher.adapter, sample), fraction)
        prune_heads(student, teacher.adapter, heads)
    tokenizer, vocab = teacher.tokenizer, None
    if trim_vocab:
        ids = kept_tokens(teacher.tokenizer, lab.texts)
        student, tokenizer = trim_vocabulary(student, teacher.tokenizer, ids, teacher.adapter)
        vocab = {"kept": len(ids), "of": teacher.model.config.vocab_size}
    # Teacher and student see the same texts; a trimmed student spells some words differently,
    # so the teacher keeps its own tokenization (its soft targets are per example, not per token).
    tr_s = tr if not trim_vocab else _data(train, tokenizer, cfg, teacher.model.labels)[1]
    dv = _data(dev, tokenizer, cfg, teacher.model.labels)[1] if dev else None
    trainer = TaskTrainer(student, tr_s, cfg, _work(out), teacher=teacher.model, dev=dv, layer_map=keep,
                          progress=progress, teacher_train=tr if trim_vocab else None)
    rec = trainer.run(resume=resume)
    record = {"kind": "distill", "teacher": teacher_dir, "student": student_spec, "layers": keep, "heads": heads,
              "vocabulary": vocab, "train": lab.provenance, "dev": dev,
              "params": parameter_count(student), "teacher_params": parameter_count(teacher.model), **rec}
    _save(student, tokenizer, out, record, overwrite)
    trainer.cleanup()
    return record


def _save(model: TaskModel, tokenizer, out: Path, record: dict, overwrite: bool) -> None:
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_task(model, tokenizer, tmp)
        (tmp / RUN_FILE).write_text(json.dumps(record, indent=1, default=str))


def eval_task(model: str, data: str, speed: bool = True, max_length: int = 128) -> dict:
    """Accuracy, macro-F1, confusion matrix (and CPU latency) of a task model directory or an
    exported ``.onnx`` graph (its directory's tokenizer) on ``data``."""
    from compactor.task.evaluate import OnnxClassifier, latency, predict_onnx, predict_torch

    path = Path(model)
    t0 = time.perf_counter()
    if path.suffix == ".onnx":
        from compactor.task.model import load_task_meta

        if not path.is_file():
            raise CompactorError(f"{path}: no such ONNX file")
        tokenizer, names = load_task_meta(path.parent)
        run = OnnxClassifier(path)
        lab = load_labeled(data, names=names)
        enc = encode(tokenizer, lab.texts, lab.labels, max_length)
        pred = predict_onnx(run, enc, names)
        runtime, size, params = "onnxruntime", path.stat().st_size, None
    else:
        task = load_task(model)
        if not task.has_head:
            raise CompactorError(f"{model}: no classification head to evaluate (task.json missing)")
        lab = load_labeled(data, names=task.model.labels)
        enc = encode(task.tokenizer, lab.texts, lab.labels, max_length)
        pred = predict_torch(task.model, enc)
        runtime, params = "torch", parameter_count(task.model)
        size = sum(f.stat().st_size for f in task.path.glob("*.safetensors"))

        def run(ids, mask):
            return task.model(ids, mask).logits
    res = {"model": model, "runtime": runtime, "data": lab.provenance, "size_bytes": size,
           "params": params, **pred.scores}
    if speed:
        res["latency"] = latency(run, enc)
    res["seconds"] = time.perf_counter() - t0
    return res


def export_task(model: str, out: str | Path, int8: str | None, calib: str, eval_data: str,
                overwrite: bool = False, max_length: int = 128) -> dict:
    """ONNX (+ int8) of a task model into ``out`` (with its tokenizer, head and labels, so
    ``eval`` reads it), verified in onnxruntime on ``eval_data``."""
    from compactor.task.onnx import export_task_onnx, verify_task_onnx

    task = load_task(model)
    if not task.has_head:
        raise CompactorError(f"{model}: no classification head to export (task.json missing)")
    names = task.model.labels
    cal = None
    if int8 == "static":
        lab = load_labeled(calib, names=names)
        n = min(len(lab), 512)  # MinMax ranges settle within a few hundred texts
        cal = encode(task.tokenizer, lab.texts[:n], lab.labels[:n], max_length)
    ev = load_labeled(eval_data, names=names)
    enc = encode(task.tokenizer, ev.texts, ev.labels, max_length)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        summary = export_task_onnx(task.model, tmp, int8, cal)
        checks = [verify_task_onnx(task.model, tmp / summary.get("float_file", summary["file"]), enc, False)]
        if int8:
            checks.append(verify_task_onnx(task.model, tmp / summary["file"], enc, True))
        bad = [c for c in checks if not c["passed"]]
        if bad:
            c = bad[0]
            raise CompactorError(f"{c['file']} failed verification in onnxruntime: agreement {c['agreement']:.4f} "
                                 f"(need {c['min_agreement']}), max logit diff {c['max_logit_diff']:.2e}")
        save_task(task.model, task.tokenizer, tmp, weights=False)  # the graph carries the weights
        record = {"kind": "export", "model": model, "int8": int8, "calib": calib if cal else None,
                  **summary, "verify": checks}
        (tmp / RUN_FILE).write_text(json.dumps(record, indent=1, default=str))
    return record
