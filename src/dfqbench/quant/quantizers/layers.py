"""Quantized layers: a float layer whose weight goes through a WeightQuantizer.

One table maps each float layer type to its quantized class (`register_layer`), so the wrapper, the graph helpers
and the reconstruction code ask `quant_class_for(module)` / `is_quant_layer(module)` instead of branching on
layer types; a new operation (a Conv1d, an attention matmul) is a new class registered here.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .core import WeightQuantizer

_QUANT_CLASS: dict[type[nn.Module], type["QuantLayer"]] = {}


def register_layer(float_type: type[nn.Module]):
    """Class decorator: `cls` is the quantized form of `float_type` (and a subclass of it)."""
    def decorate(cls):
        _QUANT_CLASS[float_type] = cls
        cls.float_type = float_type
        return cls
    return decorate


class QuantLayer:
    """Mixin for a quantized layer; `float_type.forward` with `quantized_weight()` in place of the weight."""

    float_type: type[nn.Module]
    weight_quantizer: WeightQuantizer

    @classmethod
    def from_float(cls, layer: nn.Module, weight_quantizer: WeightQuantizer):
        """A quantized twin of `layer` that shares its parameters and buffers (nothing is copied)."""
        new = cls.__new__(cls)
        # the module's own tables are copied (not the tensors in them), so adding the quantizer leaves `layer` as is
        new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in layer.__dict__.items()})
        new.weight_quantizer = weight_quantizer
        return new

    # quant.bias=int32: the ActQuantizer feeding this layer (set by quantize_model; a plain reference, not a
    # submodule): the bias is rounded to the grid input scale x weight scale, as an integer backend stores it
    bias_input = None

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def quantized_bias(self) -> torch.Tensor | None:
        """The bias as the layer adds it: float, or on the int32 grid (straight-through gradient). Call after
        quantized_weight(), which calibrates the weight grid."""
        bias, source, wq = self.bias, self.bias_input, self.weight_quantizer
        if bias is None or source is None or wq.grid is None or not wq.enabled or wq.bypass or source.bypass:
            return bias
        act_grid = source.current_grid(bias.device)
        if act_grid is None:
            return bias
        step = act_grid.scale.reshape(()) * wq.grid.scale.reshape(-1)
        return bias + (torch.round(bias / step) * step - bias).detach()

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The float layer's forward with the float weight (reconstruction compares against it)."""
        return self.float_type.forward(self, x)


@register_layer(nn.Conv2d)
class QuantConv2d(QuantLayer, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight()
        return self._conv_forward(x, weight, self.quantized_bias())


@register_layer(nn.Conv1d)
class QuantConv1d(QuantLayer, nn.Conv1d):
    """Weights [out, in / groups, k]: per-channel grids along dim 0 (output channels), as Conv2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight()
        return self._conv_forward(x, weight, self.quantized_bias())


@register_layer(nn.Linear)
class QuantLinear(QuantLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight()
        return nn.functional.linear(x, weight, self.quantized_bias())


def float_layer_types() -> tuple[type[nn.Module], ...]:
    """The float layer types dfqbench can quantize (the keys of the table)."""
    return tuple(_QUANT_CLASS)


def quant_class_for(layer: nn.Module) -> type[QuantLayer]:
    for float_type, cls in _QUANT_CLASS.items():
        if type(layer) is float_type or isinstance(layer, float_type) and not isinstance(layer, QuantLayer):
            return cls
    raise TypeError(f"no quantized form of {type(layer).__name__}; quantizable: "
                    f"{', '.join(t.__name__ for t in _QUANT_CLASS)}")


def is_quant_layer(module: nn.Module) -> bool:
    return isinstance(module, QuantLayer)
