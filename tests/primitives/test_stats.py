"""Input statistics against naive references; the row sample is uniform."""

import torch

from compactor.primitives.stats import InputSample


def test_moments_equal_naive_over_batches():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(b, 7, 6, generator=g) for b in (1, 3, 2)]
    s = InputSample(6, max_rows=0)
    for x in xs:
        s.add(x)
    flat = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    assert s.count == flat.shape[0]
    assert torch.allclose(s.mean_abs().double(), flat.abs().mean(0), atol=1e-6)
    assert torch.allclose(s.mean_sq().double(), flat.pow(2).mean(0), atol=1e-6)
    assert torch.equal(s.abs_max, flat.abs().amax(0).float())
    assert s.rows is None


def test_row_sample_is_uniform_whatever_the_batch_sizes():
    # 200 rows arrive in batches of 150 and 50; keep 40. Every row must be kept with
    # probability 40/200 = 0.2 — the rows of the first batch as often as the last's.
    x = torch.arange(200, dtype=torch.float32)[:, None].repeat(1, 2)
    hits = torch.zeros(200)
    trials = 400
    for seed in range(trials):
        s = InputSample(2, max_rows=40, seed=seed)
        s.add(x[:150])
        s.add(x[150:])
        kept = s.rows[:, 0].long()
        assert len(kept) == 40 and len(set(kept.tolist())) == 40  # no row twice
        assert torch.equal(kept, kept.sort().values)  # arrival order
        hits[kept] += 1
    freq = hits / trials
    # mean over each batch's rows: both 0.2 (binomial sd of a 50-row mean ~0.003)
    assert abs(float(freq[:150].mean()) - 0.2) < 0.015 and abs(float(freq[150:].mean()) - 0.2) < 0.015
    assert float(freq.min()) > 0.1 and float(freq.max()) < 0.3


def test_row_sample_keeps_everything_below_the_cap():
    s = InputSample(3, max_rows=10)
    x = torch.randn(4, 3)
    s.add(x)
    assert torch.equal(s.rows, x)
