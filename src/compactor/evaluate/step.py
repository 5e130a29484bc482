"""The ``evaluate`` recipe step: score the current model, or another source such as the
GGUF file the recipe's model came from (``source: input.gguf``), against the reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compactor.config import StepConfig, check
from compactor.errors import CompactorError
from compactor.evaluate.harness import evaluate
from compactor.registry import register


@dataclass(frozen=True)
class EvaluateConfig(StepConfig):
    """Evaluate ``source`` (default: the current in-memory model).

    ``source``: None, a model path/alias, a ``.gguf`` path (run in llama.cpp), or
    ``input.gguf`` — the GGUF file the recipe's model was loaded from.
    ``against``: compare with the recipe's reference, or report perplexity only.
    """

    name = "evaluate"
    source: str | None = None
    against: Literal["reference", "none"] = "reference"
    label: str | None = None

    def validate(self) -> None:
        check(self.label is None or bool(self.label.strip()), "evaluate.label must not be empty")


@register(EvaluateConfig, kind="eval")
def _evaluate_step(ctx, cfg: EvaluateConfig) -> None:
    from compactor.models.load import load_model

    if cfg.source is None and not ctx.modified and ctx.recipe.reference == "original":
        # The untouched input *is* the reference: score the reference's cached backend, so
        # its logits are computed once for this row and every later comparison.
        target, name = ctx.reference_scorer(), cfg.label or f"{ctx.stage}"
    elif cfg.source is None:
        target, name = ctx.loaded, cfg.label or f"{ctx.stage}"
    elif cfg.source == "input.gguf":
        if ctx.loaded.gguf is None:
            raise CompactorError("evaluate.source 'input.gguf': the recipe's model was not loaded from a GGUF file")
        target, name = str(ctx.loaded.gguf), cfg.label or ctx.loaded.gguf.name
    elif cfg.source.endswith(".gguf"):
        target, name = cfg.source, cfg.label or cfg.source
    else:
        target, name = load_model(cfg.source), cfg.label or cfg.source
    # Against the reference unless the candidate is the untouched in-memory input itself.
    trivial = cfg.source is None and not ctx.modified
    ref = ctx.reference_scorer() if cfg.against == "reference" and not trivial else None
    ctx.results.append(evaluate(target, ctx.eval_windows(), reference=ref,
                                speed=ctx.recipe.eval.speed, name=name))
