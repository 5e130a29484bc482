import numpy as np
import pytest
import torch

from compactor.errors import CompactorError
from compactor.models.load import load_model, read_gguf_header


def test_load_directory(tiny_dir, tiny):
    m = load_model(tiny_dir)
    assert m.adapter.family == "llama" and m.gguf is None and m.load_seconds > 0
    x = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(m.model(x).logits, tiny(x).logits)
    assert m.tokenizer("ab", add_special_tokens=False)["input_ids"] == [97, 98]


def test_missing_path(tmp_path):
    with pytest.raises(CompactorError, match="model not found.*smollm2-135m"):
        load_model(tmp_path / "nope")


def test_directory_without_model(tmp_path):
    with pytest.raises(CompactorError, match="no config.json"):
        load_model(tmp_path)


def _write_gguf(path, arch="llama", n=64):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((n, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_truncated_gguf(tmp_path):
    good = tmp_path / "good.gguf"
    _write_gguf(good, n=4096)
    data = good.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CompactorError, match="bad.gguf.*(truncated|corrupt)"):
        load_model(bad)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(CompactorError, match="junk.gguf is not a readable GGUF"):
        read_gguf_header(junk)


def test_unknown_gguf_architecture(tmp_path):
    p = tmp_path / "odd.gguf"
    _write_gguf(p, arch="mamba")
    assert read_gguf_header(p)["architecture"] == "mamba"
    with pytest.raises(CompactorError, match="GGUF architecture 'mamba'.*adapters.py"):
        load_model(p)
