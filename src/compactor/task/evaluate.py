"""Task evaluation: predictions on a labeled split (in torch or in onnxruntime), accuracy,
macro-F1, the confusion matrix, agreement between two predictors, and CPU latency.

Latency is measured the way a service sees it: batch-1 is the median wall time of single
texts (tokenization excluded, the same texts for every model), batch-32 is sentences per
second over length-sorted batches of 32, after one warm-up pass.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from compactor.task.batches import Encoded
from compactor.task.metrics import scores


@dataclass
class Predictions:
    """Predicted labels ``[N]`` and logits ``[N, labels]`` in the data's order, with scores."""

    labels: torch.Tensor
    logits: torch.Tensor
    scores: dict


def _predict(run, data: Encoded, names, batch: int) -> Predictions:
    logits = torch.empty(len(data), len(names))
    for idx in data.by_length(batch):
        ids, mask, _ = data.batch(idx)
        logits[torch.as_tensor(idx)] = torch.as_tensor(run(ids, mask), dtype=torch.float32)
    pred = logits.argmax(-1)
    return Predictions(pred, logits, scores(pred, data.labels, tuple(names)))


@torch.no_grad()
def predict_torch(model, data: Encoded, batch: int = 64) -> Predictions:
    """The torch model's predictions on ``data`` (eval mode)."""
    model.eval()
    return _predict(lambda ids, mask: model(ids, mask).logits, data, model.labels, batch)


class OnnxClassifier:
    """An exported task graph (``input_ids, attention_mask -> logits``) in onnxruntime."""

    def __init__(self, path, threads: int = 2):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        feed = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy().astype(np.int64)}
        return self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]


def predict_onnx(clf: OnnxClassifier, data: Encoded, names, batch: int = 64) -> Predictions:
    return _predict(clf, data, names, batch)


def agreement(a: Predictions, b: Predictions) -> float:
    """Fraction of examples where the two predictors choose the same label."""
    return float((a.labels == b.labels).float().mean())


def latency(run, data: Encoded, single: int = 200, batched: int = 640, batch: int = 32,
            repeats: int = 3) -> dict:
    """batch-1 median ms over the first ``single`` examples, and batch-``batch`` sentences/s
    over the first ``batched`` (median of ``repeats`` passes)."""
    n1 = min(single, len(data))
    run(*data.batch([0])[:2])  # warm-up: onnxruntime and torch allocate on the first call
    times = []
    with torch.no_grad():
        for i in range(n1):
            ids, mask, _ = data.batch([i])
            t = time.perf_counter()
            run(ids, mask)
            times.append(time.perf_counter() - t)
        sub = Encoded(data.ids[:min(batched, len(data))], data.labels[:min(batched, len(data))], data.pad_id)
        batches = [sub.batch(idx)[:2] for idx in sub.by_length(batch)]
        passes = []
        for _ in range(repeats):
            t = time.perf_counter()
            for ids, mask in batches:
                run(ids, mask)
            passes.append(len(sub) / (time.perf_counter() - t))
    return {"batch1_ms": 1000 * statistics.median(times), "batch1_examples": n1,
            "batch32_sent_s": statistics.median(passes), "batch32_examples": len(sub),
            "batch_size": batch, "repeats": repeats}
