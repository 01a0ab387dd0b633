"""Quantizer modules: ranges and estimators, weight/activation quantizers, quantized layers, and the method-specific
quantizers built on them (precomputed, power, expansion, learned clips, AdaRound/LSQ)."""

from .core import FULL_PRECISION_BITS, ActQuantizer, WeightQuantizer
from .layers import (QuantConv1d, QuantConv2d, QuantLayer, QuantLinear, float_layer_types, is_quant_layer,
                     quant_class_for, register_layer)

__all__ = [
    "FULL_PRECISION_BITS", "ActQuantizer", "QuantConv1d", "QuantConv2d", "QuantLayer", "QuantLinear", "WeightQuantizer",
    "float_layer_types", "is_quant_layer", "quant_class_for", "register_layer",
]
