"""The ``export`` recipe step: write the current model in a runtime format, verified.

In a run with an output directory the file lands inside it (``file`` names it); the
verification uses the first ``verify_tokens`` tokens of the recipe's evaluation windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from compactor.config import StepConfig, check
from compactor.errors import CompactorError
from compactor.registry import register


@dataclass(frozen=True)
class ExportConfig(StepConfig):
    """Export the in-memory model.

    ``type``: GGUF type for linears still in float; ``embed_type`` / ``head_type``: for the
    token embedding and an untied head (quantized linears keep their own ggml grid).
    ``score``: also evaluate the file in its runtime against the reference (a table row).
    """

    name = "export"
    format: Literal["gguf", "compressed-tensors", "onnx"] = "gguf"
    file: str = "model.gguf"
    type: str = "f16"
    embed_type: str = "q8_0"
    head_type: str | None = None
    verify: bool = True
    verify_tokens: int = 2048
    #: GGUF: the verification's top-1 floor (None: export.verify.MIN_TOP1); see the CLI's
    #: --verify-min-top1 — for random-weight test models only
    verify_min_top1: float | None = None
    #: ONNX: how MatMulNBits compute, fp32 or int8 (the CLI's --matmul-accuracy)
    matmul_accuracy: Literal["fp32", "int8"] = "fp32"
    score: bool = True
    label: str | None = None

    def validate(self) -> None:
        from compactor.export.gguf import GGUF_TYPES

        for key in ("type", "embed_type", "head_type"):
            v = getattr(self, key)
            check(v is None or v in GGUF_TYPES, f"export.{key}: got {v!r}, expected one of {', '.join(GGUF_TYPES)}")
        check(self.format != "onnx" or self.embed_type in ("q8_0", "f32"),
              f"export.embed_type: an ONNX graph holds the embedding in q8_0 or f32, got {self.embed_type!r}")
        check(bool(self.file.strip()) and "/" not in self.file, f"export.file must be a plain file name, got {self.file!r}")
        check(self.verify_tokens >= 2, f"export.verify_tokens must be >= 2, got {self.verify_tokens}")
        check(self.verify_min_top1 is None or 0.0 <= self.verify_min_top1 <= 1.0,
              f"export.verify_min_top1 is a fraction in [0, 1], got {self.verify_min_top1}")
        check(self.matmul_accuracy in ("fp32", "int8"),
              f"export.matmul_accuracy: fp32 or int8, got {self.matmul_accuracy!r}")
        check(self.matmul_accuracy == "fp32" or self.format == "onnx",
              "export.matmul_accuracy is how an ONNX graph's MatMulNBits compute; other formats have none")
        check(self.verify_min_top1 is None or self.format == "gguf",
              "export.verify_min_top1 is the GGUF verification's floor; other formats have fixed checks")


@register(ExportConfig, kind="eval")
def _export_step(ctx, cfg: ExportConfig) -> None:
    from compactor.evaluate.harness import evaluate
    from compactor.export.api import export_model
    from compactor.export.gguf import GGUFTypes

    if ctx.out_dir is None:
        raise CompactorError("the export step needs a run with an output directory (compactor run --out DIR)")
    from compactor.data.windows import sample_windows

    windows = ctx.eval_windows()
    out = Path(ctx.out_dir) / cfg.file
    opts = ({"types": GGUFTypes(cfg.type, cfg.embed_type, cfg.head_type), "min_top1": cfg.verify_min_top1,
             "max_memory": ctx.recipe.max_memory}
            if cfg.format == "gguf"
            else {"embed_type": cfg.embed_type, "matmul_accuracy": cfg.matmul_accuracy} if cfg.format == "onnx"
            else {})
    prov = {"calibration": ctx._calib_windows.provenance if ctx._calib_windows else None,
            "recipe": ctx.recipe.to_yaml()}
    res = export_model(ctx.loaded, cfg.format, out, verify=cfg.verify, windows=sample_windows(windows, cfg.verify_tokens),
                       provenance=prov, overwrite=True, **opts)
    ctx.reports.append({"step": "export", **res.to_dict(), "path": cfg.file})
    if cfg.score and cfg.format == "gguf":
        ref = ctx.reference_scorer()
        ctx.results.append(evaluate(str(out), windows, reference=ref, speed=ctx.recipe.eval.speed,
                                    name=cfg.label or f"{cfg.file} (llama.cpp)"))
