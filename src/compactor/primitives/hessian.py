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
        # x^T x is symmetric: accumulate only the block rows' upper parts (blocks (i, j >= i)),
        # 62-75 % of the full product's work; hessian() mirrors the rest.
        n_blocks = 1 if in_features < 256 else 2 if in_features < 1024 else 4
        self._block = -(-in_features // n_blocks)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        b = self._block
        for i in range(0, x.shape[1], b):
            self.sum[i:i + b, i:] += (x[:, i:i + b].T @ x[:, i:]).double()  # float32 product
        self.count += x.shape[0]

    def _full_sum(self) -> torch.Tensor:
        """``sum x x^T`` with the lower triangle mirrored from the accumulated upper one."""
        return (torch.triu(self.sum) + torch.triu(self.sum, 1).T).float()

    def hessian(self) -> torch.Tensor:
        """``H = 2/n * sum x x^T`` ([in, in], float32)."""
        if self.count == 0:
            raise ValueError("no calibration inputs were observed")
        return self._full_sum() * (2.0 / self.count)

    def second_moment(self) -> torch.Tensor:
        """``E[x x^T]`` ([in, in], float32)."""
        return self._full_sum() / max(self.count, 1)

    def mean_sq(self) -> torch.Tensor:
        """Per-column mean of x^2 ([in]): llama.cpp's importance-matrix statistic."""
        return (torch.diagonal(self.sum) / max(self.count, 1)).float()


def prepare_hessian(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Damp ``H`` and mark dead columns. Returns (damped H, dead mask [in]).

    Dead columns (never active: zero diagonal) get H_jj = 1 so H stays invertible; their
    weights should be zeroed by the caller (they never influence the output). Damping adds
    ``percdamp * mean(diag H)`` to the diagonal.
    """
    H = H.clone().float()
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0
    diag += percdamp * diag.mean()
    return H, dead


def inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U; what GPTQ's column updates read),
    float32.

    With J the order reversal, H~ = J H J = L~ L~^T gives H^-1 = J L~^-T L~^-1 J, so
    U = J L~^-1 J: one Cholesky and one triangular solve (2/3 n^3), instead of Cholesky,
    inverse and a second Cholesky — 11x faster here at n = 2048, equal to 3e-7.
    Retries with growing damping if H is numerically not positive definite.
    """
    damp = 0.0
    n = H.shape[0]
    eye = torch.eye(n, dtype=H.dtype)
    rev = H.flip(0).flip(1)
    for _ in range(6):
        try:
            L = torch.linalg.cholesky(rev + damp * eye)
            return torch.linalg.solve_triangular(L, eye, upper=False).flip(0).flip(1)
        except torch.linalg.LinAlgError:
            damp = max(damp * 10, 1e-6 * float(torch.diagonal(H).mean()))
    raise ValueError("Hessian is not positive definite even after extra damping")
