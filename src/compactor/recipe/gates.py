"""Quality gates: limits a stage's evaluation must meet against the reference.

A stage may carry ``gate: {max_kld: 0.1, max_ppl_ratio: 1.05, min_top1: 0.8, max_size_mb: 90,
max_bpw: 5.0, min_decode_speedup: 1.5}``. After the stage is evaluated each limit is checked;
a failed gate stops the run (exit code 3) with a one-line message giving the measured value
and the limit, and the output directory holds the model of the last stage that passed.
``min_accuracy_retention`` (accuracy / the reference's accuracy) is for task models
(:func:`check_task_gate`, ``compactor eval --task classify --reference``); an LM evaluation
refuses it by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from compactor.config import StepConfig, check


@dataclass(frozen=True)
class Gate(StepConfig):
    """Limits on a stage's evaluation (None: not checked)."""

    name = "gate"
    max_kld: float | None = None
    max_ppl_ratio: float | None = None  # candidate PPL / reference PPL
    min_top1: float | None = None
    max_size_mb: float | None = None
    max_bpw: float | None = None
    min_decode_speedup: float | None = None  # candidate decode tok/s over the reference's
    min_accuracy_retention: float | None = None

    def validate(self) -> None:
        for k in self.field_names():
            v = getattr(self, k)
            check(v is None or v > 0, f"gate.{k} must be positive, got {v}")
        check(self.min_top1 is None or self.min_top1 <= 1, f"gate.min_top1 is a fraction, got {self.min_top1}")

    @property
    def empty(self) -> bool:
        return all(getattr(self, k) is None for k in self.field_names())

    def needs_reference(self) -> bool:
        return any(getattr(self, k) is not None for k in ("max_kld", "max_ppl_ratio", "min_top1"))


def check_gate(gate: Gate, result, reference_decode: float | None = None) -> list[dict]:
    """Every limit of ``gate`` against an :class:`EvalResult`: (name, measured, limit, ok)."""
    from compactor.errors import ConfigError

    if gate.min_accuracy_retention is not None:
        raise ConfigError("gate.min_accuracy_retention needs a task model's accuracy (compactor eval "
                          "--task classify --reference TEACHER); a language model's evaluation has none")
    measured = {
        "max_kld": result.kld_mean,
        "max_ppl_ratio": None if result.ref_ppl is None else result.ppl / result.ref_ppl,
        "min_top1": result.top1,
        "max_size_mb": result.size_bytes / 1e6,
        "max_bpw": result.bpw,
        "min_decode_speedup": (None if not (reference_decode and result.decode_tok_s)
                               else result.decode_tok_s / reference_decode),
    }
    return _compare(gate, measured)


def _compare(gate: Gate, measured: dict) -> list[dict]:
    """Each set limit of ``gate`` against its measured value (None: not measured, fails)."""
    out = []
    for k, value in measured.items():
        limit = getattr(gate, k)
        if limit is None:
            continue
        ok = value is not None and (value <= limit if k.startswith("max_") else value >= limit)
        out.append({"gate": k, "measured": value, "limit": limit, "passed": bool(ok)})
    return out


def check_task_gate(gate: Gate, result: dict, reference: dict | None) -> list[dict]:
    """The limits of ``gate`` that apply to a task evaluation (``compactor.task.api.eval_task``
    results): accuracy retention against ``reference``'s result, and size."""
    from compactor.errors import ConfigError

    lm_only = [k for k in ("max_kld", "max_ppl_ratio", "min_top1", "max_bpw", "min_decode_speedup")
               if getattr(gate, k) is not None]
    if lm_only:
        raise ConfigError(f"gate.{lm_only[0]} is a language-model limit; task models take "
                          "min_accuracy_retention and max_size_mb")
    measured = {"min_accuracy_retention": None if reference is None else result["accuracy"] / reference["accuracy"],
                "max_size_mb": result["size_bytes"] / 1e6}
    if gate.min_accuracy_retention is not None and reference is None:
        raise ConfigError("gate.min_accuracy_retention needs a reference (--reference TEACHER)")
    return _compare(gate, measured)


def describe_failure(stage: str, checks: list[dict], kept: str) -> str:
    bad = [c for c in checks if not c["passed"]]
    parts = [f"{c['gate']}: measured {'not measured' if c['measured'] is None else format(c['measured'], '.4g')}"
             f" vs limit {c['limit']:.4g}" for c in bad]
    return f"stage {stage!r} failed its gate ({'; '.join(parts)}); {kept}"
