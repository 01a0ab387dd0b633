"""OCS: outlier channel splitting (Zhao et al., ICML 2019, "Improving Neural Network Quantization without
Retraining using Outlier Channel Splitting").

For each layer, the input channel holding the largest |w| is duplicated and both copies are halved (its input
activation would be duplicated too, so the network computes the same function); this repeats, re-splitting
halves when they still hold the maximum, until ceil(expand_ratio * C_in) channels were added. The expanded weight
is then quantized (clip: max | mse | aciq) with a smaller range. Here the expanded layer is simulated: each copy is
quantized on the expanded weight's grid and the copies are summed back into the original input channel, which is
exactly the expanded layer applied to the duplicated input (duplicated activations quantize identically).

The split is grid-aware by default (`split: quarter`, the official code's ocs_wts(grid_aware=True)): the two halves
of a split value w are w/2 - step/4 and w/2 + step/4 (step = the grid's), so that they round apart and their sum
rounds like w itself; plain halving (`split: half`) rounds both halves the same way and doubles the rounding error
of the split channel. The grid is set from the plain split (its max |w| for clip=max), then the weight is split
again with the shifts, as the official code does.

Under `quant=official_ocs` (the official code's placement, carried in quant.method_settings.ocs) three more
settings apply: `profile: float` (activation ranges from the max |x| of the calibration images through the float
model, not through the quantized one), `act_grid: signed` (every activation quantizer on a signed grid
[-max|x|, max|x|], as the code's RangeLinearQuantWrapper, a bit lost after a ReLU) and `output_quant: dynamic`
(every quantized conv's output quantized at abit on a signed grid set by the batch's own max |y|).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..quant import ActQuantizer, act_quantizers, quantize_model
from ..quant.calibration.calibrate import calibrate_on_batches, forward_with_hooks, set_ranges_from_bn
from ..quant.quantizers import WeightQuantizer
from ..quant.quantizers.ranges import estimate_range, fake_quant, grid_from_range
from ..synth.calib_data import calibration_batches, check_source
from .aciq import clip_ratio
from .base import PresetSettingsMethod
from ..settings import check_int, check_number

CLIPS = ("max", "mse", "aciq")
SPLITS = ("quarter", "half")  # quarter: the official grid-aware split; half: plain halving
PROFILES = ("quantized", "float")
ACT_GRIDS = ("convention", "signed")
OUTPUT_QUANTS = ("none", "dynamic")
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


def split_channels_shifted(weight: torch.Tensor, num_splits: int, step: torch.Tensor | float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grid-aware split (cornell-zhang/dnn-quant-ocs, ocs_wts(grid_aware=True)): a column v splits into
    v/2 - step/4 (in place) and v/2 + step/4 (appended), on its non-zero entries (zeros stay zero in both).
    Returns (index, factor, offset): column k of the expanded weight is weight[:, index[k]] * factor[k] +
    offset[k] * step where the weight is non-zero. The column to split next is the one with the largest max |value|
    of the shifted expanded weight, as in the code. `step` is a scalar (per tensor) or one per output channel."""
    c_in = weight.shape[1]
    index = torch.arange(c_in, device=weight.device)
    factor = torch.ones(c_in, device=weight.device, dtype=weight.dtype)
    offset = torch.zeros(c_in, device=weight.device, dtype=weight.dtype)
    for _ in range(num_splits):
        cols = expand_shifted(weight, index, factor, offset, step)
        k = int(torch.argmax(cols.detach().abs().transpose(0, 1).reshape(len(index), -1).amax(dim=1)))
        f, o = factor[k] / 2, offset[k] / 2
        factor[k], offset[k] = f, o - 0.25
        index = torch.cat([index, index[k:k + 1]])
        factor = torch.cat([factor, f.view(1)])
        offset = torch.cat([offset, (o + 0.25).view(1)])
    return index, factor, offset


def expand(weight: torch.Tensor, index: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    return weight.index_select(1, index) * factor.view(shape)


def expand_shifted(weight: torch.Tensor, index: torch.Tensor, factor: torch.Tensor, offset: torch.Tensor,
                   step: torch.Tensor | float) -> torch.Tensor:
    """expand() plus offset[k] * step on the non-zero entries (step: scalar or one per output channel)."""
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    picked = weight.index_select(1, index)
    step = torch.as_tensor(step, dtype=weight.dtype, device=weight.device)
    step = step.reshape((-1,) + (1,) * (weight.dim() - 1)) if step.numel() > 1 else step.reshape(())
    return picked * factor.view(shape) + (picked != 0).to(weight.dtype) * offset.view(shape) * step


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

    def __init__(self, base: WeightQuantizer, expand_ratio: float, clip: str, split: str = "half"):
        super().__init__(base.bits, base.per_channel, base.symmetric, base.estimator, base.lp, base.dynamic)
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not valid; choose one of: {', '.join(SPLITS)}")
        self.expand_ratio, self.clip, self.split = expand_ratio, clip, split
        self.index: torch.Tensor | None = None
        self.factor: torch.Tensor | None = None
        self.offset: torch.Tensor | None = None  # in grid steps (split=quarter)
        self.splits = 0

    def num_splits(self, in_channels: int) -> int:
        return math.ceil(self.expand_ratio * in_channels - 1e-9)

    def calibrate(self, weight: torch.Tensor) -> None:
        self.index, self.factor = split_channels(weight, self.num_splits(weight.shape[1]))
        self.splits = len(self.index) - weight.shape[1]
        lo, hi = clip_range(expand(weight, self.index, self.factor), self.clip, self.bits, self.symmetric,
                            self.per_channel)
        self.grid = grid_from_range(lo, hi, self.bits, self.symmetric)
        self.offset = None
        if self.split == "quarter" and self.splits:  # split again, shifted by -/+ step/4 on this grid
            self.index, self.factor, self.offset = split_channels_shifted(weight, self.splits, self.grid.scale)

    def expanded(self, weight: torch.Tensor) -> torch.Tensor:
        if self.offset is None:
            return expand(weight, self.index, self.factor)
        return expand_shifted(weight, self.index, self.factor, self.offset, self.grid.scale)

    def quantize_on_grid(self, weight: torch.Tensor) -> torch.Tensor:
        """The expanded weight on the shared quantizer's grid, its copies summed back per input channel."""
        return merge(super().quantize_on_grid(self.expanded(weight)), self.index, weight.shape[1])

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, expand_ratio={self.expand_ratio}, clip={self.clip}, split={self.split}, "
                f"splits={self.splits}")


class DynamicOutputQuant(nn.Module):
    """A layer whose output is fake-quantized at `bits` on a signed symmetric grid set by the batch's own max |y|
    (the OCS code's RangeLinearQuantWrapper.post_quantized_forward: scale (2^(b-1) - 1) / max |y|, clamp to
    [-2^(b-1), 2^(b-1) - 1])."""

    def __init__(self, layer: nn.Module, bits: int):
        super().__init__()
        self.layer, self.bits = layer, bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        amax = y.detach().abs().max()
        grid = grid_from_range(-amax, amax, self.bits, symmetric=True)
        return fake_quant(y, grid)

    def extra_repr(self) -> str:
        return f"output bits={self.bits}, dynamic signed max |y| per batch"


@torch.no_grad()
def profile_float_ranges(qmodel: nn.Module, batches) -> dict:
    """(min, max) of every enabled activation quantizer's input, over `batches`, through the model with float
    weights and no activation quantization (the OCS code's profile mode)."""
    quantizers = [m for m in qmodel.modules() if isinstance(m, ActQuantizer) and m.enabled]
    saved = [(m, m.weight_quantizer) for m in qmodel.modules()
             if isinstance(getattr(m, "weight_quantizer", None), WeightQuantizer)]
    seen: dict = {}

    def hook(module, args):
        x = args[0].detach()
        lo, hi = x.min(), x.max()
        if module in seen:
            lo, hi = torch.minimum(lo, seen[module][0]), torch.maximum(hi, seen[module][1])
        seen[module] = (lo, hi)
        return None

    bits = {q: q.bits for q in quantizers}
    try:
        for m, _ in saved:
            m.weight_quantizer = nn.Identity()
        for q in quantizers:
            q.bits = 32  # pass-through
        forward_with_hooks(qmodel, [q.register_forward_pre_hook(hook) for q in quantizers], batches)
    finally:
        for m, wq in saved:
            m.weight_quantizer = wq
        for q in quantizers:
            q.bits = bits[q]
    return seen


class OCS(PresetSettingsMethod):
    _DEFAULTS = {"expand_ratio": 0.02, "clip": "max", "stats": "bn", "act_k_std": 6.0, "calib_data": "distill",
                 "calib_images": 128, "calib_batch_size": 32, "split": "quarter", "profile": "quantized",
                 "act_grid": "convention", "output_quant": "none"}

    def __init__(self, name: str = "ocs", expand_ratio: float = 0.02, clip: str = "max", stats: str = "bn",
                 act_k_std: float = 6.0, calib_data: str = "distill", calib_images: int = 128,
                 calib_batch_size: int = 32, split: str = "quarter", profile: str = "quantized",
                 act_grid: str = "convention", output_quant: str = "none", **kwargs):
        super().__init__(name, **kwargs)
        self._configure({"expand_ratio": expand_ratio, "clip": clip, "stats": stats, "act_k_std": act_k_std,
                         "calib_data": calib_data, "calib_images": calib_images,
                         "calib_batch_size": calib_batch_size, "split": split, "profile": profile,
                         "act_grid": act_grid, "output_quant": output_quant})

    def _configure(self, st: dict) -> None:
        expand_ratio, clip, stats, act_k_std = st["expand_ratio"], st["clip"], st["stats"], st["act_k_std"]
        if isinstance(expand_ratio, bool) or not isinstance(expand_ratio, (int, float)) or not (
                0.0 <= expand_ratio <= MAX_EXPAND_RATIO):
            raise ValueError(f"method.expand_ratio={expand_ratio!r} is out of range; use a number in "
                             f"[0, {MAX_EXPAND_RATIO}] (the paper sweeps 0.01 to 0.05; 0 = no splitting)")
        for key, choices in (("clip", CLIPS), ("stats", STATS_SOURCES), ("split", SPLITS), ("profile", PROFILES),
                             ("act_grid", ACT_GRIDS), ("output_quant", OUTPUT_QUANTS)):
            if st[key] not in choices:
                raise ValueError(f"method.{key}={st[key]!r} is not valid; choose one of: {', '.join(choices)}")
        check_number("method.act_k_std", act_k_std, strict=True)
        self.calib_data = check_source(st["calib_data"])
        for key in ("calib_images", "calib_batch_size"):
            value = st[key]
            check_int(f"method.{key}", value)
        self._settings = dict(st)
        self.expand_ratio, self.clip, self.stats, self.act_k_std = float(expand_ratio), clip, stats, act_k_std
        self.calib_images, self.calib_batch_size = st["calib_images"], st["calib_batch_size"]
        self.split, self.profile, self.act_grid = st["split"], st["profile"], st["act_grid"]
        self.output_quant = st["output_quant"]
        self.stochastic = stats == "calib"

    def quantize(self, model, ctx):
        self.check_convention(ctx.convention)
        batches = None
        if self.stats == "calib":  # before quantize_model may fold BatchNorm into the model's own layers
            batches = calibration_batches(self.calib_data, model, ctx, self.calib_images, self.calib_batch_size)
        qmodel = quantize_model(model, ctx.convention, ctx.wbit, ctx.abit)
        added, total = 0, 0
        layers = []
        for layer in qmodel.modules():
            wq = getattr(layer, "weight_quantizer", None)
            if isinstance(wq, WeightQuantizer) and wq.enabled:
                layer.weight_quantizer = OCSWeightQuantizer(wq, self.expand_ratio, self.clip, self.split)
                layer.weight_quantizer.calibrate(layer.weight)
                added += layer.weight_quantizer.splits
                total += layer.weight.shape[1]
                layers.append(layer)
        ctx.info["ocs_channels_added"], ctx.info["ocs_input_channels"] = added, total
        ctx.info["ocs_split"] = self.split
        if batches is None:
            set_ranges_from_bn(qmodel, self.act_k_std)
        elif self.profile == "float":
            for q, (lo, hi) in profile_float_ranges(qmodel, batches).items():
                q.set_range(lo, hi)
        else:
            calibrate_on_batches(qmodel, batches)
        if self.act_grid == "signed":  # [-max|x|, max|x|] on a signed grid, after a ReLU too
            for q in act_quantizers(qmodel):
                if q.enabled and q.calibrated:
                    amax = torch.maximum(q.lo.abs(), q.hi.abs())
                    q.set_range(-amax, amax)
        if self.output_quant == "dynamic" and ctx.abit < 32:
            wrapped = _wrap_outputs(qmodel, set(layers), ctx.abit)
            ctx.info["ocs_dynamic_outputs"] = wrapped
        return qmodel


def _wrap_outputs(model: nn.Module, layers: set, bits: int) -> int:
    """Every quantized conv in `layers` -> DynamicOutputQuant(conv) in place (the fx graph calls it by name)."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child in layers and isinstance(child, nn.Conv2d):
                setattr(parent, name, DynamicOutputQuant(child, bits))
                count += 1
    return count
