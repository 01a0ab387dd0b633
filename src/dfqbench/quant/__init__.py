"""Fake quantization: backends, quantizers, conventions and model wrapping."""

from .kernels.backend import available_backends, get_backend, set_backend, use_backend
from .convention import Convention, check_bits
from .quantizers import ActQuantizer, QuantConv1d, QuantConv2d, QuantLinear, WeightQuantizer
from .transforms.wrap import act_quantizers, quant_layers, quantize_model, weight_quantizers

__all__ = [
    "ActQuantizer", "Convention", "QuantConv1d", "QuantConv2d", "QuantLinear", "WeightQuantizer", "act_quantizers",
    "available_backends", "check_bits", "get_backend", "quant_layers", "quantize_model", "set_backend",
    "use_backend", "weight_quantizers",
]
