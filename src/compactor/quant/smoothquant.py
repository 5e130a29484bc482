"""SmoothQuant (Xiao et al., 2022, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", arXiv:2211.10438): migrate quantization difficulty
from activations to weights with per-channel scales

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

folded into the preceding norm or linear (the float model is unchanged), so that int8
activations (W8A8) lose less. Typically followed by ``rtn`` (int8 per channel) and an
``activations`` step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactor.config import StepConfig, check
from compactor.quant.awq import fold_scales, smooth_compatible
from compactor.registry import register


@dataclass(frozen=True)
class SmoothQuantConfig(StepConfig):
    """``alpha``: migration strength (0: none, 1: all difficulty moved to the weights)."""

    name = "smoothquant"
    needs_calibration = True
    smoothing = True
    statistic = "inputs"
    alpha: float = 0.5
    sample_tokens: int = 16  # only max|x| is needed; keep the row sample tiny
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)

    def validate(self) -> None:
        check(0.0 <= self.alpha <= 1.0, f"smoothquant.alpha must be in [0, 1], got {self.alpha}")


def smoothquant_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s [in]`` from per-channel activation maxima ``[in]`` and consumers ``[out_i, in]``."""
    w_max = torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0)
    s = act_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


@register(SmoothQuantConfig, kind="pair")
def apply_smoothquant(layer, cfg: SmoothQuantConfig, *, name: str, producer: str,
                      consumers: list[str], stats, norm_offset: float = 0.0) -> dict:
    prod = layer.get_submodule(producer)
    cons = [layer.get_submodule(c) for c in consumers]
    why = smooth_compatible(prod, cons)
    if why:
        return {"pair": f"{name}.{producer}", "skipped": why}
    s = smoothquant_scales(stats.abs_max, [c.weight for c in cons], cfg.alpha)
    before = float(stats.abs_max.max() / stats.abs_max.clamp_min(1e-5).median())
    fold_scales(prod, cons, s, norm_offset)
    after_act = stats.abs_max / s
    return {"pair": f"{name}.{producer}", "act_max_over_median_before": before,
            "after": float(after_act.max() / after_act.median())}
