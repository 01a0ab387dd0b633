"""PNMQ's parametric non-uniform weight grid (Chikin & Antiukh, CVPR 2022; no public code: a reconstruction).

Symmetric, per tensor. For b bits, K = 2^(b-1) - 1 and the 2K + 1 levels are

    q_k = s * sign(k) * (|k| / K)^p,    k = -K..K,

s > 0 the largest level (the clipping value), p in [1, 2] the grid's shape. p = 1 is the uniform symmetric grid of
step s / K (the repository's symmetric grid for max |w| = s, less its extra level -(K + 1) s / K that min/max
ranges never reach); a larger p crowds the levels near zero (the first step is s / K^p), where most weights are.
At 2 bits (K = 1) the grid is {-s, 0, s} whatever p. This family is dfqbench's choice: the paper's abstract says
"parametric non-uniform", a summary says one parameter p in [1, 2] with p = 1 uniform (both inferred).

Each weight goes to its nearest level (exactly: with x = min(|w| / s, 1), k = floor(K x^(1/p)) or k + 1, whichever
level is nearer). `search_grid` chooses (s, p) by brute force: s = c max|W| for c on a grid over `scale_range`, p on
a grid over `exponent_range`; the pair with the smallest L4 norm of the weight error wins (ties: the smaller p,
then the smaller c: the first in scan order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .precomputed import PrecomputedWeightQuantizer

_CHUNK = 1 << 22  # elements per block of the vectorized search (scale candidates x weights)


def half_levels(bits: int) -> int:
    """K: the number of nonzero levels on each side of zero."""
    return 2 ** (bits - 1) - 1


def grid_levels(bits: int, scale: float, exponent: float) -> torch.Tensor:
    """The 2K + 1 levels, ascending (float64)."""
    k = half_levels(bits)
    pos = scale * (torch.arange(0, k + 1, dtype=torch.float64) / k) ** exponent
    return torch.cat([-pos.flip(0)[:-1], pos])


def _round_unit(x: torch.Tensor, k: int, exponent: float) -> torch.Tensor:
    """x in [0, 1] to the nearest of the levels (j / k)^exponent, j = 0..k."""
    lo_idx = torch.floor(k * x.pow(1.0 / exponent)).clamp_(0, k - 1)
    lo, hi = (lo_idx / k).pow(exponent), ((lo_idx + 1) / k).pow(exponent)
    return torch.where(x - lo <= hi - x, lo, hi)


def quantize_to_grid(weight: torch.Tensor, bits: int, scale: float, exponent: float) -> torch.Tensor:
    """`weight` on the grid (scale s, exponent p): sign(w) * s * round_grid(min(|w| / s, 1))."""
    if scale <= 0:
        return torch.zeros_like(weight)
    x = (weight.abs() / scale).clamp(max=1.0)
    return torch.sign(weight) * scale * _round_unit(x, half_levels(bits), exponent)


@dataclass
class GridFit:
    bits: int
    exponent: float  # p
    scale_ratio: float  # c: s = c * max|W|
    scale: float  # s
    l4: float  # the L4 norm of the weight error at (s, p)
    weight_l4: float  # the L4 norm of the weight itself (the allocation's relative loss divides by it)


@torch.no_grad()
def search_grid(weight: torch.Tensor, bits: int, exponents, scale_ratios) -> GridFit:
    """Brute force: every (p, c) pair, s = c max|W|; the pair with the smallest L4 weight error (first in scan order
    on ties: p ascending, then c ascending)."""
    w = weight.detach().reshape(-1).float()
    amax = float(w.abs().max()) if w.numel() else 0.0
    w_l4 = float(w.double().pow(4).sum().pow(0.25)) if w.numel() else 0.0
    exponents, ratios = [float(p) for p in exponents], [float(c) for c in scale_ratios]
    if amax == 0.0:
        return GridFit(bits, exponents[0], ratios[-1], 0.0, 0.0, 0.0)
    u = w.abs() / amax  # in units of max|W|; the error is rescaled at the end
    log_u = u.log()  # -inf at 0: rounds to level 0
    k = half_levels(bits)
    per_block = max(1, _CHUNK // max(1, u.numel()))
    errors = torch.empty(len(exponents), len(ratios), dtype=torch.float64, device=u.device)
    for i, p in enumerate(exponents):
        table = (torch.arange(k + 1, dtype=torch.float64) / k).pow(p).float().to(u.device)  # (j / K)^p, j = 0..K
        for start in range(0, len(ratios), per_block):
            c = torch.tensor(ratios[start:start + per_block], dtype=torch.float32, device=u.device)[:, None]
            log_x = (log_u[None, :] - c.log()).clamp_(max=0.0)  # x = min(u / c, 1), in logs
            idx = torch.floor(log_x.div(p).exp_().mul_(k)).clamp_(0, k - 1).long()  # floor(K x^(1/p))
            x = log_x.exp_()
            lo, hi = table[idx], table[idx + 1]
            q = torch.where(x - lo <= hi - x, lo, hi)
            errors[i, start:start + per_block] = (q.mul_(c) - u[None, :]).pow_(4).sum(dim=1, dtype=torch.float64)
    best = int(torch.argmin(errors.reshape(-1)))
    i, j = divmod(best, len(ratios))
    l4 = float(errors[i, j].clamp_min(0.0) ** 0.25) * amax
    return GridFit(bits, exponents[i], ratios[j], ratios[j] * amax, l4, w_l4)


class ParametricWeightQuantizer(PrecomputedWeightQuantizer):
    """The PNMQ grid for one layer, per tensor and symmetric: `exponent` (p) and `scale_ratio` (c, s = c max|W|)
    fixed, or searched (`search_grid`) on `exponents` x `scale_ratios` when either is None."""

    def __init__(self, bits: int, exponent: float | None = None, scale_ratio: float | None = None,
                 exponents=(1.0, 1.5, 2.0), scale_ratios=(0.5, 0.75, 1.0), **kwargs):
        kwargs.update(per_channel=False, symmetric=True)
        super().__init__(bits, **kwargs)
        self.exponent, self.scale_ratio = exponent, scale_ratio  # None: searched
        self.exponents, self.scale_ratios = tuple(exponents), tuple(scale_ratios)
        self.p: float | None = None  # in use (fixed or found)
        self.c: float | None = None
        self.fit: GridFit | None = None  # the search's result, when it ran

    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        self.p, self.c = self.exponent, self.scale_ratio
        if self.p is None or self.c is None:
            exps = self.exponents if self.p is None else (self.p,)
            ratios = self.scale_ratios if self.c is None else (self.c,)
            self.fit = search_grid(weight, self.bits, exps, ratios)
            self.p, self.c = self.fit.exponent, self.fit.scale_ratio
        scale = self.c * float(weight.abs().max()) if weight.numel() else 0.0
        return quantize_to_grid(weight, self.bits, scale, self.p)

    def extra_repr(self) -> str:
        p = "search" if self.p is None else f"{self.p:.3f}"
        c = "search" if self.c is None else f"{self.c:.3f}"
        return f"bits={self.bits}, per_tensor, symmetric, exponent={p}, scale_ratio={c}"
