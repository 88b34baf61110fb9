"""Sparse random projection P (D x d) in COO form (Li et al. 2018's sparse kind).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from idlab.subspace.base import Projection, _generator

# ----------------------------------------------------------------------------- sparse


class SparseProjection(Projection):
    """Very sparse random projection (Li, Hastie & Church 2006), columns normalised.

    Each entry is nonzero with probability 1/s, s = sqrt(D), with sign +-1 equally likely.
    Column j has k_j ~ Binomial(D, 1/s) distinct rows drawn uniformly; a column drawn empty
    gets one row (k_j >= 1), so every column has unit length. Nonzeros of column j are
    +-1/sqrt(k_j) (the LHC scale sqrt(s) cancels in the normalisation).

    Stored (CSC): `signed_rows` int32 (nnz,) = (row + 1) * sign, column-major, and
    `col_ptr` int64 (d + 1,). Forward y = index_add over rows of v * theta[col]; backward is
    the gather/sum adjoint, both from autograd.
    """

    kind = "sparse"
    signed_rows: Tensor  # (nnz,) int32
    col_ptr: Tensor  # (d + 1,) int64

    def __init__(
        self, D: int, d: int, seed: int, device: torch.device | str | None, dtype: torch.dtype
    ) -> None:
        super().__init__(D, d, seed, dtype)
        gen = _generator(seed)
        p = 1.0 / math.sqrt(D)
        counts = torch.binomial(
            torch.full((d,), float(D), dtype=torch.float64),
            torch.full((d,), p, dtype=torch.float64),
            generator=gen,
        )
        counts = counts.long().clamp_(1, D)  # (d,)
        cols = torch.repeat_interleave(torch.arange(d), counts)  # (nnz,)
        rows = torch.randint(D, (int(counts.sum()),), generator=gen)
        # distinct rows per column: drop duplicates, redraw the shortfall until none is left
        while True:
            key = torch.unique(cols * D + rows)  # sorted by (col, row)
            cols, rows = key // D, key % D
            have = torch.bincount(cols, minlength=d)
            short = counts - have
            if not bool((short > 0).any()):
                break
            extra_cols = torch.repeat_interleave(torch.arange(d), short)
            cols = torch.cat([cols, extra_cols])
            rows = torch.cat([rows, torch.randint(D, (extra_cols.numel(),), generator=gen)])
        signs = torch.randint(0, 2, (rows.numel(),), generator=gen) * 2 - 1
        col_ptr = torch.zeros(d + 1, dtype=torch.int64)
        col_ptr[1:] = torch.cumsum(counts, 0)
        self.register_buffer(
            "signed_rows", ((rows + 1) * signs).to(torch.int32).to(device), persistent=False
        )
        self.register_buffer("col_ptr", col_ptr.to(device), persistent=False)

    @property
    def nnz(self) -> int:
        return int(self.signed_rows.numel())

    def coo(self) -> tuple[Tensor, Tensor, Tensor]:
        """(rows int64 (nnz,), cols int64 (nnz,), values (nnz,)) of P, values +-1/sqrt(k_j)."""
        counts = self.col_ptr.diff()  # (d,)
        cols = torch.repeat_interleave(torch.arange(self.d, device=counts.device), counts)
        sr = self.signed_rows.long()
        rows = sr.abs() - 1
        vals = sr.sign().to(self.dtype) * counts.to(self.dtype).rsqrt()[cols]
        return rows, cols, vals

    def sparse_matrix(self) -> Tensor:
        """P as a torch sparse COO tensor (D, d)."""
        rows, cols, vals = self.coo()
        return torch.sparse_coo_tensor(
            torch.stack([rows, cols]), vals, (self.D, self.d), check_invariants=True
        ).coalesce()

    def forward(self, theta_d: Tensor) -> Tensor:
        self._check_input(theta_d)
        rows, cols, vals = self.coo()
        contrib = vals.to(theta_d.dtype) * theta_d[cols]  # (nnz,)
        return torch.zeros(self.D, dtype=theta_d.dtype, device=theta_d.device).index_add(
            0, rows, contrib
        )
