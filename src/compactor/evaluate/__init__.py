"""Evaluation: the same metrics for in-memory models and exported files, on the same windows."""

from compactor.evaluate.harness import EvalResult, evaluate
from compactor.evaluate.report import table, to_json

__all__ = ["EvalResult", "evaluate", "table", "to_json"]
