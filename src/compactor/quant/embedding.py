"""The token embedding (and the output head) on a GGUF grid, in memory.

llama.cpp files hold the embedding on a block type like every matrix, and at small sizes it
is a large share of the file (SmolLM2-135M: a third of the parameters). Rounding it in
memory — rather than leaving it to the exporter — makes evaluation in torch measure what the
file will compute, and the exporter writes these codes unchanged. Data-free: the embedding
has no input Hessian, so round-to-nearest on the grid's own scale fit (as llama.cpp's
quantizer does without an importance matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

from compactor.config import StepConfig, check
from compactor.errors import CompactorError
from compactor.registry import register


@dataclass(frozen=True)
class EmbeddingQuantConfig(StepConfig):
    """Round the token embedding to ``grid`` (a tied head shares it) and an untied output
    head to ``head`` (default: ``grid``); both GGUF block types."""

    name = "embedding"
    grid: str = "q8_0"
    head: str | None = None

    def validate(self) -> None:
        from compactor.primitives.ggml import GGML_TYPES

        for key in ("grid", "head"):
            value = getattr(self, key)
            check(value is None or value in GGML_TYPES,
                  f"embedding.{key}: {value!r} is not a GGUF block type (one of {', '.join(sorted(GGML_TYPES))})")


@register(EmbeddingQuantConfig, kind="model")
def _quantize_embedding(ctx, cfg: EmbeddingQuantConfig) -> None:
    quantize_embedding(ctx.loaded.model, cfg, ctx.loaded.adapter)
    ctx.reports.append({"step": cfg.name, "grid": cfg.grid, "head": cfg.head or cfg.grid})


def quantize_embedding(model, cfg: EmbeddingQuantConfig, adapter=None) -> list[str]:
    """Replace ``model``'s embedding (and untied head) by their RTN codes in place; returns
    the grids' fallback notes (a K-quant on rows it cannot block)."""
    from compactor.models.adapters import adapter_for
    from compactor.quant.qlinear import QuantizedLinear, tie_head
    from compactor.quant.rtn import RTNConfig, apply_rtn, rtn_embedding

    adapter = adapter or adapter_for(model)
    emb = model.get_submodule(adapter.embed)
    if isinstance(emb, QuantizedLinear):
        raise CompactorError(f"embedding: {adapter.embed} is already on grid {emb.label}")
    new = rtn_embedding(emb.weight, RTNConfig(grid=cfg.grid), adapter.embed)
    model.set_submodule(adapter.embed, new)
    notes = [new.note] if new.note else []
    if not tie_head(model, adapter.embed, adapter.lm_head) and adapter.lm_head:
        head = model.get_submodule(adapter.lm_head)
        if not isinstance(head, QuantizedLinear):
            q = apply_rtn(head, RTNConfig(grid=cfg.head or cfg.grid), name=adapter.lm_head)
            model.set_submodule(adapter.lm_head, q)
            notes += [q.note] if q.note else []
    return notes
