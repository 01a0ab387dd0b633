"""Range estimators (min/max, percentile, MSE search) and fake quantization on a grid (kernels/grid.py).

Per-channel ranges are taken along dim 0 of a reshaped ``[C, -1]`` view.
"""

from __future__ import annotations

import torch

from ..kernels.grid import Grid, grid_from_range  # noqa: F401  (Grid: re-exported)
from ..kernels.backend import get_backend

ESTIMATORS = ("minmax", "percentile", "mse")


def fake_quant(x: torch.Tensor, grid: Grid, axis: int | None = None) -> torch.Tensor:
    """Fake-quantize with the active backend; `axis` is the channel dim for per-channel grids."""
    backend = get_backend()
    if grid.scale.dim() == 0 or axis is None:
        return backend.per_tensor(x, grid.scale.reshape(1), grid.zero_point.reshape(1), grid.qmin, grid.qmax)
    return backend.per_channel(x, grid.scale, grid.zero_point, axis, grid.qmin, grid.qmax)


def estimate_range(x: torch.Tensor, estimator: str, bits: int, symmetric: bool, per_channel: bool = False,
                   percentile: float = 99.99, lp: float = 2.0, grid_points: int = 100):
    """Return ``(lo, hi)``; per-channel ranges are taken over dim 0 (weights: output channels)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown range estimator {estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
    x = x.detach().float()
    flat = x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    if estimator == "percentile":
        lo, hi = _percentile(flat, 100.0 - percentile), _percentile(flat, percentile)
    elif estimator == "mse":
        lo, hi = _mse_search(flat, lo, hi, bits, symmetric, lp, grid_points)
    if not per_channel:
        lo, hi = lo[0], hi[0]
    return lo, hi


def _percentile(flat: torch.Tensor, q: float) -> torch.Tensor:
    n = flat.shape[1]
    k = min(max(int(round(q / 100.0 * (n - 1))) + 1, 1), n)
    return flat.kthvalue(k, dim=1).values


def _mse_search(flat, lo, hi, bits, symmetric, lp, grid_points):
    """Shrink the min/max range by a common ratio per channel; keep the ratio with the smallest Lp error."""
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for i in range(grid_points):
        ratio = 1.0 - i / grid_points
        cand_lo, cand_hi = lo * ratio, hi * ratio
        grid = grid_from_range(cand_lo, cand_hi, bits, symmetric)
        q = fake_quant(flat, grid, axis=0 if flat.shape[0] > 1 else None)
        err = (q - flat).abs().pow(lp).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, cand_lo, best_lo)
        best_hi = torch.where(better, cand_hi, best_hi)
    return best_lo, best_hi
