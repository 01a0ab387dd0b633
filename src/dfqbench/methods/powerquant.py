"""PowerQuant (Yvinec et al., ICLR 2023): data-free non-uniform weight quantization with a power function.

Each layer's weights are quantized as sign(w)|w|^a on the convention's uniform grid and mapped back with the
power 1/a; a minimizes the layer's weight reconstruction error (golden-section search, dfqbench.quant.quantizers.power).
Activations stay uniform, with ranges from the BatchNorm statistics (as `rtn`). No images.
"""

from __future__ import annotations

import torch

from ..quant import quantize_model
from ..quant.quantizers import is_quant_layer
from ..quant.calibration.calibrate import set_ranges_from_bn
from ..quant.quantizers.power import PowerWeightQuantizer
from .base import Method
from ..settings import check_number


class PowerQuant(Method):
    def __init__(self, name: str = "powerquant", exponent: float | None = None,
                 exponent_range: tuple[float, float] | list[float] = (0.25, 1.0), tolerance: float = 1e-2,
                 k_std: float = 6.0, **kwargs):
        super().__init__(name, **kwargs)
        if exponent is not None:
            check_number("method.exponent", exponent, strict=True)
        try:
            lo, hi = (float(v) for v in exponent_range)
        except (TypeError, ValueError):
            raise ValueError(f"method.exponent_range={exponent_range!r} must be two numbers [lo, hi] with "
                             f"0 < lo < hi") from None
        if not 0 < lo < hi:
            raise ValueError(f"method.exponent_range={list(exponent_range)!r} must satisfy 0 < lo < hi")
        self.exponent, self.exponent_range = exponent, (lo, hi)
        self.tolerance = float(check_number("method.tolerance", tolerance, strict=True))
        self.k_std = float(check_number("method.k_std", k_std, strict=True))

    def quantize(self, model, ctx):
        qmodel = quantize_model(model, ctx.convention, ctx.wbit, ctx.abit)
        exponents = {}
        with torch.no_grad():
            for name, layer in qmodel.named_modules():
                if not is_quant_layer(layer):
                    continue
                wq = PowerWeightQuantizer.like(layer.weight_quantizer, exponent=self.exponent,
                                               exponent_range=self.exponent_range, tolerance=self.tolerance)
                layer.weight_quantizer = wq
                if wq.enabled:
                    layer.quantized_weight()  # the search runs here, inside the timed quantization
                    exponents[name] = round(wq.a, 4)
        ctx.info["powerquant_exponents"] = exponents
        if exponents:
            ctx.info["powerquant_mean_exponent"] = round(sum(exponents.values()) / len(exponents), 4)
        set_ranges_from_bn(qmodel, self.k_std)
        return qmodel
