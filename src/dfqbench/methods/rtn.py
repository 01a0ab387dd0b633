"""Plain data-free round-to-nearest.

Weights: the convention's grid from the weights themselves. Activations: ranges from the BatchNorm statistics
that feed each quantized tensor (mean +- k std, DFQ style); no image of any kind is used.
"""

from ..quant import quantize_model
from ..quant.calibration.calibrate import set_ranges_from_bn
from .base import Method


class RTN(Method):
    def __init__(self, name: str = "rtn", k_std: float = 6.0, **kwargs):
        super().__init__(name, **kwargs)
        if k_std <= 0:
            raise ValueError(f"method.k_std={k_std} must be > 0")
        self.k_std = k_std

    def quantize(self, model, ctx):
        qmodel = quantize_model(model, ctx.convention, ctx.wbit, ctx.abit)
        set_ranges_from_bn(qmodel, self.k_std)
        return qmodel
