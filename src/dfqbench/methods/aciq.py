"""ACIQ (Banner et al., NeurIPS 2019, "Post-training 4-bit quantization of convolution networks for
rapid-deployment"): analytical clipping of activations, per-channel bit allocation, weight bias correction.

* Analytical clipping: each activation channel is modelled by a Laplace(mu, b) or Gaussian(mu, sigma) prior; the
  clip alpha minimizing clipping noise + rounding noise of a range [-alpha, alpha] with L levels solves
  d/d alpha [clip_mse(alpha) + alpha^2 / (3 L^2)] = 0 (Laplace: alpha / b = 2.83, 3.89, 5.03 for 2, 3, 4 bits).
* Bit allocation: channel i gets 2^M_i levels proportional to R_i^(2/3) (R_i its range) with the total number of
  levels of the layer kept at C * 2^M (the Lagrangian optimum of sum_i R_i^2 / 4^M_i).
* Bias correction: each output channel of the quantized weight gets the float channel's mean and std back.

Data-free by default: (mu, sigma) come from the BatchNorm statistics feeding each quantized tensor
(quant/transforms/bn_stats.py); `stats=calib` measures them on calibration images instead (the paper's offline statistics).
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn

from ..quant import quantize_model
from ..quant.transforms.bn_fold import fold_batchnorm
from ..quant.transforms.bn_stats import BNStatistics
from ..quant.transforms.graph import is_passthrough, module_of, relu_kind, trace
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from ..quant.quantizers.ranges import Grid, estimate_range, fake_quant, grid_from_range
from ..synth.calib_data import calibration_batches, check_source
from .base import Method

PRIORS = ("laplace", "gaussian")
STATS_SOURCES = ("bn", "calib")
_MAX_LEVELS = 2**16  # a channel never gets more than 16 bits from the bit allocation
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# ---- analytical clipping -------------------------------------------------------------------------------------

def clip_ratio(levels: float, prior: str) -> float:
    """alpha / scale (Laplace b or Gaussian sigma) minimizing the expected clipping + rounding MSE of a zero-mean
    prior quantized on [-alpha, alpha] with `levels` levels (levels = 2^bits; need not be a power of two)."""
    if prior not in PRIORS:
        raise ValueError(f"prior={prior!r} is not valid; choose one of: {', '.join(PRIORS)}")

    def slope(t: float) -> float:  # d MSE / d alpha at unit scale; increasing in t, one root
        rounding = 2.0 * t / (3.0 * levels**2)
        if prior == "laplace":  # clip MSE = 2 b^2 exp(-alpha / b)
            return -2.0 * math.exp(-t) + rounding
        # clip MSE = (alpha^2 + s^2) erfc(alpha / (s sqrt 2)) - sqrt(2/pi) alpha s exp(-alpha^2 / 2 s^2)
        return 2.0 * t * math.erfc(t / math.sqrt(2.0)) - 2.0 * _SQRT_2_OVER_PI * math.exp(-t * t / 2.0) + rounding

    lo, hi = 1e-9, 200.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def clip_ratios(levels: torch.Tensor, prior: str) -> torch.Tensor:
    """clip_ratio for every entry of `levels` (few distinct values: solved once each)."""
    values = {v: clip_ratio(v, prior) for v in levels.flatten().tolist()}
    return torch.tensor([values[v] for v in levels.flatten().tolist()], dtype=torch.float32).reshape(levels.shape)


# ---- per-channel bit allocation ------------------------------------------------------------------------------

def allocate_levels(ranges: torch.Tensor, bits: int) -> torch.Tensor:
    """Levels per channel, 2^M_i = C 2^M R_i^(2/3) / sum_j R_j^(2/3), rounded to integers in [2, 2^16]."""
    weight = ranges.detach().float().clamp_min(0) ** (2.0 / 3.0)
    if float(weight.sum()) <= 0:
        return torch.full_like(weight, float(2**bits))
    levels = ranges.numel() * 2.0**bits * weight / weight.sum()
    return levels.round().clamp(2, _MAX_LEVELS)


def level_grid(lo: torch.Tensor, hi: torch.Tensor, levels: torch.Tensor, symmetric: bool):
    """A per-channel grid where channel c has `levels[c]` integer levels (ranges.grid_from_range when every
    channel has 2^bits). Returns (grid with the widest channel's qmin/qmax, clamp_lo, clamp_hi): clamping each
    channel to [clamp_lo, clamp_hi] first keeps it on its own levels."""
    lo, hi, levels = lo.float(), hi.float(), levels.float().to(lo.device)
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        if bool((lo < 0).any()):
            qmax = (torch.floor(levels / 2) - 1).clamp_min(1)
            qmin = -qmax - 1
        else:
            qmin, qmax = torch.zeros_like(levels), levels - 1
        scale = (amax / qmax).clamp_min(1e-8)
        zero_point = torch.zeros_like(scale)
    else:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        qmin, qmax = torch.zeros_like(levels), levels - 1
        scale = ((hi - lo) / qmax).clamp_min(1e-8)
        zero_point = (-torch.round(lo / scale)).clamp(min=qmin, max=qmax)
    grid = Grid(scale, zero_point.to(torch.int32), int(qmin.min()), int(qmax.max()))
    return grid, (qmin - zero_point) * scale, (qmax - zero_point) * scale


def _clamp_channels(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[axis] = -1
    return torch.maximum(torch.minimum(x, hi.view(shape)), lo.view(shape))


class LevelActQuantizer(ActQuantizer):
    """A per-channel activation quantizer whose channels have their own number of levels (bit allocation)."""

    def __init__(self, base: ActQuantizer, levels: torch.Tensor):
        super().__init__(base.bits, base.symmetric, base.estimator, base.lp, base.percentile, per_channel=True)
        self.register_buffer("levels", levels.detach().float().clone())
        self._level_grid = None

    def set_range(self, lo, hi) -> None:
        super().set_range(lo, hi)
        self._level_grid = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not self.calibrated:
            return x
        if self._level_grid is None or self._level_grid[0].scale.device != x.device:
            self._level_grid = level_grid(self.lo.to(x.device), self.hi.to(x.device), self.levels, self.symmetric)
        grid, clamp_lo, clamp_hi = self._level_grid
        return fake_quant(_clamp_channels(x, clamp_lo, clamp_hi, 1), grid, axis=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mean_bits={float(self.levels.log2().mean()):.3f}"


class ACIQWeightQuantizer(WeightQuantizer):
    """The convention's weight quantizer plus per-channel bit allocation and mean/std bias correction."""

    def __init__(self, base: WeightQuantizer, bit_alloc: bool, correct: bool):
        super().__init__(base.bits, base.per_channel, base.symmetric, base.estimator, base.lp, base.dynamic)
        self.bit_alloc, self.correct = bit_alloc and base.per_channel, correct
        self.levels: torch.Tensor | None = None
        self._clamp: tuple[torch.Tensor, torch.Tensor] | None = None

    def calibrate(self, weight: torch.Tensor) -> None:
        lo, hi = estimate_range(weight, self.estimator, self.bits, self.symmetric, self.per_channel, lp=self.lp)
        if self.bit_alloc:
            self.levels = allocate_levels(hi.clamp(min=0) - lo.clamp(max=0), self.bits)
            self.grid, *self._clamp = level_grid(lo, hi, self.levels, self.symmetric)
        else:
            self.grid, self._clamp = grid_from_range(lo, hi, self.bits, self.symmetric), None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        if self.grid is None or self.dynamic or self.grid.scale.device != weight.device:
            self.calibrate(weight)
        w = _clamp_channels(weight, *self._clamp, 0) if self._clamp else weight
        q = fake_quant(w, self.grid, axis=0 if self.per_channel else None)
        return match_mean_std(q, weight) if self.correct else q

    def extra_repr(self) -> str:
        extra = f", mean_bits={float(self.levels.log2().mean()):.3f}" if self.levels is not None else ""
        return f"{super().extra_repr()}{extra}, bias_correction={self.correct}"


def match_mean_std(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per output channel: (q - mean(q)) * std(w) / std(q) + mean(w) (Banner et al., Sec. 4.3)."""
    dims = tuple(range(1, w.dim()))
    mu, mu_q = w.mean(dim=dims, keepdim=True), q.mean(dim=dims, keepdim=True)
    norm = (w - mu).pow(2).sum(dim=dims, keepdim=True).sqrt()
    norm_q = (q - mu_q).pow(2).sum(dim=dims, keepdim=True).sqrt()
    ratio = torch.where(norm_q > 0, norm / norm_q.clamp_min(1e-12), torch.ones_like(norm))
    return (q - mu_q) * ratio + mu


# ---- activation statistics -----------------------------------------------------------------------------------

def prior_source(gm: fx.GraphModule, node: fx.Node, stats: BNStatistics | None = None):
    """The tensor a quantizer's prior describes and the clip a ReLU/ReLU6 puts on it: (node, floor, ceil)."""
    floor, ceil = -math.inf, math.inf
    while True:
        kind = relu_kind(gm, node)
        if kind:
            floor, ceil = max(floor, 0.0), min(ceil, 6.0) if kind == "relu6" else ceil
        elif not (stats is not None and is_passthrough(gm, node) and stats.stats.get(node) is None):
            return node, floor, ceil
        node = node.args[0]


class ChannelMoments(fx.Interpreter):
    """Per-channel mean, mean absolute deviation and std (dim 1) of every node output over some batches."""

    def __init__(self, gm: fx.GraphModule, batches: list[torch.Tensor]):
        super().__init__(gm)
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.means: dict[str, torch.Tensor] | None = None
        with torch.no_grad():
            for x in batches:  # pass 1: means
                self.run(x)
            self.means = {name: s["sum"] / s["n"] for name, s in self.sums.items()}
            self.sums = {}
            for x in batches:  # pass 2: deviations around the means
                self.run(x)

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() >= 2:
            flat = out.detach().float().transpose(0, 1).reshape(out.shape[1], -1)
            acc = self.sums.setdefault(n.name, {"n": 0})
            if self.means is None:
                acc["sum"] = acc.get("sum", 0) + flat.sum(dim=1)
            else:
                dev = flat - self.means[n.name][:, None]
                acc["abs"] = acc.get("abs", 0) + dev.abs().sum(dim=1)
                acc["sq"] = acc.get("sq", 0) + dev.pow(2).sum(dim=1)
            acc["n"] += flat.shape[1]
        return out

    def of(self, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, mean |x - mean|, std) per channel."""
        s = self.sums[node.name]
        return self.means[node.name], s["abs"] / s["n"], (s["sq"] / s["n"]).sqrt()


# ---- the method ----------------------------------------------------------------------------------------------

class ACIQ(Method):
    def __init__(self, name: str = "aciq", prior: str = "laplace", stats: str = "bn", calib_data: str = "distill",
                 calib_images: int = 32, calib_batch_size: int = 32, bit_alloc_weights: bool = True,
                 bit_alloc_acts: bool = True, bias_correction: bool = True, **kwargs):
        super().__init__(name, **kwargs)
        if prior not in PRIORS:
            raise ValueError(f"method.prior={prior!r} is not valid; choose one of: {', '.join(PRIORS)}")
        if stats not in STATS_SOURCES:
            raise ValueError(f"method.stats={stats!r} is not valid; choose one of: {', '.join(STATS_SOURCES)}")
        self.calib_data = check_source(calib_data)
        for key, value in (("calib_images", calib_images), ("calib_batch_size", calib_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"method.{key}={value!r} must be a positive integer")
        self.prior, self.stats = prior, stats
        self.calib_images, self.calib_batch_size = calib_images, calib_batch_size
        self.bit_alloc_weights, self.bit_alloc_acts = bit_alloc_weights, bit_alloc_acts
        self.bias_correction = bias_correction
        self.stochastic = stats == "calib"  # the calibration images depend on the seed

    def quantize(self, model, ctx):
        batches = None
        if self.stats == "calib":  # before any folding: distillation needs the model's own BatchNorms
            batches = calibration_batches(self.calib_data, model, ctx, self.calib_images, self.calib_batch_size)
        gm = fold_batchnorm(model) if ctx.convention.fold_bn else trace(model)
        moments = ChannelMoments(gm, batches) if batches is not None else None
        qmodel = quantize_model(gm, ctx.convention, ctx.wbit, ctx.abit)
        self._set_activation_ranges(qmodel, moments, ctx)
        self._replace_weight_quantizers(qmodel, ctx)
        ctx.info["aciq_clip_ratio"] = round(clip_ratio(2.0**ctx.abit, self.prior), 4)
        return qmodel

    @torch.no_grad()
    def _set_activation_ranges(self, gm: fx.GraphModule, moments: ChannelMoments | None, ctx) -> None:
        stats = BNStatistics(gm) if moments is None else None
        mean_bits = []
        for node in list(gm.graph.nodes):
            q = module_of(gm, node)
            if not isinstance(q, ActQuantizer) or not q.enabled:
                continue
            src, floor, ceil = prior_source(gm, node.args[0], stats)
            if isinstance(module_of(gm, src), (nn.Sigmoid, nn.Hardsigmoid)):
                q.set_range(0.0, 1.0)
                continue
            if moments is not None:
                mean, mad, std = moments.of(src)
            else:
                g = stats.of(src)
                mean, std = g.mean, g.std
                mad = std * _SQRT_2_OVER_PI  # E|X - mu| of the Gaussian: the paper's estimator of b
            scale = mad if self.prior == "laplace" else std

            def clip(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                alpha = clip_ratios(levels, self.prior).to(mean.device) * scale
                lo = (mean - alpha).clamp(floor, ceil)
                return lo, (mean + alpha).clamp(floor, ceil).maximum(lo)

            lo, hi = clip(torch.full_like(mean, 2.0**q.bits))
            if q.per_channel and self.bit_alloc_acts and mean.numel() > 1:
                levels = allocate_levels(hi - lo, q.bits)
                lo, hi = clip(levels)
                new = LevelActQuantizer(q, levels)
                new.set_range(lo, hi)
                gm.add_submodule(node.target, new)
                mean_bits.append(float(levels.log2().mean()))
            else:
                q.set_range(lo, hi)
        if mean_bits:
            ctx.info["aciq_act_mean_bits"] = round(sum(mean_bits) / len(mean_bits), 4)

    def _replace_weight_quantizers(self, gm: fx.GraphModule, ctx) -> None:
        mean_bits = []
        for layer in gm.modules():
            wq = getattr(layer, "weight_quantizer", None)
            if isinstance(wq, WeightQuantizer) and wq.enabled:
                layer.weight_quantizer = ACIQWeightQuantizer(wq, self.bit_alloc_weights, self.bias_correction)
                if layer.weight_quantizer.bit_alloc:
                    layer.weight_quantizer.calibrate(layer.weight)
                    mean_bits.append(float(layer.weight_quantizer.levels.log2().mean()))
        if mean_bits:
            ctx.info["aciq_weight_mean_bits"] = round(sum(mean_bits) / len(mean_bits), 4)
