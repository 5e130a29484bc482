import pytest
import torch

from compactor.primitives.hessian import HessianAccumulator, inverse_cholesky_upper, prepare_hessian


def test_accumulator_matches_naive_sum():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 7, 16, generator=g) for _ in range(3)]
    acc = HessianAccumulator(16)
    for x in batches:
        acc.add(x)
    X = torch.cat([x.reshape(-1, 16) for x in batches])
    assert torch.allclose(acc.hessian(), 2 * X.T @ X / X.shape[0], atol=1e-5)
    assert torch.allclose(acc.mean_sq(), X.pow(2).mean(0), atol=1e-6)


def test_blocked_upper_accumulation_matches_full_product():
    """Wide inputs accumulate only block rows' upper parts; the result is the full x^T x."""
    g = torch.Generator().manual_seed(1)
    for n in (300, 1100):  # 2 and 4 block rows, the last one shorter
        acc = HessianAccumulator(n)
        X = torch.randn(3, 50, n, generator=g)
        for x in X:
            acc.add(x)
        X = X.reshape(-1, n).double()
        ref = (X.T @ X / X.shape[0]).float()
        assert torch.allclose(acc.second_moment(), ref, atol=1e-4)
        assert torch.allclose(acc.hessian(), 2 * ref, atol=2e-4)
        assert torch.equal(acc.hessian(), acc.hessian().T)


def test_dead_columns_and_inverse_factor():
    H = torch.diag(torch.tensor([2.0, 0.0, 1.0]))
    Hd, dead = prepare_hessian(H, 0.01)
    assert dead.tolist() == [False, True, False] and Hd[1, 1] > 0
    U = inverse_cholesky_upper(Hd)
    assert torch.allclose(U.T @ U, torch.linalg.inv(Hd), atol=1e-6)
    with pytest.raises(ValueError, match="no calibration inputs"):
        HessianAccumulator(3).hessian()


@pytest.mark.parametrize("n", [7, 64, 300])
def test_inverse_cholesky_upper_equals_naive(n):
    from compactor.primitives.hessian import inverse_cholesky_upper

    g = torch.Generator().manual_seed(n)
    x = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    H = x.T @ x / (3 * n) + 0.01 * torch.eye(n, dtype=torch.float64)
    U = inverse_cholesky_upper(H.float())
    naive = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)  # float64, the definition
    assert torch.equal(U, torch.triu(U))
    assert (U.double() - naive).abs().max() / naive.abs().max() < 1e-4
    assert torch.allclose((U.double().T @ U.double()), torch.linalg.inv(H), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("n,block", [(1, 4), (37, 8), (64, 64), (130, 32)])
def test_lower_triangular_inverse_equals_naive(n, block):
    from compactor.primitives.hessian import lower_triangular_inverse

    g = torch.Generator().manual_seed(n)
    X = torch.randn(2 * n + 3, n, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(X.T @ X / n + 0.1 * torch.eye(n, dtype=torch.float64))
    got = lower_triangular_inverse(L, block)
    torch.testing.assert_close(got, torch.linalg.inv(L), rtol=1e-9, atol=1e-9)
    assert torch.equal(got, got.tril())


def test_hessian_is_formed_once_and_frees_the_float64_sum():
    g = torch.Generator().manual_seed(0)
    acc = HessianAccumulator(300)
    x = torch.randn(400, 300, generator=g)
    acc.add(x)
    mean_sq = acc.mean_sq()
    H = acc.hessian()
    torch.testing.assert_close(H, 2 * x.T.double() @ x.double() / 400, rtol=1e-5, atol=1e-5, check_dtype=False)
    assert acc.sum is None and acc.hessian() is H  # shared by the modules of a group
    assert torch.equal(acc.mean_sq(), mean_sq)
    torch.testing.assert_close(acc.second_moment(), H / 2)
    with pytest.raises(ValueError, match="already computed"):
        acc.add(x)
