"""Weight quantizers whose output is computed once from the whole weight tensor.

Some methods do not round each weight on its own: SQuant flips roundings to balance a kernel's error, PowerQuant
quantizes in a searched power domain, REx sums several quantized residual terms. Such a quantizer computes the
fake-quantized weight once (eagerly via `calibrate`, or on the first forward), caches it, and returns it on every
forward with a straight-through gradient. It keeps WeightQuantizer's settings (bits, granularity, symmetry,
range estimator), which the subclasses use for every uniform grid they build.
"""

from __future__ import annotations

import torch

from .core import WeightQuantizer
from .ranges import Grid, estimate_range, fake_quant, grid_from_range


class PrecomputedWeightQuantizer(WeightQuantizer):
    def __init__(self, bits: int, per_channel: bool = True, symmetric: bool = False, estimator: str = "minmax",
                 lp: float = 2.0):
        super().__init__(bits, per_channel=per_channel, symmetric=symmetric, estimator=estimator, lp=lp)
        self.register_buffer("qweight", None, persistent=False)

    @classmethod
    def like(cls, wq: WeightQuantizer, **kwargs) -> "PrecomputedWeightQuantizer":
        """A quantizer with the settings of `wq` (the convention's choice for that layer)."""
        return cls(wq.bits, per_channel=wq.per_channel, symmetric=wq.symmetric, estimator=wq.estimator, lp=wq.lp,
                   **kwargs)

    def make_grid(self, x: torch.Tensor) -> Grid:
        """The convention's uniform grid for `x` (range estimator, granularity, symmetry)."""
        lo, hi = estimate_range(x, self.estimator, self.bits, self.symmetric, self.per_channel, lp=self.lp)
        return grid_from_range(lo, hi, self.bits, self.symmetric)

    def uniform(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        grid = grid if grid is not None else self.make_grid(x)
        return fake_quant(x, grid, axis=0 if self.per_channel else None)

    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        """The fake-quantized weight (float, same shape); may set `self.grid` for inspection."""
        raise NotImplementedError

    def reset(self) -> None:
        super().reset()
        self.qweight = None

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> None:
        self.qweight = self.compute(weight.detach().float()).to(weight.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        if self.qweight is None or self.dynamic or self.qweight.device != weight.device:
            self.calibrate(weight)
        if weight.requires_grad and torch.is_grad_enabled():
            return weight + (self.qweight - weight).detach()  # straight-through
        return self.qweight
