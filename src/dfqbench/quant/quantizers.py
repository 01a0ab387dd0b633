"""Weight and activation fake-quantizer modules (straight-through gradients via the backend kernels)."""

from __future__ import annotations

import torch
from torch import nn

from .ranges import Grid, estimate_range, fake_quant, grid_from_range

FULL_PRECISION_BITS = 32  # a bit-width of 32 means "leave this tensor in floating point"
_SAMPLES_PER_BATCH = 1 << 18


class WeightQuantizer(nn.Module):
    """Per-channel (dim 0) or per-tensor weight quantizer.

    The grid is computed from the weight the first time it is needed and cached; `dynamic=True` recomputes it on
    every forward (the GDFQ lineage's QAT, where weights change each step). Call `reset()` after editing weights.
    """

    def __init__(self, bits: int, per_channel: bool = True, symmetric: bool = False, estimator: str = "minmax",
                 lp: float = 2.0, dynamic: bool = False):
        super().__init__()
        self.bits, self.per_channel, self.symmetric = bits, per_channel, symmetric
        self.estimator, self.lp, self.dynamic = estimator, lp, dynamic
        self.grid: Grid | None = None

    @property
    def enabled(self) -> bool:
        return self.bits < FULL_PRECISION_BITS

    def reset(self) -> None:
        self.grid = None

    def calibrate(self, weight: torch.Tensor) -> None:
        lo, hi = estimate_range(weight, self.estimator, self.bits, self.symmetric, self.per_channel, lp=self.lp)
        self.grid = grid_from_range(lo, hi, self.bits, self.symmetric)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        if self.grid is None or self.dynamic or self.grid.scale.device != weight.device:
            self.calibrate(weight)
        return fake_quant(weight, self.grid, axis=0 if self.per_channel else None)

    def extra_repr(self) -> str:
        gran = "per_channel" if self.per_channel else "per_tensor"
        return f"bits={self.bits}, {gran}, symmetric={self.symmetric}, estimator={self.estimator}"


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer with a frozen range.

    States: uncalibrated (passes values through), observing (updates the range from each batch and quantizes
    with the range seen so far, as ZeroQ's calibration does), frozen. `set_range` fixes a range directly
    (data-free methods derive it from BatchNorm statistics).
    """

    def __init__(self, bits: int, symmetric: bool = False, estimator: str = "minmax", lp: float = 2.0,
                 percentile: float = 99.99):
        super().__init__()
        self.bits, self.symmetric, self.estimator = bits, symmetric, estimator
        self.lp, self.percentile = lp, percentile
        self.observing = False
        self.register_buffer("lo", torch.tensor(float("nan")))
        self.register_buffer("hi", torch.tensor(float("nan")))
        self.grid: Grid | None = None
        self._samples: list[torch.Tensor] = []

    @property
    def enabled(self) -> bool:
        return self.bits < FULL_PRECISION_BITS

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.lo)) and bool(torch.isfinite(self.hi))

    def set_range(self, lo: float | torch.Tensor, hi: float | torch.Tensor) -> None:
        self.lo.fill_(float(lo))
        self.hi.fill_(float(hi))
        self.grid = grid_from_range(self.lo, self.hi, self.bits, self.symmetric)

    def start_observing(self) -> None:
        self.observing, self._samples = True, []
        self.lo.fill_(float("nan"))
        self.hi.fill_(float("nan"))
        self.grid = None

    def stop_observing(self) -> None:
        self.observing, self._samples = False, []

    def _observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.estimator == "minmax":  # running min-of-min / max-of-max over the batches seen
            lo, hi = x.min(), x.max()
            if self.calibrated:
                lo, hi = torch.minimum(lo, self.lo), torch.maximum(hi, self.hi)
            self.set_range(lo, hi)
            return
        flat = x.reshape(-1)
        if flat.numel() > _SAMPLES_PER_BATCH:
            flat = flat[torch.randint(flat.numel(), (_SAMPLES_PER_BATCH,), device=flat.device)]
        self._samples.append(flat)
        self.set_range(*estimate_range(torch.cat(self._samples), self.estimator, self.bits, self.symmetric,
                                       percentile=self.percentile, lp=self.lp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observing:
            self._observe(x)
        if self.grid is None or self.grid.scale.device != x.device:  # the grid is not a buffer: rebuild after .to()
            if not self.calibrated:
                return x
            self.grid = grid_from_range(self.lo.to(x.device), self.hi.to(x.device), self.bits, self.symmetric)
        return fake_quant(x, self.grid)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, symmetric={self.symmetric}, estimator={self.estimator}, "
                f"range=[{float(self.lo):.4g}, {float(self.hi):.4g}]")


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d whose weight goes through a WeightQuantizer; shares the float module's parameters."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer: WeightQuantizer) -> "QuantConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        for name, buf in conv.named_buffers(recurse=False):
            new.register_buffer(name, buf)
        new.weight_quantizer = weight_quantizer
        return new

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(nn.Linear):
    """nn.Linear whose weight goes through a WeightQuantizer; shares the float module's parameters."""

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer: WeightQuantizer) -> "QuantLinear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        for name, buf in linear.named_buffers(recurse=False):
            new.register_buffer(name, buf)
        new.weight_quantizer = weight_quantizer
        return new

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantized_weight(), self.bias)
