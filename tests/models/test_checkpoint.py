"""The shard writer: standard safetensors shards assembled from on-disk spools."""

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from compactor.models.checkpoint import CheckpointIndex, ShardWriter


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"w.f32": torch.randn(10, 3, generator=g), "w.bf16": torch.randn(7, generator=g).to(torch.bfloat16),
            "c.i8": torch.randint(-8, 8, (33,), dtype=torch.int8, generator=g), "i.i64": torch.arange(5),
            "m.bool": torch.tensor([True, False, True]), "big": torch.randn(300, generator=g),
            "empty": torch.zeros(0), "h.f16": torch.randn(2, 2, generator=g).half(),
            "c.i16": torch.randint(-300, 300, (9,), dtype=torch.int16, generator=g)}


def test_shards_round_trip_every_dtype_and_keep_nothing_in_memory(tmp_path):
    ts = _tensors()
    w = ShardWriter(tmp_path, "model", max_shard_bytes=1000)
    for k, v in ts.items():
        w.add(k, v)
        assert not any(isinstance(x, torch.Tensor) for e in w.pending.values() for x in e)
    w.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in names if n.endswith(".tmp")]  # spools removed
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ts.values())
    got = {}
    for shard in set(index["weight_map"].values()):
        got.update(load_file(str(tmp_path / shard)))
        with safe_open(str(tmp_path / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert len(set(index["weight_map"].values())) > 1
    for k, v in ts.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    # Our own reader validates the headers too.
    assert set(CheckpointIndex(tmp_path).where) == set(ts)


def test_tensors_stay_aligned_largest_elements_first(tmp_path):
    w = ShardWriter(tmp_path, "model")
    for k, v in _tensors().items():
        w.add(k, v)
    w.close()
    with open(tmp_path / "model-00001.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert (8 + n) % 8 == 0
    sizes = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "I64": 8, "BOOL": 1, "I16": 2}
    for name, info in header.items():
        if name != "__metadata__":
            assert info["data_offsets"][0] % sizes[info["dtype"]] == 0, name
