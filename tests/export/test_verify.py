"""The GGUF verifier: reads tensors back exactly, and catches a file that differs."""

import numpy as np
import pytest
import torch

from compactor.api import quantize_
from compactor.export.gguf import export_gguf
from compactor.export.verify import FileTensors, check_tensors
from compactor.models.tiny import tiny_model
from compactor.quant.qlinear import QuantizedLinear
from compactor.quant.rtn import RTNConfig


def _exported(tmp_path, tok):
    m = tiny_model("llama")
    quantize_(m, RTNConfig(grid="q4_0"))
    return m, export_gguf(m, tmp_path / "m.gguf", tokenizer=tok, progress=False)


def test_file_tensors_equal_gguf_dequantize(tmp_path, tok):
    import gguf
    from gguf.quants import dequantize

    _, exp = _exported(tmp_path, tok)
    ft = FileTensors(exp.path)
    for t in gguf.GGUFReader(str(exp.path)).tensors:
        ref = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)
        assert torch.equal(ft[t.name].reshape(-1), torch.from_numpy(ref.copy())), t.name


def test_check_tensors_matches_memory_and_catches_a_changed_code(tmp_path, tok):
    m, exp = _exported(tmp_path, tok)
    n, err, worst, rounded = check_tensors(m, exp)
    assert n == 14 and err <= 1e-6 and {r.source for r in rounded} == {"model.embed_tokens.weight"}
    # One code changed in memory after export: the file no longer matches.
    q = m.model.layers[1].mlp.up_proj
    assert isinstance(q, QuantizedLinear)
    codes = q.codes.clone()
    codes[0, 0] = (codes[0, 0] + 5) % 16
    m.model.layers[1].mlp.set_submodule("up_proj", QuantizedLinear(codes, q.qparams, q.label,
                                                                   q.bits_per_weight, q.bias))
    n, err, worst, _ = check_tensors(m, exp)
    assert err > 1e-3 and worst == "blk.1.ffn_up.weight"


def test_a_corrupted_file_fails_verification(tmp_path, tok):
    pytest.importorskip("llama_cpp")
    from compactor.data.windows import make_windows
    from compactor.export.verify import verify_gguf

    m, exp = _exported(tmp_path, tok)
    win = make_windows(torch.randint(0, 258, (256,), generator=torch.Generator().manual_seed(0)), 64)
    assert verify_gguf(m, exp, win).passed
    rec = next(r for r in exp.tensors if r.name == "blk.0.attn_q.weight")
    import gguf

    off = next(t.data_offset for t in gguf.GGUFReader(str(exp.path)).tensors if t.name == rec.name)
    raw = bytearray(exp.path.read_bytes())
    for i in range(off, off + 18 * 8):  # the first 8 Q4_0 blocks: scales and codes
        raw[i] ^= 0x5A
    exp.path.write_bytes(bytes(raw))
    v = verify_gguf(m, exp, win)
    assert not v.passed and v.worst_tensor == "blk.0.attn_q.weight"
