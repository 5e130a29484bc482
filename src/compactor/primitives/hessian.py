"""The layer-input Hessian of the squared reconstruction error, H = 2/n * sum x x^T,
products in float32 summed in float64, with damping and dead-column handling (GPTQ /
SparseGPT)."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Running ``sum x x^T`` and token count for inputs ``x [..., in]``.

    Products are float32 even when the calibration forward runs in bfloat16: rounding each
    batch's ``x^T x`` to bf16 (twice as fast here) leaves SmolLM2's Hessians indefinite,
    because its massive activations make a few entries ~1e6 times the rest and their
    rounding error swamps the small eigenvalues (measured; damping does not recover it).

    The running sum is float64: a sum of batch products then hardly depends on the order of
    the batches, so processes that each sum their share and add the parts (torchrun) get
    the Hessian one process gets, to float32 rounding.
    """

    def __init__(self, in_features: int):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.count = 0
        self._hessian: torch.Tensor | None = None
        # x^T x is symmetric: accumulate only the block rows' upper parts (blocks (i, j >= i)),
        # 62-75 % of the full product's work; hessian() mirrors the rest.
        n_blocks = 1 if in_features < 256 else 2 if in_features < 1024 else 4
        self._block = -(-in_features // n_blocks)

    def add(self, x: torch.Tensor) -> None:
        if self.sum is None:
            raise ValueError("this accumulator's Hessian was already computed; it takes no more inputs")
        x = x.reshape(-1, x.shape[-1]).float()
        b = self._block
        for i in range(0, x.shape[1], b):
            self.sum[i:i + b, i:] += (x[:, i:i + b].T @ x[:, i:]).double()  # float32 product
        self.count += x.shape[0]

    def _full_sum(self) -> torch.Tensor:
        """``sum x x^T`` ([in, in], float32) with the lower triangle mirrored from the
        accumulated upper one — built in place, block by block, so the only n x n tensors
        alive are the float64 sum and the float32 result (at n = 14,336: 1.6 + 0.8 GB; the
        obvious triu + triu.T in float64 took three more float64 copies)."""
        out = self.sum.float()
        out.triu_()
        b = self._block
        n = out.shape[0]
        for i in range(0, n, b):
            j = min(i + b, n)
            blk = out[i:j, i:j]
            blk += blk.triu(1).T  # the diagonal block's lower half from its upper half
            if i:
                out[i:j, :i] = out[:i, i:j].T  # the rows' lower blocks from the upper blocks
        return out

    def hessian(self) -> torch.Tensor:
        """``H = 2/n * sum x x^T`` ([in, in], float32). Computed once and kept: the modules
        that share an input (q/k/v) reuse it; callers must not modify it."""
        if self.count == 0:
            raise ValueError("no calibration inputs were observed")
        if self._hessian is None:
            self._hessian = self._full_sum().mul_(2.0 / self.count)
            # The float64 sum is not needed any more (the solve reads only H): at n = 14,336
            # it is 1.6 GB, freed here rather than after the group's last solve.
            self._diag = torch.diagonal(self.sum).clone()
            self.sum = None
        return self._hessian

    def second_moment(self) -> torch.Tensor:
        """``E[x x^T]`` ([in, in], float32)."""
        if self.sum is None:
            return self._hessian / 2.0
        return self._full_sum().div_(max(self.count, 1))

    def mean_sq(self) -> torch.Tensor:
        """Per-column mean of x^2 ([in]): llama.cpp's importance-matrix statistic."""
        diag = torch.diagonal(self.sum) if self.sum is not None else self._diag
        return (diag / max(self.count, 1)).float()


def damped_diagonal(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(damped diagonal [in] float32, dead mask [in]) of ``H``: dead columns (zero diagonal,
    never active) get 1, then ``percdamp * mean`` is added — decided on the diagonal alone,
    so a solver can build its one copy of H already permuted."""
    diag = torch.diagonal(H).float()
    dead = diag == 0
    d = torch.where(dead, torch.ones_like(diag), diag)
    return d + percdamp * d.mean(), dead


def prepare_hessian(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Damp ``H`` and mark dead columns. Returns (damped H, dead mask [in]).

    Dead columns (never active: zero diagonal) get H_jj = 1 so H stays invertible; their
    weights should be zeroed by the caller (they never influence the output). Damping adds
    ``percdamp * mean(diag H)`` to the diagonal (:func:`damped_diagonal`).
    """
    d, dead = damped_diagonal(H, percdamp)
    H = H.clone().float()
    torch.diagonal(H).copy_(d)
    return H, dead


def inverse_cholesky_upper(H: torch.Tensor, consume: bool = False) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U; what GPTQ's column updates read),
    float32.

    With J the order reversal, H~ = J H J = L~ L~^T gives H^-1 = J L~^-T L~^-1 J, so
    U = J L~^-1 J: one Cholesky and one triangular solve (2/3 n^3), instead of Cholesky,
    inverse and a second Cholesky — 11x faster here at n = 2048, equal to 3e-7.
    ``consume``: H is the caller's scratch copy and may be overwritten (at n = 14,336 every
    n x n float32 copy is 0.8 GB, so the solve keeps at most three alive).
    Retries with growing damping if H is numerically not positive definite.
    """
    damp = 0.0
    n = H.shape[0]
    rev = H.flip((0, 1))
    if consume:
        H.resize_(0)  # the caller's copy is no longer needed: free it now
    for _ in range(6):
        try:
            if damp:
                torch.diagonal(rev).add_(damp)
            L = torch.linalg.cholesky(rev)
            break
        except torch.linalg.LinAlgError:
            new = max(damp * 10, 1e-6 * float(torch.diagonal(rev).mean()))
            torch.diagonal(rev).sub_(damp)
            damp = new
    else:
        raise ValueError("Hessian is not positive definite even after extra damping")
    del rev
    inv = lower_triangular_inverse(L)
    del L
    return inv.flip((0, 1))


def lower_triangular_inverse(L: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """L^-1 of a lower-triangular ``L [n, n]``, by blocks of columns.

    Why blocks: L^-1 is lower triangular too, so the columns of block [j, j+b) are zero
    above row j and solve only the trailing system L[j:, j:] X = I[j:, j:j+b]. That costs
    sum (n - j)^2 b ~ n^3 / 3 multiply-adds, a third of one solve against the whole identity.
    """
    n = L.shape[0]
    out = torch.zeros_like(L)
    for j in range(0, n, block):
        b = min(block, n - j)
        rhs = torch.zeros(n - j, b, dtype=L.dtype)
        rhs[:b].fill_diagonal_(1.0)
        out[j:, j:j + b] = torch.linalg.solve_triangular(L[j:, j:], rhs, upper=False)
    return out
