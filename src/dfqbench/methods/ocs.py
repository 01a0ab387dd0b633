"""OCS: outlier channel splitting (Zhao et al., ICML 2019, "Improving Neural Network Quantization without
Retraining using Outlier Channel Splitting").

For each layer, the input channel holding the largest |w| is duplicated and both copies are halved (its input
activation would be duplicated too, so the network computes the same function); this repeats, re-splitting
halves when they still hold the maximum, until ceil(expand_ratio * C_in) channels were added. The expanded weight
is then quantized (clip: max | mse | aciq) with a smaller range. Here the expanded layer is simulated: each copy is
quantized on the expanded weight's grid and the copies are summed back into the original input channel, which is
exactly the expanded layer applied to the duplicated input (duplicated activations quantize identically).
"""

from __future__ import annotations

import math

import torch

from ..quant import quantize_model
from ..quant.calibration.calibrate import calibrate_on_batches, set_ranges_from_bn
from ..quant.quantizers import WeightQuantizer
from ..quant.quantizers.ranges import estimate_range, grid_from_range
from ..synth.calib_data import calibration_batches, check_source
from .aciq import clip_ratio
from .base import Method

CLIPS = ("max", "mse", "aciq")
STATS_SOURCES = ("bn", "calib")
MAX_EXPAND_RATIO = 0.5


def split_channels(weight: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split input channels (dim 1) `num_splits` times. Returns (index, factor): column k of the expanded weight
    is weight[:, index[k]] * factor[k]; the first C_in columns are the original channels (halved where split)."""
    w = weight.detach().abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(dim=1)  # max |w| per column
    index = torch.arange(weight.shape[1], device=weight.device)
    factor = torch.ones(weight.shape[1], device=weight.device, dtype=weight.dtype)
    for _ in range(num_splits):
        k = int(torch.argmax(w[index] * factor))
        factor[k] = factor[k] / 2
        index, factor = torch.cat([index, index[k:k + 1]]), torch.cat([factor, factor[k:k + 1]])
    return index, factor


def expand(weight: torch.Tensor, index: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    return weight.index_select(1, index) * factor.view(shape)


def merge(expanded: torch.Tensor, index: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Sum the copies of each input channel: the expanded layer on duplicated inputs, as one layer."""
    out = expanded.new_zeros((expanded.shape[0], in_channels) + tuple(expanded.shape[2:]))
    return out.index_add(1, index, expanded)


def clip_range(w: torch.Tensor, clip: str, bits: int, symmetric: bool, per_channel: bool):
    """(lo, hi) of the weight grid: min/max, the MSE-optimal shrink, or ACIQ's Laplace clip (capped at min/max)."""
    if clip == "mse":
        return estimate_range(w, "mse", bits, symmetric, per_channel, lp=2.0)
    lo, hi = estimate_range(w, "minmax", bits, symmetric, per_channel)
    if clip == "aciq":
        flat = w.detach().reshape(w.shape[0], -1) if per_channel else w.detach().reshape(1, -1)
        center = torch.zeros(flat.shape[0], device=w.device) if symmetric else flat.mean(dim=1)
        alpha = clip_ratio(2.0**bits, "laplace") * (flat - center[:, None]).abs().mean(dim=1)
        if not per_channel:
            center, alpha = center[0], alpha[0]
        lo, hi = torch.maximum(lo, center - alpha), torch.minimum(hi, center + alpha)
    return lo, hi


class OCSWeightQuantizer(WeightQuantizer):
    """The shared weight quantizer on the channel-split weight: `calibrate` splits and sets the clipped grid,
    `quantize_on_grid` rounds the expanded weight and merges it back; `forward` is WeightQuantizer's."""

    def __init__(self, base: WeightQuantizer, expand_ratio: float, clip: str):
        super().__init__(base.bits, base.per_channel, base.symmetric, base.estimator, base.lp, base.dynamic)
        self.expand_ratio, self.clip = expand_ratio, clip
        self.index: torch.Tensor | None = None
        self.factor: torch.Tensor | None = None
        self.splits = 0

    def num_splits(self, in_channels: int) -> int:
        return math.ceil(self.expand_ratio * in_channels - 1e-9)

    def calibrate(self, weight: torch.Tensor) -> None:
        self.index, self.factor = split_channels(weight, self.num_splits(weight.shape[1]))
        self.splits = len(self.index) - weight.shape[1]
        lo, hi = clip_range(expand(weight, self.index, self.factor), self.clip, self.bits, self.symmetric,
                            self.per_channel)
        self.grid = grid_from_range(lo, hi, self.bits, self.symmetric)

    def quantize_on_grid(self, weight: torch.Tensor) -> torch.Tensor:
        """The expanded weight on the shared quantizer's grid, its copies summed back per input channel."""
        return merge(super().quantize_on_grid(expand(weight, self.index, self.factor)), self.index, weight.shape[1])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, expand_ratio={self.expand_ratio}, clip={self.clip}, split={self.splits}"


class OCS(Method):
    def __init__(self, name: str = "ocs", expand_ratio: float = 0.02, clip: str = "max", stats: str = "bn",
                 act_k_std: float = 6.0, calib_data: str = "distill", calib_images: int = 128,
                 calib_batch_size: int = 32, **kwargs):
        super().__init__(name, **kwargs)
        if isinstance(expand_ratio, bool) or not isinstance(expand_ratio, (int, float)) or not (
                0.0 <= expand_ratio <= MAX_EXPAND_RATIO):
            raise ValueError(f"method.expand_ratio={expand_ratio!r} is out of range; use a number in "
                             f"[0, {MAX_EXPAND_RATIO}] (the paper sweeps 0.01 to 0.05; 0 = no splitting)")
        if clip not in CLIPS:
            raise ValueError(f"method.clip={clip!r} is not valid; choose one of: {', '.join(CLIPS)}")
        if stats not in STATS_SOURCES:
            raise ValueError(f"method.stats={stats!r} is not valid; choose one of: {', '.join(STATS_SOURCES)}")
        if isinstance(act_k_std, bool) or not isinstance(act_k_std, (int, float)) or act_k_std <= 0:
            raise ValueError(f"method.act_k_std={act_k_std!r} must be a number > 0")
        self.calib_data = check_source(calib_data)
        for key, value in (("calib_images", calib_images), ("calib_batch_size", calib_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"method.{key}={value!r} must be a positive integer")
        self.expand_ratio, self.clip, self.stats, self.act_k_std = float(expand_ratio), clip, stats, act_k_std
        self.calib_images, self.calib_batch_size = calib_images, calib_batch_size
        self.stochastic = stats == "calib"

    def quantize(self, model, ctx):
        batches = None
        if self.stats == "calib":  # before quantize_model may fold BatchNorm into the model's own layers
            batches = calibration_batches(self.calib_data, model, ctx, self.calib_images, self.calib_batch_size)
        qmodel = quantize_model(model, ctx.convention, ctx.wbit, ctx.abit)
        added, total = 0, 0
        for layer in qmodel.modules():
            wq = getattr(layer, "weight_quantizer", None)
            if isinstance(wq, WeightQuantizer) and wq.enabled:
                layer.weight_quantizer = OCSWeightQuantizer(wq, self.expand_ratio, self.clip)
                layer.weight_quantizer.calibrate(layer.weight)
                added += layer.weight_quantizer.splits
                total += layer.weight.shape[1]
        ctx.info["ocs_channels_added"], ctx.info["ocs_input_channels"] = added, total
        if batches is None:
            set_ranges_from_bn(qmodel, self.act_k_std)
        else:
            calibrate_on_batches(qmodel, batches)
        return qmodel
