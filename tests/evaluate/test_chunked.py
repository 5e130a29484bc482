"""Evaluation in chunks of positions: a large vocabulary never has a whole window's logits in
memory, and the metrics are the same as from whole windows."""

import importlib
import math

import pytest
import torch

from compactor.data.windows import make_windows
from compactor.errors import CompactorError
from compactor.evaluate import evaluate
from compactor.evaluate.backends import CachedBackend, TorchBackend, chunk_rows, iter_chunks
from compactor.models.tiny import tiny_model


@pytest.fixture
def windows():
    g = torch.Generator().manual_seed(4)
    return make_windows(torch.randint(0, 256, (500,), generator=g).tolist(), length=64)


def _naive(cand, ref, win):
    """PPL, mean KL(ref || cand) and top-1 from whole-window logits of the models' forwards."""
    nll = kl = agree = n = 0.0
    with torch.no_grad():
        for ids, mask in zip(win.input_ids, win.score_mask):
            lq = torch.log_softmax(cand(ids[None]).logits[0, :-1].double(), -1)
            lp = torch.log_softmax(ref(ids[None]).logits[0, :-1].double(), -1)
            m, tgt = mask[1:], ids[1:]
            nll -= lq[m].gather(-1, tgt[m, None]).sum().item()
            kl += (lp[m].exp() * (lp[m] - lq[m])).sum(-1).clamp_min(0).sum().item()
            agree += (lp[m].argmax(-1) == lq[m].argmax(-1)).sum().item()
            n += int(m.sum())
    return math.exp(nll / n), kl / n, agree / n


def test_chunk_rows_bound_the_chunk_bytes():
    assert chunk_rows(49152) == 128
    assert chunk_rows(262144) == 32
    assert chunk_rows(262144) * 262144 * 4 <= 32 << 20
    assert chunk_rows(10_000_000) == 8


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "phi3"])
def test_decoder_then_head_equals_the_models_forward(family, windows, monkeypatch):
    """The large-vocabulary path (decoder once, head per chunk, Gemma 2's soft-cap) gives the
    metrics of the models' own whole-window forwards."""
    harness = importlib.import_module("compactor.evaluate.harness")

    monkeypatch.setattr(harness, "chunk_rows", lambda vocab: 16)  # as a 262k vocabulary's 32
    extra = {"final_logit_softcapping": 5.0} if family == "gemma2" else {}
    cand, ref = tiny_model(family, seed=0, **extra), tiny_model(family, seed=1, **extra)
    ppl, kld, top1 = _naive(cand, ref, windows)
    seen = []
    head = cand.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[-2]))
    try:
        r = evaluate(TorchBackend(cand, max_window_bytes=0), windows,
                     reference=TorchBackend(ref, max_window_bytes=0), speed=False, progress=False)
    finally:
        hook.remove()
    assert r.ppl == pytest.approx(ppl, rel=1e-5)
    assert r.kld_mean == pytest.approx(kld, rel=1e-4, abs=1e-7)
    assert r.top1 == pytest.approx(top1)
    assert seen and max(seen) == 16
    assert r.tokens == windows.n_scored


def test_chunk_boundaries_do_not_change_the_scores(windows, monkeypatch):
    """Odd chunk sizes (not dividing the window) score the same tokens the same way."""
    cand, ref = tiny_model(seed=0), tiny_model(seed=2)
    whole = evaluate(cand, windows, reference=ref, speed=False, progress=False)
    be, rb = TorchBackend(cand, max_window_bytes=0), TorchBackend(ref, max_window_bytes=0)
    for rows in (1, 7, 63, 64, 100):
        chunks = list(iter_chunks(be, windows.input_ids, rows))
        assert all(c.shape[0] <= rows for _, _, c in chunks)
        got = torch.cat([c for i, _, c in chunks if i == 0])
        full = cand(windows.input_ids[:1]).logits[0].detach()
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    harness = importlib.import_module("compactor.evaluate.harness")

    monkeypatch.setattr(harness, "chunk_rows", lambda vocab: 7)
    r = evaluate(be, windows, reference=rb, speed=False, progress=False)
    assert r.tokens == whole.tokens
    assert r.kld_mean == pytest.approx(whole.kld_mean, rel=1e-5)
    assert r.ppl == pytest.approx(whole.ppl, rel=1e-6) and r.top1 == whole.top1


@pytest.mark.parametrize("half", [False, True])
def test_disk_cache_reads_chunks_and_equals_memory(tmp_path, windows, half):
    cand, ref = tiny_model(seed=0), tiny_model(seed=5)
    mem = evaluate(cand, windows, reference=CachedBackend(TorchBackend(ref), half=half),
                   speed=False, progress=False)
    disk_be = CachedBackend(TorchBackend(ref), half=half, directory=tmp_path)
    disk = evaluate(cand, windows, reference=disk_be, speed=False, progress=False)
    again = evaluate(cand, windows, reference=disk_be, speed=False, progress=False)
    assert disk.kld_mean == mem.kld_mean == again.kld_mean and disk.top1 == mem.top1
    files = sorted(tmp_path.iterdir())
    assert len(files) == len(windows) and not any(f.suffix == ".tmp" for f in files)
    assert all(f.stat().st_size == windows.length * 258 * (2 if half else 4) for f in files)
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated: named, not misread
    with pytest.raises(CompactorError, match="truncated"):
        evaluate(cand, windows, reference=disk_be, speed=False, progress=False)


def test_repeated_windows_are_cached_once(tmp_path):
    ids = torch.arange(64).repeat(3)
    win = make_windows(ids.tolist(), length=64)  # three identical windows
    be = CachedBackend(TorchBackend(tiny_model(seed=1)), directory=tmp_path)
    be.fill(win.input_ids, 16)
    assert len(list(tmp_path.iterdir())) == 1
    r = evaluate(tiny_model(seed=0), win, reference=be, speed=False, progress=False)
    assert r.tokens == win.n_scored
