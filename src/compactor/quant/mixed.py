"""Mixed precision: per-module sensitivity on calibration data and a bit allocation that
meets a bits-per-weight budget (in the spirit of llama.cpp's --target-bpw and ModelOpt's
auto_quantize), with the token embedding and an untied output head as choices too.

Sensitivity, ``err(m, g)``: the cost of rounding module ``m`` to grid ``g``.

- ``hessian``: the proxy ``p(m, g) = tr(dW H dW^T) / n_out`` with ``dW = Q_g(W) - W`` and
  ``H`` the module's input Hessian: its own output error, blind to how much that error
  matters to the final logits.
- ``kl`` (default): measured. Every decoder layer is rounded as a whole to a probe grid and
  the mean KL(original || rounded) of the next-token distributions is measured on a few
  calibration windows; the layer's KL is split among its modules and extrapolated to the
  other grids in proportion to the proxy, ``err(m, g) = KL_layer * p(m, g) / sum_m' p(m',
  probe)`` (KL is quadratic in small weight errors, as the proxy is). The embedding and an
  untied head have no input Hessian here and are cheap to probe: their KL is measured at
  every candidate grid.

The allocation minimizes the summed error (errors of separate modules add to first order)
under the budget by greedy upgrades in order of error saved per extra bit (exact for convex
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
    of those linears (and of the embedding / untied head when ``embeddings``) is at most
    ``target_bpw``; then quantize every module on its grid with ``then`` (RTN, or GPTQ on
    the same calibration data). ``kl_tokens``: calibration tokens each KL probe scores;
    ``probe``: the grid decoder layers are probed at (default: the cheapest candidate)."""

    name = "mixed_precision"
    needs_calibration = True
    candidates: tuple[str, ...] = ("q3_k", "q4_0", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0")
    target_bpw: float = 4.5
    sensitivity: Literal["kl", "hessian"] = "kl"
    embeddings: bool = True
    kl_tokens: int = 1024
    probe: str | None = None
    then: Literal["rtn", "gptq"] = "rtn"
    calibration_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)

    def validate(self) -> None:
        check(len(self.candidates) >= 1, "mixed_precision.candidates must not be empty")
        for c in self.candidates:
            check(c in GRIDS and c not in ("int", "nf4"),
                  f"mixed_precision.candidates: {c!r} is not a GGUF grid")
        check(1.0 < self.target_bpw <= 16.0, f"mixed_precision.target_bpw must be in (1, 16], got {self.target_bpw}")
        check(self.sensitivity == "kl" or not self.embeddings,
              "mixed_precision.embeddings needs sensitivity: kl (the embedding has no input Hessian)")
        check(self.kl_tokens >= 16, f"mixed_precision.kl_tokens must be >= 16, got {self.kl_tokens}")
        check(self.probe is None or self.probe in self.candidates,
              f"mixed_precision.probe: {self.probe!r} is not one of the candidates")

    def probe_grid(self) -> str:
        """The grid decoder layers are probed at: ``probe``, else the cheapest candidate."""
        if self.probe:
            return self.probe
        from compactor.primitives.ggml import GGML_TYPES

        return min(self.candidates, key=lambda c: GGML_TYPES[c].bpw)


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


def layer_of(name: str) -> str:
    """The decoder layer a module belongs to: ``model.layers.3.mlp.up_proj`` -> ``model.layers.3``."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return name


def _options(W: torch.Tensor, cfg: MixedPrecisionConfig, name: str):
    return [resolve_grid(WeightQuantConfig(grid=c), W.shape[1], name) for c in cfg.candidates]


def _rounded(W: torch.Tensor, grid) -> torch.Tensor:
    return grid.fit(W.float(), None).fake_quantize(W.float()).to(W.dtype)


@register(MixedPrecisionConfig, kind="plan")
def plan_mixed_precision(modules: dict[str, torch.nn.Linear], hessians: dict, cfg: MixedPrecisionConfig,
                         measure=None, tensors: dict[str, torch.Tensor] | None = None,
                         progress: bool = False):
    """Choose a grid per module. ``modules``: decoder linears with input ``hessians``;
    ``tensors``: whole weights without a Hessian (embedding, untied head), only with
    ``sensitivity: kl``; ``measure({name: weight}) -> KL``: scores the model with those
    weights temporarily replaced (needed for ``kl``). Returns (grid per name, report)."""
    from tqdm.auto import tqdm

    tensors = tensors or {}
    if cfg.sensitivity == "kl" and measure is None:
        raise CompactorError("mixed_precision sensitivity 'kl' needs a KL probe (run it as a recipe step)")
    names = list(modules) + list(tensors)
    sizes, bits, errors, labels = [], [], [], []
    weights = {n: modules[n].weight.detach() for n in modules} | {n: t.detach() for n, t in tensors.items()}
    opts = {}
    for n in names:
        check_weight(weights[n], n)
        opts[n] = _options(weights[n], cfg, n)
        sizes.append(weights[n].numel())
        bits.append([g.bits_per_weight for g in opts[n]])
        labels.append([g.label for g in opts[n]])
    proxy = {n: [sensitivity(weights[n], hessians[n], g.fit) for g in opts[n]] for n in modules}
    err = dict(proxy)
    measured = {}
    if cfg.sensitivity == "kl":
        k = cfg.candidates.index(cfg.probe_grid())
        layers: dict[str, list[str]] = {}
        for n in modules:
            layers.setdefault(layer_of(n), []).append(n)
        jobs = len(layers) + sum(len({g.label for g in opts[n]}) for n in tensors)
        bar = tqdm(total=jobs, desc="KL sensitivity", unit="probe", disable=not progress)
        for lname, members in layers.items():
            kl = measure({n: _rounded(weights[n], opts[n][k]) for n in members})
            measured[lname] = kl
            total = sum(proxy[n][k] for n in members) or 1.0
            for n in members:
                err[n] = [kl * p / total for p in proxy[n]]
            bar.update()
        for n in tensors:
            by_label = {}
            for g in opts[n]:
                if g.label not in by_label:
                    by_label[g.label] = measure({n: _rounded(weights[n], g)})
                    bar.update()
            err[n] = [by_label[g.label] for g in opts[n]]
            measured[n] = by_label
        bar.close()
    errors = [err[n] for n in names]
    choice = allocate_bits(sizes, bits, errors, cfg.target_bpw)
    # The plan names the grid each module really gets (a K-quant candidate on rows it
    # cannot take is reported as its fallback).
    plan = {n: labels[m][k] for m, (n, k) in enumerate(zip(names, choice))}
    achieved = sum(s * bits[m][k] for m, (s, k) in enumerate(zip(sizes, choice))) / sum(sizes)
    mix = {}
    for m, k in enumerate(choice):
        mix[labels[m][k]] = mix.get(labels[m][k], 0) + sizes[m]
    report = {"target_bpw": cfg.target_bpw, "achieved_bpw": achieved, "sensitivity": cfg.sensitivity,
              "weights": sum(sizes), "mix": {g: round(c / sum(sizes), 3) for g, c in sorted(mix.items())},
              "predicted_error": sum(errors[m][k] for m, k in enumerate(choice))}
    if measured:
        report["probe"] = cfg.probe_grid()
        report["measured_kl"] = measured
    return plan, report
