"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", arXiv:2306.00978): per-input-channel scales that protect the weights seeing
large activations, searched on calibration data and folded into the preceding norm or
linear so the float model is unchanged; then round-to-nearest (or a later GPTQ step).

For each (producer -> consumers) pair of the adapter: s = mean|x|^a, normalized, for a in a
grid on [0, 1); choose the a minimizing the consumers' output error
``sum_i ||X (Q(W_i diag(s)) diag(s)^-1)^T - X W_i^T||^2`` on sampled inputs X.

Optional clipping search (the paper's ``auto_clip``): after scaling, shrink each weight
group's range to ``r * [min, max]`` with ``r`` chosen per (output row, group) on a grid over
``[1 - max_shrink, 1]`` to minimize that group's share of the output error; like the
reference implementation it skips the query/key projections (their error only matters
through the attention softmax, which a per-layer output error does not see).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from compactor.config import check
from compactor.quant.spec import WeightQuantConfig, check_weight, resolve_grid
from compactor.registry import register


@dataclass(frozen=True)
class AWQConfig(WeightQuantConfig):
    """AWQ scale search on the given grid; ``then``: quantize with RTN afterwards, or leave
    the (scaled, still float) weights for a following step such as GPTQ."""

    name = "awq"
    needs_calibration = True
    smoothing = True  # the runner visits producer -> consumers pairs
    statistic = "inputs"  # mean |x| and sampled input rows
    n_grid: int = 20
    sample_tokens: int = 1024
    then: Literal["rtn", "none"] = "rtn"
    clip: bool = False
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_skip: tuple[str, ...] = ("q_proj", "k_proj")
    calibration_dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    def followup(self):
        """The step applied to every linear once a layer is smoothed (RTN on the same grid)."""
        if self.then == "none":
            return None
        from compactor.quant.rtn import RTNConfig

        keep = {k: getattr(self, k) for k in ("grid", "bits", "group_size", "symmetric", "targets", "ignore", "search")}
        return RTNConfig(**keep)

    def validate(self) -> None:
        super().validate()
        check(self.n_grid >= 1, f"awq.n_grid must be >= 1, got {self.n_grid}")
        check(self.sample_tokens >= 16, f"awq.sample_tokens must be >= 16, got {self.sample_tokens}")
        check(not self.clip or self.then == "rtn",
              "awq.clip needs then: rtn (a following GPTQ fits its own ranges; clipping first "
              "would change the weights it reconstructs)")
        check(self.clip_grid >= 1, f"awq.clip_grid must be >= 1, got {self.clip_grid}")
        check(0 < self.max_shrink < 1, f"awq.max_shrink must be in (0, 1), got {self.max_shrink}")


def awq_scales(X: torch.Tensor, weights: list[torch.Tensor], act_mean: torch.Tensor, fit,
               n_grid: int = 20) -> tuple[torch.Tensor, float, float, float]:
    """Search the AWQ scale vector for consumers ``weights`` (each ``[out_i, in]``) of inputs
    ``X [N, in]`` with per-column mean |x| ``act_mean [in]``.

    Returns (s [in], best alpha, error at alpha=0 (plain RTN), best error).
    """
    X = X.float()
    weights = [W.detach() for W in weights]
    refs = [X @ W.float().T for W in weights]
    best = (None, 0.0, float("inf"))
    err0 = None
    for k in range(n_grid):
        a = k / n_grid
        s = act_mean.clamp_min(1e-4).pow(a)
        s = s / (s.max() * s.min()).sqrt()  # keep scales centred around 1
        err = 0.0
        for W, Y in zip(weights, refs):
            Ws = W.float() * s[None, :]
            Wq = fit(Ws, None).fake_quantize(Ws) / s[None, :]
            err += float(((X @ Wq.T) - Y).pow(2).mean())
        if k == 0:
            err0 = err
        if err < best[2]:
            best = (s, a, err)
    return best[0], best[1], err0, best[2]


def clip_search(W: torch.Tensor, X: torch.Tensor, fit, unit: int, n_grid: int = 20,
                max_shrink: float = 0.5) -> tuple[torch.Tensor, float, float]:
    """Search a clipping ratio per (row, group of ``unit`` columns) of ``W [out, in]`` for
    inputs ``X [N, in]``; returns (clipped W, output error unclipped, output error clipped).

    A group's error is ``dW_g H_g dW_g^T`` with ``H_g`` the block of ``H = X^T X / N`` on
    its columns, so groups are scored independently (cross-group terms are ignored, as in
    the paper's per-group search); fits whose parameters couple groups (the K-quants'
    super-block scales) add to the approximation. The clipped result is therefore kept only
    if its whole-matrix output error ``tr(dW H dW^T)`` is lower.
    """
    W = W.detach().float()
    out, n = W.shape
    G = n // unit
    H = X.float().T @ X.float() / X.shape[0]  # [in, in]
    Hb = torch.stack([H[g * unit:(g + 1) * unit, g * unit:(g + 1) * unit] for g in range(G)])
    Wg = W.reshape(out, G, unit)
    lo, hi = Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True)

    def delta(Wc: torch.Tensor) -> torch.Tensor:  # [out, in]
        return fit(Wc.reshape(out, n), None).fake_quantize(Wc.reshape(out, n)) - W

    def group_err(dW: torch.Tensor) -> torch.Tensor:  # [out, G]
        d = dW.reshape(out, G, unit)
        return torch.einsum("ogk,gkl,ogl->og", d, Hb, d)

    def total_err(dW: torch.Tensor) -> float:
        return float(torch.einsum("oi,ij,oj->", dW, H, dW))

    d0 = delta(Wg)
    best_err, best_r = group_err(d0), torch.ones(out, G, 1)
    for k in range(1, n_grid):
        r = 1 - max_shrink * k / n_grid
        err = group_err(delta(torch.maximum(torch.minimum(Wg, hi * r), lo * r)))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r[better] = r
    Wc = torch.maximum(torch.minimum(Wg, hi * best_r), lo * best_r)
    err0, err1 = total_err(d0), total_err(delta(Wc))
    if err1 >= err0:
        return W, err0, err0
    return Wc.reshape(out, n), err0, err1


def fold_scales(producer: torch.nn.Module, consumers: list[torch.nn.Linear], s: torch.Tensor,
                norm_offset: float = 0.0) -> None:
    """Divide the producer's output by ``s`` and multiply the consumers' input columns by
    ``s``: the composition is unchanged (exactly, up to float rounding)."""
    with torch.no_grad():
        if isinstance(producer, torch.nn.Linear):
            producer.weight.div_(s[:, None])
            if producer.bias is not None:
                producer.bias.div_(s)
        else:  # an RMSNorm/LayerNorm: y = x_hat * (offset + w)
            w = producer.weight
            w.copy_((norm_offset + w) / s - norm_offset)
            if getattr(producer, "bias", None) is not None:
                producer.bias.div_(s)
        for c in consumers:
            c.weight.mul_(s[None, :])


def smooth_compatible(producer: torch.nn.Module, consumers: list[torch.nn.Module]) -> str | None:
    """Why a scale cannot be folded through this pair, or None if it can."""
    width = consumers[0].in_features
    if any(not isinstance(c, torch.nn.Linear) for c in consumers):
        return "consumers are not plain linear layers (already quantized?)"
    out = producer.out_features if isinstance(producer, torch.nn.Linear) else producer.weight.shape[0]
    if out != width:
        return (f"producer width {out} != consumer input {width} "
                "(grouped-query attention: v_proj feeds several heads)")
    return None


@register(AWQConfig, kind="pair")
def apply_awq(layer: torch.nn.Module, cfg: AWQConfig, *, name: str, producer: str,
              consumers: list[str], stats, norm_offset: float = 0.0) -> dict:
    """Search and fold AWQ scales for one pair of ``layer`` (the runner then quantizes the
    layer with :meth:`AWQConfig.followup`). Returns a small report."""
    prod = layer.get_submodule(producer)
    cons = [layer.get_submodule(c) for c in consumers]
    why = smooth_compatible(prod, cons)
    if why:
        return {"pair": f"{name}.{producer}", "skipped": why}
    for c, cname in zip(cons, consumers):
        check_weight(c.weight, f"{name}.{cname}")
    grid = resolve_grid(cfg, cons[0].in_features, name)
    s, alpha, err0, err = awq_scales(stats.rows, [c.weight for c in cons], stats.mean_abs(), grid.fit, cfg.n_grid)
    fold_scales(prod, cons, s, norm_offset)
    report = {"pair": f"{name}.{producer}", "alpha": alpha, "err_rtn": err0, "err_awq": err}
    if cfg.clip:
        Xs = stats.rows / s[None, :]  # the consumers now see x / s
        for c, cname in zip(cons, consumers):
            if cname.rsplit(".", 1)[-1] in cfg.clip_skip:
                continue
            Wc, e0, e1 = clip_search(c.weight, Xs, grid.fit, grid.unit, cfg.clip_grid, cfg.max_shrink)
            with torch.no_grad():
                c.weight.copy_(Wc.to(c.weight.dtype))
            report.setdefault("clip_gain", {})[cname] = round(1 - e1 / e0, 4) if e0 > 0 else 0.0
    return report
