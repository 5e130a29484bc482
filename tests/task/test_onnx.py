"""ONNX export of a task model: the fp32 graph matches torch, int8 graphs are verified, and
static int8 takes its activation ranges from the calibration data."""

import json

import numpy as np
import pytest

from compactor.errors import CompactorError
from compactor.task.api import eval_task, export_task


@pytest.fixture(scope="module")
def exports(teacher_dir, task_files):
    d = task_files["dir"]
    return {m: export_task(str(teacher_dir), d / f"onnx-{m}", m, task_files["train"], task_files["test"], max_length=16)
            for m in ("dynamic", "static")}


def test_float_graph_matches_torch_and_int8_graphs_are_verified(exports, task_files):
    for mode, rec in exports.items():
        fp32, int8 = rec["verify"]
        assert fp32["agreement"] == 1.0 and fp32["max_logit_diff"] < 1e-4 and fp32["passed"]
        assert int8["passed"] and int8["agreement"] >= 0.9 and rec["int8"] == mode
        assert {"Attention", "SkipLayerNormalization"} <= set(rec["fused_ops"])  # fused before quantizing
        out = task_files["dir"] / f"onnx-{mode}"
        assert sorted(p.name for p in out.iterdir() if p.suffix in (".onnx", ".safetensors")) == [
            "head.safetensors", "model.int8.onnx", "model.onnx"]  # the graph carries the weights
        res = eval_task(str(out / "model.int8.onnx"), task_files["test"], speed=False, max_length=16)
        assert res["runtime"] == "onnxruntime" and res["accuracy"] == pytest.approx(int8["accuracy"])


def test_static_int8_scales_come_from_the_calibration_ranges(exports, task_files, teacher_dir):
    """MinMax calibration: an activation's u8 scale is (max(r_max, 0) − min(r_min, 0)) / 255
    over the calibration texts, here checked for the first quantized activation."""
    import onnx
    from onnx import numpy_helper

    from compactor.data.labeled import load_labeled
    from compactor.task.batches import encode
    from compactor.task.model import load_task
    from compactor.task.onnx import Calibration

    out = task_files["dir"] / "onnx-static"
    q = onnx.load(str(out / "model.int8.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    node = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits)
    tensor, scale = node.input[0], float(inits[node.input[1]])
    f = onnx.load(str(out / "model.onnx"))
    f.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    import onnxruntime as ort

    sess = ort.InferenceSession(f.SerializeToString(), providers=["CPUExecutionProvider"])
    task = load_task(str(teacher_dir))
    lab = load_labeled(task_files["train"], names=task.model.labels)
    cal = Calibration(encode(task.tokenizer, lab.texts[:512], lab.labels[:512], 16))
    lo, hi = np.inf, -np.inf
    while (feed := cal.get_next()) is not None:
        x = sess.run([tensor], feed)[0]
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    assert scale == pytest.approx((max(hi, 0) - min(lo, 0)) / 255, rel=1e-4)


def test_bad_requests(teacher_dir, task_files, tmp_path):
    with pytest.raises(CompactorError, match="--int8 must be one of"):
        export_task(str(teacher_dir), tmp_path / "x", "int4", task_files["train"], task_files["test"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(CompactorError, match="no classification head"):
        export_task(str(task_files["encoder"]), tmp_path / "y", None, task_files["train"], task_files["test"])
    run = json.loads((task_files["dir"] / "onnx-static" / "task_run.json").read_text())
    assert run["calib"] == task_files["train"] and run["kind"] == "export"
