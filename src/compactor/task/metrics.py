"""Classification metrics: pure functions of integer predictions and labels."""

from __future__ import annotations

import torch


def confusion(pred: torch.Tensor, gold: torch.Tensor, n: int) -> torch.Tensor:
    """``[n, n]`` counts: row = gold label, column = prediction."""
    return torch.bincount(gold.long() * n + pred.long(), minlength=n * n).reshape(n, n)


def accuracy(pred: torch.Tensor, gold: torch.Tensor) -> float:
    return float((pred == gold).float().mean()) if len(gold) else float("nan")


def per_label_f1(c: torch.Tensor) -> torch.Tensor:
    """F1 = 2·TP / (2·TP + FP + FN) per label from a confusion matrix ``[n, n]``; a label
    never predicted nor present scores 0 (scikit-learn's ``zero_division=0``)."""
    c = c.double()
    tp = c.diag()
    denom = 2 * tp + (c.sum(0) - tp) + (c.sum(1) - tp)             # 2TP + FP + FN
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, n: int) -> float:
    """Unweighted mean over the ``n`` labels of their F1."""
    return float(per_label_f1(confusion(pred, gold, n)).mean())


def scores(pred: torch.Tensor, gold: torch.Tensor, names: tuple[str, ...]) -> dict:
    """accuracy, macro-F1, per-label F1 and the confusion matrix, as plain JSON values."""
    c = confusion(pred, gold, len(names))
    f1 = per_label_f1(c)
    return {"accuracy": accuracy(pred, gold), "macro_f1": float(f1.mean()),
            "f1": {name: float(v) for name, v in zip(names, f1)},
            "confusion": c.tolist(), "labels": list(names), "examples": len(gold)}
