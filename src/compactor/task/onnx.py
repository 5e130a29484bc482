"""ONNX export of a task model for onnxruntime, fp32 and int8 (dynamic or static), verified.

Why the TorchScript exporter with eager attention: onnxruntime's transformer optimizer
(``onnxruntime.transformers.optimizer``, model type ``bert``) fuses embedding + LayerNorm,
attention, bias + GELU and residual + LayerNorm only on the graph shapes that exporter
writes; the dynamo exporter's graph (and sdpa attention) leaves attention unfused, and an
unfused graph is the reason static QDQ int8 can run slower than fp32 on CPUs.

int8:
* ``dynamic``: ``quantize_dynamic`` — weights int8 per channel, activations quantized per
  batch at run time from their observed range; also the embedding tables.
* ``static``: ``quantize_static`` in QDQ format — activation ranges fixed beforehand by
  MinMax calibration on our data (:class:`Calibration`), u8 activations and s8 weights (the
  CPU kernels' fast path).
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from compactor.errors import CompactorError
from compactor.task.batches import Encoded
from compactor.task.model import LogitsOnly, TaskModel

#: fp32 graph vs torch: logits to rounding, labels all equal; int8 graphs are other models,
#: only gross breakage is refused (their agreement and accuracy are reported).
MAX_LOGIT_DIFF_FLOAT, MIN_AGREEMENT_FLOAT, MIN_AGREEMENT_INT8 = 1e-3, 0.999, 0.90
INT8_MODES = ("dynamic", "static")


class Calibration:
    """onnxruntime's ``CalibrationDataReader`` over length-sorted batches of ``data``."""

    def __init__(self, data: Encoded, batch: int = 16):
        self._batches = [data.batch(idx)[:2] for idx in data.by_length(batch)]
        self._i = 0

    def get_next(self):
        if self._i >= len(self._batches):
            return None
        ids, mask = self._batches[self._i]
        self._i += 1
        return {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy().astype(np.int64)}

    def rewind(self) -> None:
        self._i = 0


def _trace(model: TaskModel, path: Path) -> None:
    m = copy.deepcopy(model).eval()
    m.encoder.set_attn_implementation("eager")
    ids = torch.arange(32).reshape(2, 16) % model.config.vocab_size
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # a padded row, so the mask path is traced
    axes = {0: "batch", 1: "seq"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(LogitsOnly(m), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                              output_names=["logits"], dynamo=False, opset_version=17,
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}})
        except Exception as exc:  # the exporter raises many types; name the model and the cause
            raise CompactorError(f"ONNX export of {type(model.encoder).__name__} failed: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:300]}") from None


def export_task_onnx(model: TaskModel, out_dir: Path, int8: str | None = None, calib: Encoded | None = None,
                     heads: int | None = None) -> dict:
    """Write ``model.onnx`` (fp32, fused) and, with ``int8``, ``model.int8.onnx`` into the
    (temporary) ``out_dir``. ``calib`` feeds static calibration."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError:
        raise CompactorError("ONNX export needs onnx and onnxruntime: pip install 'compactor[onnx]'") from None
    if int8 not in (None, *INT8_MODES):
        raise CompactorError(f"--int8 must be one of {', '.join(INT8_MODES)}, got {int8!r}")
    if int8 == "static" and calib is None:
        raise CompactorError("static int8 needs calibration data (--calib-data)")
    out_dir = Path(out_dir)
    raw = out_dir / "model.raw.onnx"
    _trace(model, raw)
    from onnxruntime.transformers.fusion_options import FusionOptions

    from compactor.models.adapters import encoder_adapter_for_model_type
    from compactor.task.heads import head_counts

    cfg = model.config
    counts = head_counts(model, encoder_adapter_for_model_type(cfg.model_type))
    options = FusionOptions("bert")
    # The fused Attention op assumes every head of the config; a head-pruned model keeps fewer
    # (its own count per layer), so its attention stays unfused (everything else still fuses).
    options.enable_attention = all(c == cfg.num_attention_heads for c in counts)
    opt = optimize_model(str(raw), model_type="bert", num_heads=heads or cfg.num_attention_heads,
                         hidden_size=cfg.hidden_size, optimization_options=options)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    path = out_dir / "model.onnx"
    opt.save_model_to_file(str(path))
    raw.unlink()
    summary = {"file": path.name, "size_bytes": path.stat().st_size, "fused_ops": fused, "int8": int8}
    if int8:
        q = out_dir / "model.int8.onnx"
        quantize_int8(path, q, int8, calib)
        summary.update(file=q.name, float_file=path.name, float_size_bytes=path.stat().st_size,
                       size_bytes=q.stat().st_size)
    return summary


def quantize_int8(src: Path, dest: Path, mode: str, calib: Encoded | None = None) -> None:
    """onnxruntime's int8 of the graph ``src`` into ``dest`` (see the module docstring)."""
    import logging

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    # The fused graph's contrib ops (Attention, SkipLayerNormalization) defeat ONNX shape
    # inference; their outputs are float, which is what the quantizer is told to assume.
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    root = logging.getLogger()
    level = root.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root.setLevel(logging.ERROR)  # onnxruntime's advice to pre-process goes to the root logger
        try:
            if mode == "dynamic":
                quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8, per_channel=True,
                                 extra_options=extra)
            else:
                # The head (hidden x labels) stays float: it is ~0.1 % of the weights, and its
                # input (the mean pool's division) gets no calibration range from onnxruntime.
                graph = onnx.load(str(src), load_external_data=False).graph
                head = [n.name for n in graph.node if "logits" in n.output]
                # In an unfused graph (a head-pruned model) the attention products are MatMuls
                # of two activations; the scores carry the additive mask's huge negative values,
                # whose MinMax range would crush every real score to one code. Only MatMuls
                # with a weight are quantized statically.
                weights = {i.name for i in graph.initializer}
                products = [n.name for n in graph.node
                            if n.op_type == "MatMul" and not any(i in weights for i in n.input)]
                # There the mask's Add and the Softmax would get QDQ pairs too; only weight
                # MatMuls (and the embedding) are quantized in such a graph.
                ops = ["MatMul", "Gemm", "Gather", "EmbedLayerNormalization"] if products else None
                quantize_static(str(src), str(dest), Calibration(calib), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=head + products,
                                op_types_to_quantize=ops, extra_options=extra)
        finally:
            root.setLevel(level)
    for extra in dest.parent.glob("*.onnx.data"):  # onnxruntime's calibration leftovers
        if extra.name != dest.name + ".data":
            extra.unlink()


def verify_task_onnx(model: TaskModel, path: Path, data: Encoded, int8: bool) -> dict:
    """Predictions of the graph in onnxruntime against the in-memory model on ``data``."""
    from compactor.task.evaluate import OnnxClassifier, agreement, predict_onnx, predict_torch

    ref = predict_torch(model, data)
    got = predict_onnx(OnnxClassifier(path), data, model.labels)
    agree = agreement(ref, got)
    diff = float((ref.logits - got.logits).abs().max())
    need = MIN_AGREEMENT_INT8 if int8 else MIN_AGREEMENT_FLOAT
    passed = agree >= need and (int8 or diff <= MAX_LOGIT_DIFF_FLOAT)
    return {"runtime": "onnxruntime", "file": Path(path).name, "examples": len(data), "agreement": agree,
            "max_logit_diff": diff, "min_agreement": need, "passed": passed,
            "accuracy": got.scores["accuracy"], "macro_f1": got.scores["macro_f1"],
            "torch_accuracy": ref.scores["accuracy"], "torch_macro_f1": ref.scores["macro_f1"],
            "size_bytes": os.path.getsize(path)}
