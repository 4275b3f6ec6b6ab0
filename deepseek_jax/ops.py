"""Small array helpers shared by the layers and the matmul recipes (below both, so neither imports the other)."""

from __future__ import annotations

from typing import Sequence

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


def contract_last(n_in: int, x_ndim: int) -> DimensionNumbers:
    """Dimension numbers contracting the last ``n_in`` dims of x with the first ``n_in`` of the kernel."""
    return ((tuple(range(x_ndim - n_in, x_ndim)), tuple(range(n_in))), ((), ()))
