"""ACIQ (Banner et al., NeurIPS 2019, "Post-training 4-bit quantization of convolution networks for
rapid-deployment"): analytical clipping of activations, per-channel bit allocation, weight bias correction.

* Analytical clipping: each activation channel is modelled by a Laplace(mu, b) or Gaussian(mu, sigma) prior; the
  clip alpha minimizing clipping noise + rounding noise of a range [-alpha, alpha] with L levels solves
  d/d alpha [clip_mse(alpha) + alpha^2 / (3 L^2)] = 0 (Laplace: alpha / b = 2.83, 3.89, 5.03 for 2, 3, 4 bits).
  After a ReLU (relu_clip=one_sided, the official code's half_range) the range is [0, max(mu, 0) + alpha] with the
  one-sided optimum, the two-sided one of 2L levels (Laplace 6.20 b at 4 bits); relu_clip=two_sided clips
  [mu - alpha, mu + alpha] with the two-sided alpha and lets the ReLU cut it (dfqbench before the parity check).
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
from ..quant.transforms.graph import is_passthrough, layer_nodes, module_of, relu_kind, trace
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from ..quant.quantizers.ranges import Grid, estimate_range, fake_quant, grid_from_range
from ..synth.calib_data import calibration_batches, check_source
from .base import PresetSettingsMethod
from ..settings import check_int

PRIORS = ("laplace", "gaussian")
RELU_CLIPS = ("one_sided", "two_sided")
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


def relu_clip_ratio(levels: float, prior: str) -> float:
    """alpha / scale for a tensor after a ReLU, quantized on [0, alpha] with `levels` levels: that grid has the step
    of [-alpha, alpha] with 2 * levels levels, so the optimum is the two-sided one of twice the levels (Laplace at
    4 bits: 6.20, not 5.03; the official code's alpha_laplace_positive[b] = alpha_laplace[b + 1])."""
    return clip_ratio(2.0 * levels, prior)


def clip_ratios(levels: torch.Tensor, prior: str) -> torch.Tensor:
    """clip_ratio for every entry of `levels` (few distinct values: solved once each)."""
    values = {v: clip_ratio(v, prior) for v in levels.flatten().tolist()}
    return torch.tensor([values[v] for v in levels.flatten().tolist()], dtype=torch.float32).reshape(levels.shape)


def clip_range(mean: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor, prior: str, floor: float = -math.inf,
               ceil: float = math.inf, one_sided: bool = False, low: torch.Tensor | None = None):
    """The (lo, hi) of a tensor with prior (mean, scale) quantized with `levels` levels.

    one_sided (a tensor after a ReLU, floor 0): [floor, max(mean, floor) + relu_clip_ratio * scale]. Otherwise
    alpha = clip_ratio * scale and [mean - alpha, mean + alpha], or, given `low` (the official code's offset),
    [max(low, mean - alpha), that + 2 alpha]; both cut to [floor, ceil]."""
    if one_sided:
        alpha = clip_ratios(2.0 * levels, prior).to(mean.device) * scale
        hi = (mean.clamp_min(floor) + alpha).clamp(max=ceil)
        return torch.full_like(hi, floor), hi
    alpha = clip_ratios(levels, prior).to(mean.device) * scale
    if low is not None:
        lo = torch.maximum(low, mean - alpha)
        return lo.clamp(floor, ceil), (lo + 2 * alpha).clamp(floor, ceil)
    lo = (mean - alpha).clamp(floor, ceil)
    return lo, (mean + alpha).clamp(floor, ceil).maximum(lo)


# ---- per-channel bit allocation ------------------------------------------------------------------------------

def allocate_levels(ranges: torch.Tensor, bits: int) -> torch.Tensor:
    """Levels per channel, 2^M_i = C 2^M R_i^(2/3) / sum_j R_j^(2/3), rounded to integers in [2, 2^16]."""
    weight = ranges.detach().float().clamp_min(0) ** (2.0 / 3.0)
    if float(weight.sum()) <= 0:
        return torch.full_like(weight, float(2**bits))
    levels = ranges.numel() * 2.0**bits * weight / weight.sum()
    return levels.round().clamp(2, _MAX_LEVELS)


def allocate_bits(std: torch.Tensor, bits: int, max_bits: int = 8, rounds: int = 10) -> torch.Tensor:
    """Whole bits per channel (the official code's get_bits_alloc_fixed_target): M_i = round(log2(C 2^T s_i^(2/3) /
    sum_j s_j^(2/3))) clipped to [0, max_bits], with the target T moved (up to `rounds` times) until the mean of the
    M_i is `bits` within 0.005. Returns levels 2^M_i (1 level: a 0-bit channel, a constant)."""
    p = std.detach().float().clamp_min(0) ** (2.0 / 3.0)
    if float(p.sum()) <= 0:
        return torch.full_like(p, float(2**bits))
    target, delta, alloc = float(bits), 1.0, None
    for _ in range(rounds):
        if abs(2 * delta) <= 0.01:
            break
        share = p.numel() * 2.0**target * p / p.sum()
        alloc = torch.round(torch.log2(share)).clamp(0, max_bits)
        delta = (bits - float(alloc.mean())) / 2
        target += delta
    return 2.0**alloc


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
        scale = ((hi - lo) / qmax.clamp_min(1)).clamp_min(1e-8)  # one level (qmax 0): see _one_level
        zero_point = (-torch.round(lo / scale)).clamp(min=qmin, max=qmax)
    grid = Grid(scale, zero_point.to(torch.int32), int(qmin.min()), int(qmax.max()))
    return grid, (qmin - zero_point) * scale, (qmax - zero_point) * scale


def _one_level(q: torch.Tensor, levels: torch.Tensor | None, value: torch.Tensor, axis: int) -> torch.Tensor:
    """Channels with a single level (0 bits) output a constant: `value` (the low end of their range, as the
    official code's grid with qmax = 0 gives)."""
    if levels is None or not bool((levels < 2).any()):
        return q
    shape = [1] * q.dim()
    shape[axis] = -1
    mask = (levels.to(q.device) < 2).view(shape)
    return torch.where(mask, value.to(q.device, q.dtype).view(shape).expand_as(q), q)


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
        q = fake_quant(_clamp_channels(x, clamp_lo, clamp_hi, 1), grid, axis=1)
        return _one_level(q, self.levels, self.lo, 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mean_bits={float(self.levels.log2().mean()):.3f}"


class ACIQWeightQuantizer(WeightQuantizer):
    """The convention's weight quantizer plus per-channel bit allocation and mean/std bias correction."""

    def __init__(self, base: WeightQuantizer, bit_alloc: bool, correct: bool, alloc_mode: str = "levels_by_range",
                 correct_std: bool = True):
        super().__init__(base.bits, base.per_channel, base.symmetric, base.estimator, base.lp, base.dynamic)
        self.bit_alloc, self.correct = bit_alloc and base.per_channel, correct
        if alloc_mode == "bits_by_std" and self.bits > 4:  # the official code allocates at <= 4 bits only
            self.bit_alloc = False
        self.alloc_mode, self.correct_std = alloc_mode, correct_std
        self.levels: torch.Tensor | None = None
        self._clamp: tuple[torch.Tensor, torch.Tensor] | None = None

    def calibrate(self, weight: torch.Tensor) -> None:
        lo, hi = estimate_range(weight, self.estimator, self.bits, self.symmetric, self.per_channel, lp=self.lp)
        if self.bit_alloc:
            if self.alloc_mode == "bits_by_std":
                self.levels = allocate_bits(weight.detach().float().reshape(weight.shape[0], -1).std(dim=1), self.bits)
            else:
                self.levels = allocate_levels(hi.clamp(min=0) - lo.clamp(max=0), self.bits)
            self.grid, *self._clamp = level_grid(lo, hi, self.levels, self.symmetric)
            self._low = lo.detach().float()
        else:
            self.grid, self._clamp = grid_from_range(lo, hi, self.bits, self.symmetric), None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        if self.grid is None or self.dynamic or self.grid.scale.device != weight.device:
            self.calibrate(weight)
        w = _clamp_channels(weight, *self._clamp, 0) if self._clamp else weight
        q = fake_quant(w, self.grid, axis=0 if self.per_channel else None)
        if self._clamp:
            q = _one_level(q, self.levels, self._low, 0)
        if not self.correct:
            return q
        return match_mean_std(q, weight) if self.correct_std else match_mean(q, weight)

    def extra_repr(self) -> str:
        extra = f", mean_bits={float(self.levels.log2().mean()):.3f}" if self.levels is not None else ""
        return f"{super().extra_repr()}{extra}, bias_correction={self.correct}"


def match_mean(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per output channel: q - mean(q) + mean(w) (the official code's -bcw: the mean only)."""
    dims = tuple(range(1, w.dim()))
    return q - q.mean(dim=dims, keepdim=True) + w.mean(dim=dims, keepdim=True)


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


_IMAGE_STATS = ("mean", "mad", "std", "min", "max")


class ImageMoments(fx.Interpreter):
    """Statistics of every node output taken on each image alone, then averaged over the images (the official
    code's offline statistics: collected at batch 1, summarised by their mean): per channel (dim 1) and over the
    whole tensor, each of mean, mean |x - mean|, std (unbiased), min and max; and the whole tensor's extremes over
    all images (`extremes`: the code's force_global_min_max, kept for a 1000-way classifier's logits)."""

    def __init__(self, gm: fx.GraphModule, batches: list[torch.Tensor]):
        super().__init__(gm)
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.counts: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.lowest: dict[str, torch.Tensor] = {}
        self.highest: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for x in batches:
                self.run(x)

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() >= 2:
            x = out.detach().float()
            self.shapes[n.name] = tuple(x.shape[1:])
            acc = self.sums.setdefault(n.name, {})
            for prefix, flat in (("c_", x.reshape(x.shape[0], x.shape[1], -1)), ("t_", x.reshape(x.shape[0], 1, -1))):
                mean = flat.mean(-1)
                stats = {"mean": mean, "mad": (flat - mean[..., None]).abs().mean(-1),
                         "std": flat.std(-1) if flat.shape[-1] > 1 else torch.zeros_like(mean),
                         "min": flat.amin(-1), "max": flat.amax(-1)}
                for key, value in stats.items():
                    acc[prefix + key] = acc.get(prefix + key, 0) + value.sum(0)
            self.counts[n.name] = self.counts.get(n.name, 0) + x.shape[0]
            low, high = x.amin(), x.amax()
            self.lowest[n.name] = torch.minimum(self.lowest.get(n.name, low), low)
            self.highest[n.name] = torch.maximum(self.highest.get(n.name, high), high)
        return out

    def spatial(self, node: fx.Node) -> bool:
        """Whether the tensor has a spatial extent (> 1 element per channel and image)."""
        return math.prod(self.shapes[node.name][1:]) > 1

    def of(self, node: fx.Node, per_channel: bool = True) -> dict[str, torch.Tensor]:
        prefix, n = ("c_" if per_channel else "t_"), self.counts[node.name]
        return {key: self.sums[node.name][prefix + key] / n for key in _IMAGE_STATS}

    def extremes(self, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor]:
        """The lowest and highest value of the tensor over every calibration image."""
        return self.lowest[node.name], self.highest[node.name]


# ---- the method ----------------------------------------------------------------------------------------------

BIT_ALLOCS = ("levels_by_range", "bits_by_std")
WEIGHT_CORRECTIONS = ("mean_std", "mean")
CALIB_STATS = ("pooled", "per_image")
SIGNED_RANGES = ("centred", "min_anchored")
# the first layer's output quantizer (layer_outputs): aciq, as any other; mean_minmax, per tensor from the mean over
# the images of each image's min and max, unclipped (the code's "ignored" conv0_activation, with calib_stats=per_image)
FIRST_OUTPUT_RANGES = ("aciq", "mean_minmax")
# the last layer's output quantizer (the logits, sites=layer_outputs): aciq, as any other; global_minmax, per tensor
# from the lowest and highest logit over the calibration images, unclipped (the code's activation_classifier, which
# it uses for a 1000-way classifier; needs calib_stats=per_image)
LAST_OUTPUT_RANGES = ("aciq", "global_minmax")


def _followed_by_relu(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'relu' / 'relu6' when every reader of `node` is that kind of ReLU (a quantizer right before a ReLU)."""
    kinds = {relu_kind(gm, u) for u in node.users}
    return kinds.pop() if len(kinds) == 1 and None not in kinds else None


class ACIQ(PresetSettingsMethod):
    def __init__(self, name: str = "aciq", prior: str = "laplace", stats: str = "bn", calib_data: str = "distill",
                 calib_images: int = 32, calib_batch_size: int = 32, bit_alloc_weights: bool = True,
                 bit_alloc_acts: bool = True, bias_correction: bool = True, relu_clip: str = "one_sided",
                 bit_alloc: str = "levels_by_range", weight_correction: str = "mean_std", calib_stats: str = "pooled",
                 signed_range: str = "centred", first_output_range: str = "aciq", last_output_range: str = "aciq",
                 **kwargs):
        super().__init__(name, **kwargs)
        self._settings = dict(prior=prior, stats=stats, calib_data=calib_data, calib_images=calib_images,
                              calib_batch_size=calib_batch_size, bit_alloc_weights=bit_alloc_weights,
                              bit_alloc_acts=bit_alloc_acts, bias_correction=bias_correction, relu_clip=relu_clip,
                              bit_alloc=bit_alloc, weight_correction=weight_correction, calib_stats=calib_stats,
                              signed_range=signed_range, first_output_range=first_output_range,
                              last_output_range=last_output_range)
        self._configure(self._settings)

    def _configure(self, st: dict) -> None:
        for key, value, choices in (("prior", st["prior"], PRIORS), ("stats", st["stats"], STATS_SOURCES),
                                    ("relu_clip", st["relu_clip"], RELU_CLIPS),
                                    ("bit_alloc", st["bit_alloc"], BIT_ALLOCS),
                                    ("weight_correction", st["weight_correction"], WEIGHT_CORRECTIONS),
                                    ("calib_stats", st["calib_stats"], CALIB_STATS),
                                    ("signed_range", st["signed_range"], SIGNED_RANGES),
                                    ("first_output_range", st["first_output_range"], FIRST_OUTPUT_RANGES),
                                    ("last_output_range", st["last_output_range"], LAST_OUTPUT_RANGES)):
            if value not in choices:
                raise ValueError(f"method.{key}={value!r} is not valid; choose one of: {', '.join(choices)}")
        self.calib_data = check_source(st["calib_data"])
        for key in ("calib_images", "calib_batch_size"):
            value = st[key]
            check_int(f"method.{key}", value)
        self.prior, self.stats, self.relu_clip = st["prior"], st["stats"], st["relu_clip"]
        self.calib_images, self.calib_batch_size = st["calib_images"], st["calib_batch_size"]
        self.bit_alloc_weights, self.bit_alloc_acts = st["bit_alloc_weights"], st["bit_alloc_acts"]
        self.bias_correction, self.bit_alloc = st["bias_correction"], st["bit_alloc"]
        self.weight_correction, self.calib_stats = st["weight_correction"], st["calib_stats"]
        self.signed_range, self.first_output_range = st["signed_range"], st["first_output_range"]
        self.last_output_range = st["last_output_range"]
        if self.last_output_range == "global_minmax" and (st["stats"], st["calib_stats"]) != ("calib", "per_image"):
            raise ValueError(f"method.last_output_range=global_minmax needs method.stats=calib and "
                             f"method.calib_stats=per_image, not {st['stats']} / {st['calib_stats']}")
        self.stochastic = self.stats == "calib"  # the calibration images depend on the seed

    def quantize(self, model, ctx):
        self.check_convention(ctx.convention)
        batches = None
        if self.stats == "calib":  # before any folding: distillation needs the model's own BatchNorms
            batches = calibration_batches(self.calib_data, model, ctx, self.calib_images, self.calib_batch_size)
        gm = fold_batchnorm(model, ctx.convention.fold_scope) if ctx.convention.fold_bn else trace(model)
        moments = None
        if batches is not None:
            moments = ImageMoments(gm, batches) if self.calib_stats == "per_image" else ChannelMoments(gm, batches)
        qmodel = quantize_model(gm, ctx.convention, ctx.wbit, ctx.abit)
        self._set_activation_ranges(qmodel, moments, ctx)
        self._replace_weight_quantizers(qmodel, ctx)
        ctx.info["aciq_clip_ratio"] = round(clip_ratio(2.0**ctx.abit, self.prior), 4)
        if self.relu_clip == "one_sided":
            ctx.info["aciq_relu_clip_ratio"] = round(relu_clip_ratio(2.0**ctx.abit, self.prior), 4)
        return qmodel

    def _scale(self, mad: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        return mad if self.prior == "laplace" else std

    @torch.no_grad()
    def _set_activation_ranges(self, gm: fx.GraphModule, moments, ctx) -> None:
        stats = BNStatistics(gm) if moments is None else None
        layers = layer_nodes(gm)
        first = layers[0] if self.first_output_range == "mean_minmax" else None
        last = layers[-1] if self.last_output_range == "global_minmax" else None
        mean_bits = []
        for node in list(gm.graph.nodes):
            q = module_of(gm, node)
            if not isinstance(q, ActQuantizer) or not q.enabled:
                continue
            src, floor, ceil = prior_source(gm, node.args[0], stats)
            if floor == -math.inf:  # a quantizer right before a ReLU sees what the ReLU will cut (layer_outputs)
                kind = _followed_by_relu(gm, node)
                if kind:
                    floor, ceil = 0.0, (6.0 if kind == "relu6" else math.inf)
            if isinstance(module_of(gm, src), (nn.Sigmoid, nn.Hardsigmoid)):
                q.set_range(0.0, 1.0)
                continue
            if node.args[0] is first and isinstance(moments, ImageMoments):
                m = moments.of(src, per_channel=False)
                q.per_channel = False  # before a ReLU the code's half_range puts the low end at 0
                q.set_range(torch.zeros_like(m["min"]) if _followed_by_relu(gm, node) else m["min"], m["max"])
                continue
            if node.args[0] is last and isinstance(moments, ImageMoments):
                q.per_channel = False  # the code's classifier quantizer: no half_range, no clip
                q.set_range(*moments.extremes(src))
                continue
            low = None  # the per-image minimum (min_anchored signed ranges)
            per_channel = q.per_channel
            if isinstance(moments, ImageMoments):
                # per channel only where the tensor has a spatial extent (the official code's pcq_a rule)
                per_channel = per_channel and moments.spatial(src)
                m = moments.of(src, per_channel)
                mean, mad, std, low = m["mean"], m["mad"], m["std"], m["min"]
            elif moments is not None:
                mean, mad, std = moments.of(src)
            else:
                g = stats.of(src)
                mean, std = g.mean, g.std
                mad = std * _SQRT_2_OVER_PI  # E|X - mu| of the Gaussian: the paper's estimator of b
            scale = self._scale(mad, std)
            one_sided = self.relu_clip == "one_sided" and floor >= 0  # after a ReLU: [0, max(mu, 0) + alpha]
            low = low if self.signed_range == "min_anchored" else None

            def clip(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return clip_range(mean, scale, levels, self.prior, floor, ceil, one_sided, low)

            lo, hi = clip(torch.full_like(mean, 2.0**q.bits))
            allocate = per_channel and self.bit_alloc_acts and mean.numel() > 1
            if allocate and self.bit_alloc == "bits_by_std":
                allocate = q.bits <= 4  # the official code allocates at <= 4 bits only
            if allocate:
                if self.bit_alloc == "bits_by_std":
                    levels = allocate_bits(std, q.bits)  # the official default prior of the allocation: std
                else:
                    levels = allocate_levels(hi - lo, q.bits)
                lo, hi = clip(levels)
                new = LevelActQuantizer(q, levels)
                new.set_range(lo, hi)
                gm.add_submodule(node.target, new)
                mean_bits.append(float(levels.log2().mean()))
            elif per_channel or mean.numel() == 1:
                q.set_range(lo, hi)
            else:  # a per-channel quantizer on a tensor without spatial extent: one range (official pcq_a rule)
                q.per_channel = False
                q.set_range(lo, hi)
        if mean_bits:
            ctx.info["aciq_act_mean_bits"] = round(sum(mean_bits) / len(mean_bits), 4)

    def _replace_weight_quantizers(self, gm: fx.GraphModule, ctx) -> None:
        mean_bits = []
        for layer in gm.modules():
            wq = getattr(layer, "weight_quantizer", None)
            if isinstance(wq, WeightQuantizer) and wq.enabled:
                layer.weight_quantizer = ACIQWeightQuantizer(wq, self.bit_alloc_weights, self.bias_correction,
                                                             self.bit_alloc, self.weight_correction == "mean_std")
                if layer.weight_quantizer.bit_alloc:
                    layer.weight_quantizer.calibrate(layer.weight)
                    mean_bits.append(float(layer.weight_quantizer.levels.log2().mean()))
        if mean_bits:
            ctx.info["aciq_weight_mean_bits"] = round(sum(mean_bits) / len(mean_bits), 4)
