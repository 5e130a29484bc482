"""Recipe step ``qat``: quantization-aware distillation (QAD) in the exact deployed grid.

The model must already be quantized by an earlier step (``rtn``, ``gptq``, ``awq`` +
``gptq``, ``mixed``): its codes are the initialization (the field's lesson: measure QAT
against the best PTQ, and start from it). Every :class:`QuantizedLinear` becomes a
:class:`FakeQuantLinear` on the same codes; the distill trainer then minimizes the KL to the
float teacher (CE optional) through straight-through gradients, training the latent weights
and/or the grid's scales in the format's own parameters; near the end the codes can be
frozen so the last steps only fit scales. Afterwards each module is hardened back into a
:class:`QuantizedLinear` holding exactly the trained codes and scales, which the GGUF exporter
packs without re-rounding. Resume, progress and logging are the distill trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compactor.config import check
from compactor.distill.config import DistillConfig
from compactor.errors import CompactorError
from compactor.registry import register


@dataclass(frozen=True)
class QATConfig(DistillConfig):
    """Quantization-aware distillation of the current (quantized) model.

    ``learn``: what trains — ``weights+scales`` (latent weights through the STE, and the
    grid's scales), ``scales`` (codes fixed from the start: the cheapest, EfficientQAT's
    E2E-QP phase) or ``weights``. ``learn_offsets``: also the offsets of grids that have one
    (Q4_1/Q5_1 minima, K-quant ``dmin``). ``scale_lr``: the scales' learning rate as a
    multiple of ``lr``. ``freeze_codes``: fraction of the steps after which the codes are fixed
    (1.0: never). Defaults differ from ``distill``: pure KL to the teacher (QAD), a small
    learning rate, and the mixed-domain text.
    """

    name = "qat"
    ce: float = 0.0
    kl: float = 1.0
    data: str = "calib:mix"
    tokens: int = 65536
    lr: float = 1e-5
    learn: Literal["weights+scales", "scales", "weights"] = "weights+scales"
    learn_offsets: bool = True
    scale_lr: float = 1.0
    freeze_codes: float = 1.0

    def validate(self) -> None:
        super().validate()
        check(self.scale_lr > 0, f"qat.scale_lr must be > 0, got {self.scale_lr}")
        check(0 < self.freeze_codes <= 1, f"qat.freeze_codes is a fraction of the steps in (0, 1], got {self.freeze_codes}")
        check(not self.lora_rank, "qat: lora_rank is not available here (LoRA adapters train beside a frozen "
                                  "quantized base; use the lora step)")
        check(self.strategy == "ddp", "qat: strategy fsdp is not supported; use ddp")


def _param_groups(cfg: QATConfig):
    from compactor.quant.fakequant import FakeQuantLinear

    def groups(model):
        model.requires_grad_(False)  # embedding, norms, head: as the file has them
        weights, scales = [], []
        for mod in model.modules():
            if not isinstance(mod, FakeQuantLinear):
                continue
            for n, p in mod.named_parameters(recurse=False):
                if n == "bias":
                    continue
                train = cfg.learn != "scales" if n == "weight" else cfg.learn != "weights"
                p.requires_grad_(train)
                if train:
                    (weights if n == "weight" else scales).append(p)
        if not weights and not scales:
            raise CompactorError("qat: nothing to train (no fake-quantized parameter requires a gradient)")
        out = [{"params": weights}] if weights else []
        return out + ([{"params": scales, "lr": cfg.lr * cfg.scale_lr}] if scales else [])

    return groups


def _freezer(cfg: QATConfig):
    from compactor.quant.fakequant import FakeQuantLinear

    def on_step(trainer, rec) -> None:
        if cfg.freeze_codes >= 1 or trainer.step < round(cfg.freeze_codes * trainer.total_steps):
            return
        for mod in trainer.net.model.modules():
            if isinstance(mod, FakeQuantLinear) and not bool(mod.frozen):
                mod.freeze_codes()

    return on_step


def quantized_modules(model) -> list[str]:
    """Names of the model's quantized linears (the embedding aside)."""
    from compactor.quant.storage import quantized_modules as stored

    return list(stored(model, linear_only=True))


def check_exportable(model, fmt: str) -> None:
    """Refuse, before any training, a grid the export format cannot hold (the trained codes
    are shipped as they are, so they must fit the file)."""
    from compactor.primitives.ggml import GGML_TYPES

    for name in quantized_modules(model):
        m = model.get_submodule(name)
        if fmt == "gguf" and m.label not in GGML_TYPES:
            raise CompactorError(f"{name}: grid {m.label!r} is not a GGUF block type, so a GGUF file cannot "
                                 f"hold its trained codes; quantize on one of {', '.join(GGML_TYPES)}")
        if fmt == "compressed-tensors":
            from compactor.export.compressed import ct_args

            ct_args(m, name)


def _later_exports(ctx) -> list[str]:
    """Formats of the recipe's export steps that come after the current stage's qat."""
    fmts, seen = [], False
    for stage in ctx.recipe.stages:
        seen |= stage.name == ctx.stage
        fmts += [st.config.format for st in stage.steps if seen and st.name == "export"]
    return fmts


@register(QATConfig, kind="model")
def _qat(ctx, cfg: QATConfig) -> None:
    from compactor.api import quantize_
    from compactor.distill.step import run_distill
    from compactor.quant.fakequant import FakeQuantConfig, FakeQuantLinear, HardenConfig

    model = ctx.loaded.model
    if ctx.loaded.streamed:
        raise CompactorError("qat trains the whole model at once; load it in memory (no --stream)")
    if not quantized_modules(model):
        raise CompactorError("qat needs a quantized model to start from: put a quantization step "
                             "(gptq, rtn, awq + gptq, mixed) before it")
    for fmt in _later_exports(ctx):
        check_exportable(model, fmt)
    learn_scales = cfg.learn != "weights"
    names = quantize_(model, FakeQuantConfig(learn_scales=learn_scales, learn_offsets=cfg.learn_offsets and learn_scales))
    if cfg.learn == "scales":  # codes fixed from the start
        for n in names:
            model.get_submodule(n).freeze_codes()
    student, res, trainer = run_distill(ctx, cfg, param_groups=_param_groups(cfg), on_step=_freezer(cfg))
    model = ctx.loaded.model = student.model.eval()
    frozen = sum(bool(m.frozen) for m in model.modules() if isinstance(m, FakeQuantLinear))
    quantize_(model, HardenConfig())
    first = res.evals[0] if res.evals and res.resumed_from is None else None
    ctx.reports.append({
        "step": cfg.name, "modules": len(names), "learned": cfg.learn, "frozen_modules": frozen,
        "steps": res.steps, "tokens": res.tokens, "train_seconds": round(res.seconds, 1),
        "train_tok_s": round(res.tokens_per_s, 1), "resumed_from": res.resumed_from,
        "before": first, "after": res.evals[-1] if res.evals else None, "final_terms": res.final,
        "evals": res.evals, "precision": "bf16" if trainer.autocast else "fp32", "processes": trainer.world,
    })
