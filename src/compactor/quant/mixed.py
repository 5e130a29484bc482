"""Mixed precision: per-module sensitivity on calibration data and a bit allocation that
meets a bits-per-weight budget (in the spirit of llama.cpp's --target-bpw and ModelOpt's
auto_quantize).

Sensitivity is the Hessian proxy of the output error each candidate grid causes when the
module is rounded to it: ``err(m, g) = tr(dW H dW^T) / n_out`` with ``dW = Q_g(W) - W`` and
``H`` the module's input Hessian. The allocation minimizes the summed error under the
budget by greedy upgrades in order of error saved per extra bit (exact for convex
error-vs-bits curves, and never over budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from compactor.config import StepConfig, check
from compactor.errors import CompactorError
from compactor.quant.spec import GRIDS, WeightQuantConfig, check_weight, resolve_grid
from compactor.registry import register


@dataclass(frozen=True)
class MixedPrecisionConfig(StepConfig):
    """Choose one grid per decoder linear from ``candidates`` so the average bits per weight
    of those linears is at most ``target_bpw``; quantize with RTN on the chosen grids."""

    name = "mixed_precision"
    needs_calibration = True
    candidates: tuple[str, ...] = ("q3_k", "q4_0", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0")
    target_bpw: float = 4.5
    calibration_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)

    def validate(self) -> None:
        check(len(self.candidates) >= 1, "mixed_precision.candidates must not be empty")
        for c in self.candidates:
            check(c in GRIDS and c not in ("int", "nf4"),
                  f"mixed_precision.candidates: {c!r} is not a GGUF grid")
        check(1.0 < self.target_bpw <= 16.0, f"mixed_precision.target_bpw must be in (1, 16], got {self.target_bpw}")


def sensitivity(W: torch.Tensor, H: torch.Tensor, fit) -> float:
    """Hessian proxy of the output error of rounding ``W [out, in]`` on a grid."""
    dW = fit(W, torch.diagonal(H)).fake_quantize(W) - W.float()
    return float(torch.einsum("oi,ij,oj->", dW, H, dW) / W.shape[0])


def allocate_bits(sizes: list[int], bits: list[list[float]], errors: list[list[float]],
                  budget_bpw: float) -> list[int]:
    """Pick one option per module: minimize the summed error with sum(size * bits) within
    ``budget_bpw * sum(size)``.

    ``bits[m][k]``, ``errors[m][k]``: option k of module m. Starts from every module's
    cheapest option, then repeatedly applies the affordable upgrade that saves the most
    error per extra bit, until none fits. Returns the chosen option indices.
    """
    total = sum(sizes)
    budget = budget_bpw * total
    choice = [min(range(len(b)), key=lambda k: (b[k], errors[m][k])) for m, b in enumerate(bits)]
    used = sum(s * bits[m][choice[m]] for m, s in enumerate(sizes))
    if used > budget * (1 + 1e-12):
        raise CompactorError(f"target {budget_bpw} bits per weight is below the cheapest candidates "
                             f"({used / total:.4f})")
    while True:
        best = None
        for m, s in enumerate(sizes):
            cur = choice[m]
            for k in range(len(bits[m])):
                dbits = s * (bits[m][k] - bits[m][cur])
                gain = errors[m][cur] - errors[m][k]
                if dbits <= 0 or gain <= 0 or used + dbits > budget * (1 + 1e-12):
                    continue
                if best is None or gain / dbits > best[0]:
                    best = (gain / dbits, m, k, dbits)
        if best is None:
            return choice
        _, m, k, dbits = best
        choice[m] = k
        used += dbits


@register(MixedPrecisionConfig, kind="plan")
def plan_mixed_precision(modules: dict[str, torch.nn.Linear], hessians: dict, cfg: MixedPrecisionConfig):
    """For named modules and their input Hessians: the chosen grid per module + a report."""
    names = list(modules)
    sizes, bits, errors, labels = [], [], [], []
    for n in names:
        W = modules[n].weight.detach()
        check_weight(W, n)
        opts = [resolve_grid(WeightQuantConfig(grid=c), W.shape[1], n) for c in cfg.candidates]
        sizes.append(W.numel())
        bits.append([g.bits_per_weight for g in opts])
        H = hessians[n]
        errors.append([sensitivity(W, H, g.fit) for g in opts])
        labels.append([g.label for g in opts])
    choice = allocate_bits(sizes, bits, errors, cfg.target_bpw)
    plan = {n: cfg.candidates[k] for n, k in zip(names, choice)}
    achieved = sum(s * bits[m][k] for m, (s, k) in enumerate(zip(sizes, choice))) / sum(sizes)
    mix = {}
    for m, k in enumerate(choice):
        mix[labels[m][k]] = mix.get(labels[m][k], 0) + sizes[m]
    return plan, {"target_bpw": cfg.target_bpw, "achieved_bpw": achieved,
                  "mix": {g: round(c / sum(sizes), 3) for g, c in sorted(mix.items())}}
