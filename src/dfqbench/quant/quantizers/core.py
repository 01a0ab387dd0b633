"""Weight and activation fake-quantizer modules (straight-through gradients via the backend kernels)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .ranges import Grid, estimate_range, fake_quant, grid_from_range

FULL_PRECISION_BITS = 32  # a bit-width of 32 means "leave this tensor in floating point"
_SAMPLES_PER_BATCH = 1 << 18


class WeightQuantizer(nn.Module):
    """Per-channel (dim 0) or per-tensor weight quantizer.

    The grid is computed from the weight the first time it is needed and cached; `dynamic=True` recomputes it on
    every forward (the GDFQ lineage's QAT, where weights change each step). Call `reset()` after editing weights.
    Inside `frozen_weights(model)` (evaluation: the weights do not change) the quantized weight itself is
    computed once and reused for every batch.
    """

    def __init__(self, bits: int, per_channel: bool = True, symmetric: bool = False, estimator: str = "minmax",
                 lp: float = 2.0, dynamic: bool = False, symmetric_grid: str = "auto"):
        super().__init__()
        self.bits, self.per_channel, self.symmetric = bits, per_channel, symmetric
        self.symmetric_grid = symmetric_grid  # kernels.grid.SYMMETRIC_GRIDS
        self.estimator, self.lp, self.dynamic = estimator, lp, dynamic
        self.grid: Grid | None = None
        self.frozen = False  # set by frozen_weights(): quantize the weight once, reuse it
        self._frozen_weight: torch.Tensor | None = None
        self.bypass = False  # set by float_forward(): pass the float weight through

    @property
    def enabled(self) -> bool:
        return self.bits < FULL_PRECISION_BITS

    def reset(self) -> None:
        self.grid, self._frozen_weight = None, None

    def calibrate(self, weight: torch.Tensor) -> None:
        lo, hi = estimate_range(weight, self.estimator, self.bits, self.symmetric, self.per_channel, lp=self.lp)
        self.grid = grid_from_range(lo, hi, self.bits, self.symmetric, self.symmetric_grid)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.bypass:
            return weight
        if self.grid is None or self.dynamic or self.grid.scale.device != weight.device:
            self.calibrate(weight)
        if not self.frozen:
            return self.quantize_on_grid(weight)
        if self._frozen_weight is None:
            self._frozen_weight = self.quantize_on_grid(weight)
        return self._frozen_weight

    def quantize_on_grid(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` fake-quantized on the calibrated grid: the hook for quantizers that transform the weight
        around the rounding (they override this and `calibrate`, and keep `forward`)."""
        return fake_quant(weight, self.grid, axis=0 if self.per_channel else None)

    def extra_repr(self) -> str:
        gran = "per_channel" if self.per_channel else "per_tensor"
        grid = "" if self.symmetric_grid == "auto" else f", grid={self.symmetric_grid}"
        return f"bits={self.bits}, {gran}, symmetric={self.symmetric}, estimator={self.estimator}{grid}"


class ActQuantizer(nn.Module):
    """Activation quantizer with a frozen range, per tensor or per channel (dim 1: one range per channel).

    States: uncalibrated (passes values through), observing (updates the range from each batch and quantizes
    with the range seen so far, as ZeroQ's calibration does), frozen. `set_range` fixes a range directly
    (data-free methods derive it from BatchNorm statistics). A per-channel quantizer holds `lo`/`hi` of shape [C]
    once a per-channel range is set; given a single value it quantizes per tensor. `ste` is the backward:
    "clipped" (zero gradient outside the range) or "identity" (the gradient passes everywhere, as GDFQ's code).
    """

    def __init__(self, bits: int, symmetric: bool = False, estimator: str = "minmax", lp: float = 2.0,
                 percentile: float = 99.99, per_channel: bool = False, ste: str = "clipped",
                 symmetric_grid: str = "auto"):
        super().__init__()
        self.symmetric_grid = symmetric_grid  # kernels.grid.SYMMETRIC_GRIDS
        if ste not in ("clipped", "identity"):
            raise ValueError(f"ste={ste!r} is not valid; choose one of: clipped, identity")
        self.ste = ste
        self.bits, self.symmetric, self.estimator = bits, symmetric, estimator
        self.lp, self.percentile, self.per_channel = lp, percentile, per_channel
        self.observing = False
        self.fixed = False  # fix_range(): a known range (the image's) that calibration leaves alone
        self.bypass = False  # set by float_forward(): observe (when observing) but pass x through unquantized
        self.register_buffer("lo", torch.tensor(float("nan")))
        self.register_buffer("hi", torch.tensor(float("nan")))
        self.grid: Grid | None = None
        self._samples: list[torch.Tensor] = []

    @property
    def enabled(self) -> bool:
        return self.bits < FULL_PRECISION_BITS

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.lo).all()) and bool(torch.isfinite(self.hi).all())

    def fix_range(self, lo, hi) -> None:
        """Set a range that is known, not estimated (the pixels of a normalized image): every later set_range and
        observation leaves it as it is."""
        self.fixed = False
        self.set_range(lo, hi)
        self.fixed = True

    def set_range(self, lo: float | torch.Tensor, hi: float | torch.Tensor) -> None:
        """Per tensor: a per-channel range given here is reduced to its envelope (min of lo, max of hi)."""
        if self.fixed:
            return
        if not self.per_channel:
            lo, hi = torch.as_tensor(lo).min(), torch.as_tensor(hi).max()
            self.lo.fill_(float(lo))
            self.hi.fill_(float(hi))
        else:
            lo, hi = torch.broadcast_tensors(torch.as_tensor(lo, dtype=torch.float32).reshape(-1),
                                             torch.as_tensor(hi, dtype=torch.float32).reshape(-1))
            self.lo = lo.detach().clone().to(self.lo.device)  # replaces the buffer: its shape becomes [C]
            self.hi = hi.detach().clone().to(self.hi.device)
        self.grid = grid_from_range(self.lo, self.hi, self.bits, self.symmetric, self.symmetric_grid)

    def start_observing(self) -> None:
        if self.fixed:
            return
        self.observing, self._samples = True, []
        self.lo.fill_(float("nan"))
        self.hi.fill_(float("nan"))
        self.grid = None

    def stop_observing(self) -> None:
        self.observing, self._samples = False, []

    def _observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.per_channel and x.dim() > 1:
            self._observe_channels(x.transpose(0, 1).reshape(x.shape[1], -1))
            return
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

    def _observe_channels(self, flat: torch.Tensor) -> None:
        """`flat` is [C, samples]: the same estimators, one range per channel."""
        if self.estimator == "minmax":
            lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
            if self.calibrated and self.lo.shape == lo.shape:
                lo, hi = torch.minimum(lo, self.lo), torch.maximum(hi, self.hi)
            self.set_range(lo, hi)
            return
        per_channel = max(1024, _SAMPLES_PER_BATCH // flat.shape[0])
        if flat.shape[1] > per_channel:
            flat = flat[:, torch.randint(flat.shape[1], (per_channel,), device=flat.device)]
        self._samples.append(flat)
        self.set_range(*estimate_range(torch.cat(self._samples, dim=1), self.estimator, self.bits, self.symmetric,
                                       per_channel=True, percentile=self.percentile, lp=self.lp))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("lo", "hi"):  # per-channel ranges change the buffers' shape: follow the stored one
            stored = state_dict.get(prefix + name)
            if stored is not None and stored.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(stored, device=getattr(self, name).device))
        self.grid = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observing:
            self._observe(x)
        if self.bypass:
            return x
        grid = self.current_grid(x.device)
        if grid is None:
            return x
        y = fake_quant(x, grid, axis=1 if self.lo.numel() > 1 else None)
        if self.ste == "identity" and x.requires_grad:
            return x + (y - x).detach()  # forward y, gradient 1 everywhere
        return y

    def current_grid(self, device: torch.device | None = None) -> Grid | None:
        """The grid of the frozen range (on `device`), None while uncalibrated or disabled."""
        if not self.enabled:
            return None
        device = device or self.lo.device
        if self.grid is None or self.grid.scale.device != device:  # the grid is not a buffer: rebuild after .to()
            if not self.calibrated:
                return None
            self.grid = grid_from_range(self.lo.to(device), self.hi.to(device), self.bits, self.symmetric,
                                        self.symmetric_grid)
        return self.grid

    def extra_repr(self) -> str:
        gran = f", per_channel({self.lo.numel()})" if self.per_channel else ""
        ste = "" if self.ste == "clipped" else f", ste={self.ste}"
        return (f"bits={self.bits}, symmetric={self.symmetric}, estimator={self.estimator}{gran}{ste}, "
                f"range=[{float(self.lo.min()):.4g}, {float(self.hi.max()):.4g}]")


@contextlib.contextmanager
def float_forward(model: nn.Module):
    """Inside the block every quantizer of `model` passes its input through unchanged (activation quantizers still
    observe when observing): calibration on the float model's activations, as PSAQ-ViT's code does."""
    quantizers = [m for m in model.modules() if isinstance(m, (WeightQuantizer, ActQuantizer))]
    for q in quantizers:
        q.bypass = True
    try:
        yield model
    finally:
        for q in quantizers:
            q.bypass = False


@contextlib.contextmanager
def frozen_weights(model: nn.Module):
    """Evaluation: every weight quantizer of `model` quantizes its weight once, on first use, and reuses it until
    the block exits (weights must not change inside it; autograd does not see through the reused tensor)."""
    quantizers = [m for m in model.modules() if isinstance(m, WeightQuantizer)]
    for q in quantizers:
        q.frozen, q._frozen_weight = True, None
    try:
        yield model
    finally:
        for q in quantizers:
            q.frozen, q._frozen_weight = False, None
