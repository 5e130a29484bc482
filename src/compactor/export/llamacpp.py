"""llama.cpp's own quantizer, driven through ``llama-cpp-python`` — the baseline we compare with.

:func:`llamacpp_quantize` turns an F32/F16 GGUF into one of llama.cpp's file types (``Q4_K_M``
…), optionally with an importance matrix. The Python binding can pass an importance matrix
but cannot compute one, so :func:`collect_imatrix` computes the statistic ``llama-imatrix``
collects — for every ``blk.*`` matrix multiply, the per-input-column mean of x² over the
calibration tokens — with compactor's sequential runner on the float model (the activations
of the unmodified model, as llama-imatrix sees them), keyed by GGUF tensor name.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compactor.config import StepConfig
from compactor.errors import CompactorError

#: llama.cpp file types by the names its ``llama-quantize`` tool uses (lower case).
FTYPES = {
    "q8_0": "MOSTLY_Q8_0", "q6_k": "MOSTLY_Q6_K", "q5_k_m": "MOSTLY_Q5_K_M",
    "q5_k_s": "MOSTLY_Q5_K_S", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
    "q4_k_m": "MOSTLY_Q4_K_M", "q4_k_s": "MOSTLY_Q4_K_S", "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1", "iq4_xs": "MOSTLY_IQ4_XS", "iq4_nl": "MOSTLY_IQ4_NL",
    "q3_k_m": "MOSTLY_Q3_K_M", "q3_k_s": "MOSTLY_Q3_K_S", "q3_k_l": "MOSTLY_Q3_K_L",
    "q2_k": "MOSTLY_Q2_K", "f16": "MOSTLY_F16",
}


@dataclass(frozen=True)
class _ImatrixPass(StepConfig):
    """Sequential-runner settings for collecting input statistics (nothing is modified)."""

    name = "imatrix"
    statistic: str = "inputs"
    sample_tokens: int = 0  # only the running mean of x^2 is needed, no sampled rows


def collect_imatrix(loaded, windows, progress: bool = True, dtype: str = "auto") -> dict[str, np.ndarray]:
    """``{gguf tensor name: mean x^2 per input column}`` for every decoder linear.
    ``dtype``: the forward passes' precision (``auto``: bf16 where the CPU is fast at it;
    the statistic changes by ~1-5 % per column, far below what steers a quantizer)."""
    import gguf

    from compactor.calibration.sequential import calibration_dtype, run_sequential

    model = loaded.model
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[loaded.adapter.gguf_arch]
    name_map = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    out: dict[str, np.ndarray] = {}

    def record(module, _cfg, name, stats):
        gname = name_map.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if gname is None:
            raise CompactorError(f"imatrix: module {name!r} has no GGUF tensor name")
        out[gname] = stats.mean_sq().numpy().astype(np.float32)
        return module

    # Nothing is modified, so one forward per layer observes every group's input
    # (true_sequential=False); bf16 forwards where the CPU has them, statistics in float32.
    run_sequential(model, windows, record, _ImatrixPass(), adapter=loaded.adapter, progress=progress,
                   true_sequential=False, dtype=calibration_dtype(dtype))
    return out


def _imatrix_array(imatrix: dict[str, np.ndarray]):
    """A NULL-terminated C array of llama_model_imatrix_data (the arrays stay referenced)."""
    from llama_cpp import llama_cpp as C

    keep = []
    arr = (C.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, (name, values) in enumerate(imatrix.items()):
        v = np.ascontiguousarray(values, dtype=np.float32)
        keep.append(v)
        arr[i].name = name.encode()
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    return arr, keep


def llamacpp_quantize(src: str | Path, out: str | Path, ftype: str,
                      imatrix: dict[str, np.ndarray] | None = None, nthread: int = 2) -> Path:
    """Quantize the F32/F16 GGUF ``src`` to llama.cpp file type ``ftype`` (e.g. ``q4_k_m``)."""
    import gguf

    try:
        from llama_cpp import llama_cpp as C
    except ImportError:
        raise CompactorError("llama.cpp's quantizer needs llama-cpp-python: pip install 'compactor[llamacpp]'") from None
    if ftype not in FTYPES:
        raise CompactorError(f"llama.cpp file type {ftype!r}: expected one of {', '.join(FTYPES)}")
    params = C.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = int(gguf.LlamaFileType[FTYPES[ftype]])
    keep = None
    if imatrix:
        arr, keep = _imatrix_array(imatrix)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(C.llama_model_imatrix_data))
    out = Path(out)
    rc = C.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    del keep
    if rc != 0 or not out.exists():
        raise CompactorError(f"llama.cpp could not quantize {src} to {ftype} (return code {rc})")
    return out


@dataclass(frozen=True)
class LlamaCppQuantizeConfig(StepConfig):
    """Recipe step ``llamacpp_quantize``: llama.cpp's own quantization of the *reference*
    (exported F32, then ``llama_model_quantize``), scored in llama.cpp against the reference —
    the row a compactor file must beat. ``imatrix``: from the recipe's calibration windows."""

    name = "llamacpp_quantize"
    type: str = "q4_0"
    imatrix: bool = False
    keep: bool = False  # keep the file in the output directory
    label: str | None = None

    def validate(self) -> None:
        from compactor.config import check

        check(self.type in FTYPES, f"llamacpp_quantize.type: got {self.type!r}, expected one of {', '.join(FTYPES)}")


def _llamacpp_step(ctx, cfg: LlamaCppQuantizeConfig) -> None:
    import tempfile

    from compactor.evaluate.harness import evaluate
    from compactor.export.gguf import GGUFTypes, export_gguf

    ref = ctx.reference()
    if ref is None:
        raise CompactorError("llamacpp_quantize needs the recipe's reference model (reference: original)")
    tag = f"llamacpp-{cfg.type}{'-imatrix' if cfg.imatrix else ''}.gguf"
    with tempfile.TemporaryDirectory(dir=ctx.out_dir) as d:
        src = export_gguf(ref.model, Path(d) / "reference-f32.gguf", types=GGUFTypes("f32", "f32"),
                          tokenizer=ref.tokenizer, tokenizer_gguf=ref.gguf, adapter=ref.adapter,
                          progress=False).path
        imx = collect_imatrix(ref, ctx.calib_windows()) if cfg.imatrix else None
        out = llamacpp_quantize(src, Path(d) / tag, cfg.type, imx)
        ctx.results.append(evaluate(str(out), ctx.eval_windows(), reference=ctx.reference_scorer(),
                                    speed=ctx.recipe.eval.speed,
                                    name=cfg.label or f"llama.cpp {cfg.type.upper()}"
                                    f"{' + imatrix' if cfg.imatrix else ''} (llama.cpp)"))
        if cfg.keep and ctx.out_dir is not None:
            out.rename(Path(ctx.out_dir) / tag)


def _register() -> None:
    from compactor.registry import register

    register(LlamaCppQuantizeConfig, kind="eval")(_llamacpp_step)


_register()
