"""PowerQuant's non-uniform weight quantizer (Yvinec et al., ICLR 2023).

w -> sign(w) |w|^a, the convention's uniform grid in that domain (granularity, symmetry, range estimator as for
any weight), then back with the power 1/a: the levels crowd near zero, where most weights are, for a < 1; a = 1
is the plain uniform quantizer. The exponent a of each layer minimizes the layer's weight reconstruction error
(sum of squared errors), which the paper shows is locally convex in a: golden-section search on an interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .precomputed import PrecomputedWeightQuantizer

_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0


def signed_power(x: torch.Tensor, a: float) -> torch.Tensor:
    return torch.sign(x) * x.abs().pow(a)


def golden_section(f: Callable[[float], float], lo: float, hi: float, tol: float) -> tuple[float, float]:
    """Minimize f on [lo, hi] (unimodal there) to an interval narrower than tol; the ends are tried too, so
    a minimum on the boundary (e.g. a = 1, uniform quantization) is found exactly. Returns (x, f(x))."""
    a, b = lo, hi
    c, d = b - _INV_PHI * (b - a), a + _INV_PHI * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _INV_PHI * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _INV_PHI * (b - a)
            fd = f(d)
    candidates = [(fc, c), (fd, d), (f(lo), lo), (f(hi), hi)]
    best_f, best_x = min(candidates)
    return best_x, best_f


class PowerWeightQuantizer(PrecomputedWeightQuantizer):
    """`exponent` fixes a; None searches it in `exponent_range` to `tolerance`."""

    def __init__(self, bits: int, exponent: float | None = None, exponent_range: tuple[float, float] = (0.25, 1.0),
                 tolerance: float = 1e-2, **kwargs):
        super().__init__(bits, **kwargs)
        self.exponent, self.exponent_range, self.tolerance = exponent, tuple(exponent_range), tolerance
        self.a: float | None = None  # the exponent in use
        self.error: float | None = None  # its sum of squared weight errors

    def reconstruct(self, weight: torch.Tensor, a: float) -> torch.Tensor:
        t = signed_power(weight, a)
        self.grid = self.make_grid(t)
        return signed_power(self.uniform(t, self.grid), 1.0 / a)

    def reconstruction_error(self, weight: torch.Tensor, a: float) -> float:
        return float((self.reconstruct(weight, a) - weight).pow(2).sum())

    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        if self.exponent is not None:
            self.a = float(self.exponent)
        else:
            self.a, _ = golden_section(lambda a: self.reconstruction_error(weight, a), *self.exponent_range,
                                       self.tolerance)
        out = self.reconstruct(weight, self.a)
        self.error = float((out - weight).pow(2).sum())
        return out

    def extra_repr(self) -> str:
        a = "search" if self.a is None else f"{self.a:.4f}"
        return f"{super().extra_repr()}, exponent={a}"
