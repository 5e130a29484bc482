"""Calibration on several processes (torchrun, gloo) equals one process, byte for byte."""

import filecmp
import os
import subprocess
import sys

import pytest

from compactor.distributed import shard_batches
from compactor.models.tiny import tiny_model, tiny_tokenizer
from tests.torchrun import failure


def test_shards_are_whole_batches_and_cover_everything():
    a, b = shard_batches(21, 4, 0, 2), shard_batches(21, 4, 1, 2)
    assert a == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19] and b == [4, 5, 6, 7, 12, 13, 14, 15, 20]
    assert sorted(a + b) == list(range(21))
    assert shard_batches(5, 8, 1, 2) == []  # a process may have nothing to observe


@pytest.mark.parametrize("method,stream", [("gptq", False), ("gptq", True), ("sparsegpt", False),
                                           ("wanda", True)])
def test_two_processes_equal_one(tmp_path, method, stream):
    src = tmp_path / "src"
    tiny_model("llama", num_hidden_layers=3).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"Line {i}: it is a truth universally acknowledged that {i * 7 % 13} "
                              f"men want {i % 5} wives." for i in range(300)))
    cmd = "quantize" if method == "gptq" else "prune"
    args = [cmd, str(src), "--method", method, "--calib-data", str(text), "--samples", "32",
            "--calib-window", "64", "--eval-data", str(text), "--eval-tokens", "128", "--eval-window", "64",
            "--no-speed"] + (["--grid", "q4_0"] if method == "gptq" else []) + (["--stream"] if stream else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "compactor.cli", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "compactor.cli", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, failure(two)
    files = sorted(p.name for p in (tmp_path / "one").iterdir() if p.suffix == ".safetensors")
    assert files and files == sorted(p.name for p in (tmp_path / "two").iterdir() if p.suffix == ".safetensors")
    for f in files:
        assert filecmp.cmp(tmp_path / "one" / f, tmp_path / "two" / f, shallow=False), f


def test_awq_under_torchrun_is_refused_by_name(tmp_path, monkeypatch):
    import compactor.calibration.sequential as seq
    from compactor.data.windows import make_windows
    from compactor.errors import CompactorError
    from compactor.quant.awq import AWQConfig, apply_awq

    monkeypatch.setattr(seq, "dist_info", lambda: (0, 2))
    win = make_windows(list(range(256)) * 2, length=64)
    with pytest.raises(CompactorError, match="awq searches scales on sampled input rows"):
        seq.run_sequential(tiny_model("llama"), win, apply_awq, AWQConfig(grid="q4_0"), progress=False)


def test_shutdown_destroys_the_group_and_is_safe_without_one(tmp_path):
    # The CLI calls shutdown() on every exit path; with no group it must be a no-op, and with
    # one it must leave none behind (a group alive at finalization can SIGABRT under gloo).
    import torch

    from compactor.distributed import shutdown

    shutdown()
    assert not torch.distributed.is_initialized()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert torch.distributed.is_initialized()
    shutdown()
    assert not torch.distributed.is_initialized()


def test_owners_balance_by_size_and_are_deterministic():
    from compactor.distributed import owners

    sizes = {"q": 100, "k": 25, "v": 25, "gate": 300, "up": 300}
    own = owners(sizes, 2)
    assert own == owners(dict(reversed(list(sizes.items()))), 2)  # same on every process
    load = [sum(s for n, s in sizes.items() if own[n] == r) for r in (0, 1)]
    assert sorted(load) == [350, 400] and own["gate"] != own["up"]
    assert set(owners({"a": 1}, 4).values()) == {0}
