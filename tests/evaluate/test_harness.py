import math

import pytest
import torch

from compactor.data.windows import make_windows
from compactor.errors import CompactorError
from compactor.evaluate import evaluate, table, to_json
from compactor.evaluate.size import model_size
from compactor.models.tiny import tiny_model


@pytest.fixture
def windows():
    g = torch.Generator().manual_seed(1)
    return make_windows(torch.randint(0, 256, (400,), generator=g).tolist(), length=64)


def test_model_against_itself(tiny, windows):
    r = evaluate(tiny, windows, reference=tiny, speed=False, progress=False)
    assert r.kld_mean == 0.0 and r.top1 == 1.0
    assert r.ppl == pytest.approx(r.ref_ppl)
    assert r.tokens == windows.n_scored == 6 * 63


def test_matches_naive_full_logits(windows):
    a, b = tiny_model(seed=0), tiny_model(seed=0)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.02 * torch.randn_like(p))
    r = evaluate(b, windows, reference=a, speed=False, progress=False)
    # Naive: whole batch at once in float64.
    with torch.no_grad():
        la = a(windows.input_ids).logits.double()[:, :-1]
        lb = b(windows.input_ids).logits.double()[:, :-1]
    tgt = windows.input_ids[:, 1:]
    lpa, lpb = la.log_softmax(-1), lb.log_softmax(-1)
    kl = (lpa.exp() * (lpa - lpb)).sum(-1)
    nll = -lpb.gather(-1, tgt[..., None]).squeeze(-1)
    assert r.kld_mean == pytest.approx(kl.mean().item(), rel=1e-4)
    assert r.kld_p99 == pytest.approx(torch.quantile(kl.flatten(), 0.99).item(), rel=1e-4)
    assert r.ppl == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert r.top1 == pytest.approx((la.argmax(-1) == lb.argmax(-1)).double().mean().item())
    assert 0 < r.kld_mean and r.top1 < 1.0


def test_size_bits_and_speed(tiny, windows):
    r = evaluate(tiny, windows, speed=True, progress=False)
    n = sum(p.numel() for p in tiny.parameters())  # parameters() already dedups the tied head
    assert r.params == n and r.size_bytes == 4 * n and r.bpw == 32.0
    assert r.prefill_tok_s > 0 and r.decode_tok_s > 0 and r.peak_rss_bytes > 0
    assert "| PPL" in table([r]).splitlines()[0].replace("PPL ", "PPL")
    assert '"kld_mean": null' in to_json([r])


def test_tied_weights_counted_once():
    m = tiny_model(tie_word_embeddings=True)
    untied = tiny_model(tie_word_embeddings=False)
    assert model_size(untied)[1] - model_size(m)[1] == m.config.vocab_size * m.config.hidden_size


def test_vocab_mismatch_refused(tiny, windows):
    other = tiny_model(vocab_size=300)
    with pytest.raises(CompactorError, match="vocabulary mismatch"):
        evaluate(tiny, windows, reference=other, speed=False, progress=False)


def test_windows_from_another_tokenizer_refused(windows):
    small = tiny_model(vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with pytest.raises(CompactorError, match="outside"):
        evaluate(small, windows, speed=False, progress=False)


def test_cached_reference_gives_identical_scores(tiny, text_file, tok):
    from compactor.data.windows import windows_for
    from compactor.evaluate.backends import CachedBackend, TorchBackend
    from compactor.evaluate.harness import evaluate
    from compactor.models.tiny import tiny_model

    win = windows_for(tok, str(text_file), 64, max_tokens=256)
    ref = TorchBackend(tiny_model("llama", seed=3))
    cached = CachedBackend(ref)
    plain = evaluate(tiny, win, reference=ref, speed=False, progress=False)
    first = evaluate(tiny, win, reference=cached, speed=False, progress=False)
    again = evaluate(tiny, win, reference=cached, speed=False, progress=False)
    assert len(cached._cache) == len(win)
    assert plain.kld_mean == first.kld_mean == again.kld_mean and plain.top1 == again.top1


def test_half_cache_changes_kld_negligibly(tiny, text_file, tok):
    from compactor.data.windows import windows_for
    from compactor.evaluate.backends import CachedBackend, TorchBackend
    from compactor.evaluate.harness import evaluate
    from compactor.models.tiny import tiny_model

    win = windows_for(tok, str(text_file), 64, max_tokens=256)
    ref = TorchBackend(tiny_model("llama", seed=3))
    plain = evaluate(tiny, win, reference=ref, speed=False, progress=False)
    half = evaluate(tiny, win, reference=CachedBackend(ref, half=True), speed=False, progress=False)
    assert abs(half.kld_mean - plain.kld_mean) < 1e-4 * max(plain.kld_mean, 1e-3)
    assert abs(half.ref_ppl - plain.ref_ppl) / plain.ref_ppl < 1e-4 and half.top1 == plain.top1


def test_domains_scored_separately_and_averaged(windows):
    a, b = tiny_model(seed=0), tiny_model(seed=1)
    g = torch.Generator().manual_seed(2)
    other = make_windows(torch.randint(0, 128, (300,), generator=g).tolist(), length=64)
    r = evaluate(b, {"x": windows, "y": other}, reference=a, speed=False, progress=False)
    rx = evaluate(b, windows, reference=a, speed=False, progress=False)
    ry = evaluate(b, other, reference=a, speed=False, progress=False)
    assert r.domains["x"]["kld_mean"] == pytest.approx(rx.kld_mean)
    assert r.domains["y"]["ppl"] == pytest.approx(ry.ppl)
    # Each domain weighs the same whatever its token count (6 vs 4 windows here).
    assert r.kld_mean == pytest.approx((rx.kld_mean + ry.kld_mean) / 2)
    assert r.top1 == pytest.approx((rx.top1 + ry.top1) / 2)
    assert r.ppl == pytest.approx(math.sqrt(rx.ppl * ry.ppl))
    assert r.tokens == rx.tokens + ry.tokens
    assert set(r.windows) == {"x", "y"}
    out = table([r])
    assert "per domain" in out and "x KLD" in out and f"{rx.kld_mean:.5f}" in out
