"""PNMQ (Chikin & Antiukh, CVPR 2022, "Data-Free Network Compression via Parametric Non-Uniform Mixed Precision
Quantization"; no public code): weight-only, data-free, no retraining, to a user-set compression ratio.

A reconstruction from the abstract and a summary (fidelity `reconstruction`; the choices are listed under
`source.inferred` in conf/method/pnmq.yaml):

1. ReLU6 -> ReLU, BatchNorm folding, cross-layer equalization (DFQ's transforms; data-free).
2. Per layer and candidate bit-width b: the symmetric per-tensor grid q_k = s sign(k) (|k|/K)^p (K = 2^(b-1) - 1,
   p in [1, 2]; dfqbench.quant.quantizers.parametric) with (s, p) found by brute force minimizing the L4 norm of the
   weight error.
3. Bit allocation (`allocate_bits`): every layer starts at its largest candidate; greedily lower the layer (to any
   smaller candidate) whose loss increase per weight bit saved is smallest until the weights fit the budget
   32 N / compression_ratio bits, then raise layers back (largest loss decrease per added bit first) while the
   budget allows. A layer's loss is `allocation_loss`: relative = (||W - Q(W)||_4 / ||W||_4)^2, a per-layer
   noise-to-signal ratio, so the sum over layers estimates the output's (independent noise), or absolute =
   ||W - Q(W)||_4^4, the whole model's weight error in L4.
4. The convention's first/last-layer bit-widths (quant.layers.first_wbit / last_wbit) are kept: such a layer is not
   allocated, gets the grid at that bit-width (32: float) and counts at it in the ratio.
5. Data-free bias correction (DFQ's, from the BatchNorm statistics). Activations: float at abit=32 (the paper:
   weight-only); below 32, uniform with ranges mean +- k_std std of the BatchNorm statistics (as DFQ; our addition).

The ratio counts conv/linear weights only (biases and the per-layer (s, p) are not counted): 32 N / sum_l b_l n_l.
`wbit` (the run's, through the yaml's ${wbit}) caps the candidates: a layer gets at most wbit bits.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..errors import ConfigError
from ..quant import quantize_model
from ..quant.calibration.calibrate import set_ranges_from_bn
from ..quant.convention import check_bits
from ..quant.quantizers import FULL_PRECISION_BITS
from ..quant.quantizers.parametric import ParametricWeightQuantizer, search_grid
from ..quant.transforms.bias_correction import correct_bias
from ..quant.transforms.graph import layer_nodes, module_of
from ..quant.transforms.precondition import precondition
from .base import Method

ALLOCATION_LOSSES = ("relative", "absolute")
MAX_CANDIDATE_BITS = 16


def _number(key: str, value, rule: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"method.{key}={value!r} is not valid; use a number {rule}")
    return float(value)


def _pair(key: str, value, rule: str, ok) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
        if isinstance(value, (str, bytes)) or any(isinstance(v, bool) for v in value):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"method.{key}={value!r} must be two numbers [lo, hi] with {rule}") from None
    if not ok(lo, hi):
        raise ValueError(f"method.{key}={list(value)!r} must satisfy {rule}")
    return lo, hi


def _steps(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"method.{key}={value!r} must be an integer >= 2 (grid points, the range's ends included)")
    return value


def check_candidate_bits(value) -> list[int]:
    valid = (f"use a non-empty list of integer bit-widths from 2 to {MAX_CANDIDATE_BITS}, e.g. [2, 3, 4, 5, 6, 8]")
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"method.candidate_bits={value!r} is not valid; {valid}")
    bits = list(value)
    if not bits or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= MAX_CANDIDATE_BITS
                       for b in bits):
        raise ValueError(f"method.candidate_bits={bits!r} is not valid; {valid}")
    return sorted(set(bits))


def allocate_bits(sizes: list[int], losses: list[dict[int, float]], budget: float) -> list[int]:
    """Bits per layer with sum(size * bits) <= budget and a small total loss (greedy, see the module's docstring).

    sizes[i]: layer i's weight count; losses[i]: {bits: loss} over its candidates (smaller is better). Raises
    ValueError when even the smallest candidates exceed the budget."""
    options = [sorted(table) for table in losses]
    if sum(n * opts[0] for n, opts in zip(sizes, options)) > budget:
        raise ValueError(f"budget {budget:g} bits is below what the smallest candidates need")
    bits = [opts[-1] for opts in options]
    total = sum(n * b for n, b in zip(sizes, bits))
    while total > budget:  # lower: the smallest loss increase per bit saved
        best = None
        for i, (n, opts) in enumerate(zip(sizes, options)):
            for b in opts:
                if b >= bits[i] or n == 0:
                    continue
                key = (losses[i][b] - losses[i][bits[i]]) / (n * (bits[i] - b))
                if best is None or key < best[0]:
                    best = (key, i, b)
        _, i, b = best
        total -= sizes[i] * (bits[i] - b)
        bits[i] = b
    while True:  # raise back while the budget allows: the largest loss decrease per bit added
        best = None
        for i, (n, opts) in enumerate(zip(sizes, options)):
            for b in opts:
                if b <= bits[i] or n == 0 or total + n * (b - bits[i]) > budget:
                    continue
                gain = losses[i][bits[i]] - losses[i][b]
                key = gain / (n * (b - bits[i]))
                if gain > 0 and (best is None or key > best[0]):
                    best = (key, i, b)
        if best is None:
            return bits
        _, i, b = best
        total += sizes[i] * (b - bits[i])
        bits[i] = b


class PNMQ(Method):
    def __init__(self, name: str = "pnmq", compression_ratio: float = 8.0,
                 candidate_bits: list[int] | tuple[int, ...] = (2, 3, 4, 5, 6, 8), wbit: int | None = None,
                 exponent: float | None = None, exponent_range=(1.0, 2.0), exponent_steps: int = 11,
                 scale_range=(0.2, 1.0), scale_steps: int = 41, allocation_loss: str = "relative",
                 equalize: bool = True, correct_bias: bool = True, relu6_to_relu: bool = True,
                 equalize_iterations: int = 100, equalize_tol: float = 2e-7, k_std: float = 6.0, **kwargs):
        super().__init__(name, **kwargs)
        self.compression_ratio = _number("compression_ratio", compression_ratio, "> 1")
        if not self.compression_ratio > 1:
            raise ValueError(f"method.compression_ratio={compression_ratio!r} is not valid; use a number > 1 (FP32 "
                             f"weight size over the quantized one: 8 = 4 bits on average)")
        bits = check_candidate_bits(candidate_bits)
        if wbit is not None:
            check_bits("wbit", wbit)
            usable = [b for b in bits if b <= wbit]
            if not usable:
                raise ValueError(f"method.candidate_bits={bits!r} has no bit-width <= wbit={wbit} (the largest a "
                                 f"layer may get); use wbit >= {bits[0]}")
            bits = usable
        self.candidate_bits, self.wbit = bits, wbit
        lo_cr, hi_cr = 32 / bits[-1], 32 / bits[0]
        if not lo_cr <= self.compression_ratio <= hi_cr:
            raise ValueError(f"method.compression_ratio={compression_ratio!r} is unreachable with candidate_bits "
                             f"{bits!r} (wbit caps them): choose a ratio in [{lo_cr:.4g}, {hi_cr:.4g}] (32 / the "
                             f"largest bits .. 32 / the smallest)")
        if exponent is not None:
            p = _number("exponent", exponent, "in [1, 2]")
            if not 1.0 <= p <= 2.0:
                raise ValueError(f"method.exponent={exponent!r} is not valid; use null (search) or a number in "
                                 f"[1, 2] (1 = uniform)")
            self.exponents = [p]
        else:
            lo, hi = _pair("exponent_range", exponent_range, "1 <= lo < hi <= 2 (p = 1: uniform)",
                           lambda a, b: 1.0 <= a < b <= 2.0)
            self.exponents = torch.linspace(lo, hi, _steps("exponent_steps", exponent_steps),
                                            dtype=torch.float64).tolist()
        self.exponent = exponent
        lo, hi = _pair("scale_range", scale_range, "0 < lo < hi <= 1 (s = c max|W|)", lambda a, b: 0.0 < a < b <= 1.0)
        self.scale_ratios = torch.linspace(lo, hi, _steps("scale_steps", scale_steps), dtype=torch.float64).tolist()
        if allocation_loss not in ALLOCATION_LOSSES:
            raise ValueError(f"method.allocation_loss={allocation_loss!r} is not valid; choose one of: "
                             f"{', '.join(ALLOCATION_LOSSES)}")
        self.allocation_loss = allocation_loss
        if _number("k_std", k_std, "> 0") <= 0:
            raise ValueError(f"method.k_std={k_std!r} must be > 0")
        self.do_equalize, self.do_correct, self.relu6_to_relu = equalize, correct_bias, relu6_to_relu
        self.equalize_iterations, self.equalize_tol, self.k_std = equalize_iterations, equalize_tol, float(k_std)

    def _loss(self, fit) -> float:
        if self.allocation_loss == "absolute":
            return fit.l4 ** 4
        return (fit.l4 / fit.weight_l4) ** 2 if fit.weight_l4 > 0 else 0.0

    def quantize(self, model, ctx):
        wbit = self.wbit if self.wbit is not None else ctx.wbit
        candidates = [b for b in self.candidate_bits if b <= wbit]
        if not candidates:
            raise ConfigError(f"method.candidate_bits={self.candidate_bits!r} has no bit-width <= wbit={wbit}")
        pre = precondition(model, self.relu6_to_relu, self.do_equalize, self.equalize_iterations, self.equalize_tol)
        if pre.equalize_iterations is not None:
            ctx.info["pnmq_equalize_iterations"] = pre.equalize_iterations
        qmodel = quantize_model(pre.gm, ctx.convention, wbit, ctx.abit)

        nodes = layer_nodes(qmodel)
        spec = ctx.convention.layers
        fixed: dict[str, int] = {}  # the convention's first/last-layer bit-widths
        if nodes and spec.first_wbit:
            fixed[nodes[0].target] = spec.first_wbit
        if nodes and spec.last_wbit:
            fixed[nodes[-1].target] = spec.last_wbit
        layers = {n.target: module_of(qmodel, n) for n in nodes}
        sizes = {name: layer.weight.numel() for name, layer in layers.items()}

        fits: dict[str, dict[int, object]] = {}
        with torch.no_grad():
            for name, layer in layers.items():
                w = layer.weight.detach().float()
                options = [fixed[name]] if name in fixed else candidates
                fits[name] = {b: search_grid(w, b, self.exponents, self.scale_ratios)
                              for b in options if b < FULL_PRECISION_BITS}

        total_params = sum(sizes.values())
        budget = 32.0 * total_params / self.compression_ratio
        fixed_bits = sum(sizes[name] * b for name, b in fixed.items())
        free = [name for name in layers if name not in fixed]
        try:
            chosen = allocate_bits([sizes[n] for n in free],
                                   [{b: self._loss(f) for b, f in fits[n].items()} for n in free],
                                   budget - fixed_bits)
        except ValueError:
            floor = 32.0 * total_params / (fixed_bits + candidates[0] * sum(sizes[n] for n in free))
            raise ConfigError(f"method.compression_ratio={self.compression_ratio:g} is unreachable on this model: "
                              f"with the convention's first/last layers at {sorted(set(fixed.values()))} bits the "
                              f"largest ratio is {floor:.4g}") from None
        bits = {**fixed, **dict(zip(free, chosen))}

        info_bits, info_p, info_c, info_loss = {}, {}, {}, {}
        with torch.no_grad():
            for name, layer in layers.items():
                b = bits[name]
                info_bits[name] = b
                if b >= FULL_PRECISION_BITS:  # the convention keeps this layer float
                    continue
                fit = fits[name][b]
                layer.weight_quantizer = ParametricWeightQuantizer(b, exponent=fit.exponent,
                                                                   scale_ratio=fit.scale_ratio)
                layer.quantized_weight()  # computed here, inside the timed quantization
                info_p[name], info_c[name] = round(fit.exponent, 4), round(fit.scale_ratio, 4)
                info_loss[name] = float(f"{self._loss(fit):.6g}")
        weight_bits = sum(sizes[n] * b for n, b in bits.items())
        ctx.info.update({
            "mixed_precision": True,
            "pnmq_target_ratio": self.compression_ratio,
            "pnmq_compression_ratio": round(32.0 * total_params / weight_bits, 4),
            "pnmq_mean_bits": round(weight_bits / total_params, 4),
            "pnmq_weight_params": total_params,
            "pnmq_candidate_bits": candidates,
            "pnmq_fixed_layers": fixed,
            "pnmq_layer_bits": info_bits,
            "pnmq_layer_exponent": info_p,
            "pnmq_layer_scale_ratio": info_c,
            "pnmq_layer_loss": info_loss,
            "pnmq_bits_histogram": {str(b): n for b, n in sorted(Counter(info_bits.values()).items())},
            "pnmq_mean_exponent": round(sum(info_p.values()) / len(info_p), 4) if info_p else None,
        })
        if self.do_correct:
            ctx.info["pnmq_bias_corrected_layers"] = correct_bias(qmodel)
        if ctx.abit < FULL_PRECISION_BITS or (spec.input_abit and spec.input_abit < FULL_PRECISION_BITS):
            set_ranges_from_bn(qmodel, self.k_std)
        return qmodel
