"""DFQ: data-free quantization through weight equalization and bias correction (Nagel et al., ICCV 2019).

ReLU6 -> ReLU, BatchNorm folding, cross-layer equalization, high-bias absorption, quantization, data-free bias
correction, activation ranges from the (equalized) BatchNorm statistics. No images.
"""

from torch import nn

from ..quant import quantize_model
from ..quant.transforms.bias_correction import correct_bias
from ..quant.transforms.bn_fold import fold_batchnorm
from ..quant.calibration.calibrate import set_ranges_from_bn
from ..quant.transforms.equalize import absorb_high_bias, equalize, find_pairs
from .base import Method


class DFQ(Method):
    def __init__(self, name: str = "dfq", equalize: bool = True, absorb_bias: bool = True, correct_bias: bool = True,
                 relu6_to_relu: bool = True, k_std: float = 6.0, absorb_k_std: float = 3.0,
                 equalize_iterations: int = 100, equalize_tol: float = 2e-7, **kwargs):
        super().__init__(name, **kwargs)
        self.do_equalize, self.do_absorb, self.do_correct = equalize, absorb_bias, correct_bias
        self.relu6_to_relu, self.k_std, self.absorb_k_std = relu6_to_relu, k_std, absorb_k_std
        self.equalize_iterations, self.equalize_tol = equalize_iterations, equalize_tol

    def quantize(self, model, ctx):
        if self.relu6_to_relu:  # CLE needs a positively homogeneous activation
            _replace_relu6(model)
        gm = fold_batchnorm(model)
        pairs = find_pairs(gm)
        ctx.info["dfq_pairs"] = len(pairs)
        if self.do_equalize:
            ctx.info["dfq_equalize_iterations"] = equalize(pairs, self.equalize_iterations, self.equalize_tol)
        if self.do_absorb:
            absorb_high_bias(pairs, self.absorb_k_std)
        qmodel = quantize_model(gm, ctx.convention, ctx.wbit, ctx.abit)
        if self.do_correct:
            ctx.info["dfq_bias_corrected_layers"] = correct_bias(qmodel)
        set_ranges_from_bn(qmodel, self.k_std)
        return qmodel


def _replace_relu6(model: nn.Module) -> None:
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU6):
            setattr(model, name, nn.ReLU(inplace=child.inplace))
        else:
            _replace_relu6(child)
