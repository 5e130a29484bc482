"""LoRA adapters over any base linear — float, or frozen in a quantized grid (QLoRA-style).

``LoRALinear`` adds ``(α/r)·B·A·x`` to a frozen base (Hu et al. 2021, arXiv:2106.09685; over a
4-bit base as in QLoRA, Dettmers et al. 2023, arXiv:2305.14314). The base may be a
:class:`QuantizedLinear` on any of our grids (NF4 with double quantization, the GGUF types),
so the adapter trains against exactly the base that will be deployed. Our own module rather
than peft's: peft wraps ``nn.Linear`` and bitsandbytes layers only, not our codes.

The ``lora`` recipe step trains the adapters with the distill trainer (KD to the original by
default, CE optional) and then either keeps them separate — saved beside the model and
exported as a llama.cpp LoRA adapter GGUF loaded beside the base file — or merges them:
``requantize`` dequantizes, adds B·A and re-quantizes with GPTQ on the calibration windows
(the advice of transformers#31293), ``float`` leaves the merged weight in float.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from compactor.config import StepConfig, check
from compactor.distill.config import DistillConfig
from compactor.errors import CompactorError
from compactor.registry import register


class LoRALinear(nn.Module):
    """``base(x) + scaling · (x Aᵀ) Bᵀ`` with ``A [r, in]``, ``B [out, r]`` (B starts at zero, so
    the wrapped model starts unchanged); the base is frozen."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        a = torch.empty(rank, self.in_features)
        bound = 1 / math.sqrt(self.in_features)  # kaiming-uniform(a=√5), as nn.Linear and peft
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [.., in] -> [.., r] -> [.., out]: the low-rank path never forms B·A
        return self.base(x) + (x @ self.lora_A.to(x.dtype).T) @ self.lora_B.to(x.dtype).T * self.scaling

    def delta(self) -> torch.Tensor:
        """The weight update ``scaling · B A  [out, in]`` (float32)."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's adapters by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def detached_adapters(model: nn.Module):
    """Inside the block the model holds its bases only (what a base file stores); yields the
    adapters by name and puts them back afterwards."""
    found = lora_modules(model)
    for n, m in found.items():
        model.set_submodule(n, m.base)
    try:
        yield found
    finally:
        for n, m in found.items():
            model.set_submodule(n, m)


def adapter_tensors(adapters: dict[str, LoRALinear]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, manifest) of the adapters, for ``adapter.safetensors`` / ``adapter.json``."""
    tensors = {}
    for n, m in adapters.items():
        tensors[f"{n}.lora_A"] = m.lora_A.detach().float().contiguous()
        tensors[f"{n}.lora_B"] = m.lora_B.detach().float().contiguous()
    manifest = {n: {"rank": m.rank, "alpha": m.alpha} for n, m in adapters.items()}
    return tensors, manifest


def attach_adapters(model: nn.Module, tensors: dict[str, torch.Tensor], manifest: dict, where: str) -> None:
    """Wrap the named modules of ``model`` with the stored adapters (checked shapes)."""
    for n, info in manifest.items():
        try:
            base = model.get_submodule(n)
            a, b = tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"]
        except (AttributeError, KeyError) as exc:
            raise CompactorError(f"{where}: adapter of {n}: missing {exc}") from None
        if a.shape != (info["rank"], base.in_features) or b.shape != (base.out_features, info["rank"]):
            raise CompactorError(f"{where}: adapter of {n} has shapes {list(a.shape)}/{list(b.shape)}, "
                                 f"the module is {base.out_features} x {base.in_features}")
        m = LoRALinear(base, info["rank"], info["alpha"])
        with torch.no_grad():
            m.lora_A.copy_(a)
            m.lora_B.copy_(b)
        model.set_submodule(n, m)


@dataclass(frozen=True)
class LoRAConfig(DistillConfig):
    """Train LoRA adapters of ``rank`` on the current model's linears (matched by ``targets``,
    class names or name patterns, minus ``ignore``), base frozen. ``qlora``: require a
    quantized base (fail otherwise). ``merge``: ``none`` keeps the adapters separate (saved
    beside the model, exported as a llama.cpp adapter GGUF), ``requantize`` merges into the
    dequantized weight and re-quantizes it with GPTQ on the same grid, ``float`` merges into a
    float weight. ``init``: ``zeros`` (B = 0: training starts from the base), ``svd`` (B·A =
    the best rank-r approximation of the quantization error W − Q, LoftQ's step with Q fixed)
    or ``eora`` (the same in the eigenspace of the inputs' second moment, from the calibration
    windows — a training-free correction that already helps before any step). Defaults: KD
    to the original on the mixed-domain text."""

    name = "lora"
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("Linear", "QuantizedLinear")
    ignore: tuple[str, ...] = ("lm_head",)
    qlora: bool = False
    merge: Literal["none", "requantize", "float"] = "none"
    init: Literal["zeros", "svd", "eora"] = "zeros"
    ce: float = 0.0
    kl: float = 1.0
    data: str = "calib:mix"
    tokens: int = 131072
    lr: float = 2e-4

    def validate(self) -> None:
        super().validate()
        check(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        check(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        check(not self.lora_rank, "lora: use rank (lora_rank is the distill step's peft path)")
        check(self.strategy == "ddp", "lora: strategy fsdp is not supported; use ddp")


def wrap_targets(model: nn.Module, cfg: LoRAConfig, seed: int) -> list[str]:
    """Wrap every matched linear with a fresh adapter; refuses, listing what exists, when the
    targets match nothing, and (``qlora``) when a matched base is not quantized."""
    from compactor.quant.qlinear import QuantizedEmbedding, QuantizedLinear
    from compactor.targeting import match_modules

    names = [n for n in match_modules(model, cfg.targets, cfg.ignore)
             if not isinstance(model.get_submodule(n), (nn.Embedding, QuantizedEmbedding))]
    if not names:
        kinds = sorted({type(m).__name__ for _, m in model.named_modules() if hasattr(m, "in_features")})
        sample = [n for n, m in model.named_modules() if hasattr(m, "in_features")][:6]
        raise CompactorError(f"lora.targets {list(cfg.targets)} match no module (ignoring "
                             f"{list(cfg.ignore)}); linear modules here: {', '.join(kinds)}, e.g. "
                             f"{', '.join(sample)}")
    if cfg.qlora:
        plain = [n for n in names if not isinstance(model.get_submodule(n), QuantizedLinear)]
        if plain:
            raise CompactorError(f"lora.qlora needs a quantized base, but {len(plain)} target modules "
                                 f"are float (first: {plain[0]}); put a quantization step (e.g. rtn "
                                 "with grid nf4) before it")
    g = torch.Generator().manual_seed(seed)
    for n in names:
        model.set_submodule(n, LoRALinear(model.get_submodule(n), cfg.rank, cfg.alpha, g))
    return names


def low_rank_error(delta: torch.Tensor, rank: int, hessian: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, r], A [r, in]) with B·A the rank-r approximation of ``delta`` [out, in] that
    minimizes ‖(delta − B·A)·X‖ for inputs with second moment ``hessian`` = E[x xᵀ] (EoRA,
    Liu et al. 2024, arXiv:2410.21271); plain Frobenius (truncated SVD) without it."""
    d = delta.double()
    if hessian is None:
        u, sv, vh = torch.linalg.svd(d, full_matrices=False)
        return (u[:, :rank] * sv[:rank]).float(), vh[:rank].float()
    lam, q = torch.linalg.eigh(hessian.double())  # H = Q Λ Qᵀ
    lam = lam.clamp_min(lam.max() * 1e-10)
    proj = q * lam.sqrt()  # [in, in]: Q Λ^½ — errors weighted by how much input they see
    u, sv, vh = torch.linalg.svd(d @ proj, full_matrices=False)
    b = u[:, :rank] * sv[:rank]
    a = vh[:rank] @ (q / lam.sqrt()).T  # V_rᵀ Λ^-½ Qᵀ maps back to the input basis
    return b.float(), a.float()


@dataclass(frozen=True)
class _SecondMoments(StepConfig):
    """Sequential-runner settings for collecting each target's input second moment."""

    name = "eora_moments"


def init_adapters(ctx, cfg: "LoRAConfig", names: list[str]) -> None:
    """Set the adapters of ``names`` to a low-rank fit of the quantization error W − Q, W the
    original's weight (``svd``/``eora``; ``eora`` weights it by the calibration inputs)."""
    from compactor.calibration.sequential import run_sequential

    model = ctx.loaded.model
    ref = ctx.reference()
    if ref is None:
        raise CompactorError(f"lora.init {cfg.init} needs the original weights (a recipe reference)")
    hessians: dict[str, torch.Tensor] = {}
    if cfg.init == "eora":
        chosen = set(names)

        def record(module, _cfg, name, stats):
            hessians[name] = stats.hessian()
            return module

        with detached_adapters(model):
            run_sequential(model, ctx.calib_windows(), record, _SecondMoments(), adapter=ctx.loaded.adapter,
                           skip=lambda n: n not in chosen, true_sequential=False, progress=False)
    for n in names:
        m = model.get_submodule(n)
        try:
            w = ref.model.get_submodule(n).weight.detach().float()
        except AttributeError:
            raise CompactorError(f"lora.init {cfg.init}: the original has no module {n}") from None
        if w.shape != (m.out_features, m.in_features):
            raise CompactorError(f"lora.init {cfg.init}: {n} is {m.out_features} x {m.in_features} here but "
                                 f"{tuple(w.shape)} in the original (after a structured cut: use init zeros)")
        b, a = low_rank_error(w - m.base.weight.detach().float(), cfg.rank, hessians.get(n))
        with torch.no_grad():
            m.lora_A.copy_(a)
            m.lora_B.copy_(b / m.scaling)


def _only_adapters(model) -> list[dict]:
    model.requires_grad_(False)
    params = [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]
    for p in params:
        p.requires_grad_(True)
    return [{"params": params}]


def merge_adapters(ctx, cfg: LoRAConfig) -> dict:
    """Fold the adapters into their bases (``requantize`` or ``float``); returns a summary."""
    from compactor.quant.qlinear import QuantizedLinear

    model = ctx.loaded.model
    adapters = lora_modules(model)
    grids = {}
    for n, m in adapters.items():
        base = m.base
        w = base.weight.detach().float() + m.delta()
        lin = nn.Linear(m.in_features, m.out_features, bias=base.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if base.bias is not None:
                lin.bias.copy_(base.bias.detach())
        model.set_submodule(n, lin)
        if isinstance(base, QuantizedLinear):
            grids.setdefault(base.label, []).append(n)
    if cfg.merge == "requantize" and grids:
        from compactor.calibration.sequential import run_sequential
        from compactor.quant.gptq import GPTQConfig, apply_gptq

        for label, names in grids.items():
            # the merged linears of one grid, re-quantized with GPTQ on the recipe's calibration
            gcfg = GPTQConfig(grid=label)
            chosen = set(names)
            run_sequential(model, ctx.calib_windows(), apply_gptq, gcfg, adapter=ctx.loaded.adapter,
                           skip=lambda name: name not in chosen, progress=False)
    return {"merged": len(adapters), "requantized_grids": sorted(grids) if cfg.merge == "requantize" else []}


@register(LoRAConfig, kind="model")
def _lora(ctx, cfg: LoRAConfig) -> None:
    from compactor.distill.step import run_distill

    model = ctx.loaded.model
    if ctx.loaded.streamed:
        raise CompactorError("lora trains the whole model at once; load it in memory (no --stream)")
    if cfg.merge == "requantize":  # refused before training, not after
        from compactor.primitives.ggml import GGML_TYPES
        from compactor.quant.qlinear import QuantizedLinear
        from compactor.targeting import match_modules

        bad = [n for n in match_modules(model, cfg.targets, cfg.ignore)
               if isinstance(m := model.get_submodule(n), QuantizedLinear) and m.label not in GGML_TYPES]
        if bad:
            raise CompactorError(f"lora.merge requantize: {bad[0]} is on grid "
                                 f"{model.get_submodule(bad[0]).label!r}, which GPTQ re-quantization here "
                                 "supports only on GGUF types; use merge: float or none")
    names = wrap_targets(model, cfg, cfg.seed)
    if cfg.init != "zeros":
        init_adapters(ctx, cfg, names)
    student, res, trainer = run_distill(ctx, cfg, param_groups=_only_adapters)
    ctx.loaded.model = student.model.eval()
    merged = merge_adapters(ctx, cfg) if cfg.merge != "none" else {"merged": 0}
    first = res.evals[0] if res.evals and res.resumed_from is None else None
    ctx.reports.append({
        "step": cfg.name, "modules": len(names), "rank": cfg.rank, "alpha": cfg.alpha, "merge": cfg.merge,
        "init": cfg.init,
        "adapter_params": sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_modules(model).values())
        if cfg.merge == "none" else None, **merged,
        "steps": res.steps, "tokens": res.tokens, "train_seconds": round(res.seconds, 1),
        "train_tok_s": round(res.tokens_per_s, 1), "resumed_from": res.resumed_from,
        "before": first, "after": res.evals[-1] if res.evals else None, "evals": res.evals,
        "precision": "bf16" if trainer.autocast else "fp32",
    })


@dataclass(frozen=True)
class LoRAMergeConfig(StepConfig):
    """Fold a model's LoRA adapters into their bases after the fact (e.g. on a ``lora``
    output kept with ``merge: none``): ``requantize`` (GPTQ on the same GGUF grid, calibrated
    on the recipe's calibration windows) or ``float``."""

    name = "lora_merge"
    merge: Literal["requantize", "float"] = "requantize"


@register(LoRAMergeConfig, kind="model")
def _lora_merge(ctx, cfg: LoRAMergeConfig) -> None:
    if not lora_modules(ctx.loaded.model):
        raise CompactorError("lora_merge: the model has no LoRA adapters")
    ctx.reports.append({"step": cfg.name, "merge": cfg.merge, **merge_adapters(ctx, cfg)})
