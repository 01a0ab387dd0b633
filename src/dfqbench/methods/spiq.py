"""SPIQ (Yvinec et al., WACV 2023, "SPIQ: Data-Free Per-Channel Static Input Quantization"), as we read it.

Every quantized layer input gets one static range per channel, derived without data from the BatchNorm
statistics feeding it (mean +- k std per channel, clipped by the ReLU). A per-channel input scale s_c cannot stay
in the integer matmul, so it is folded into the weights: the layer computes (W diag(s)) x_int, and it is
W diag(s) that is quantized per output channel; the fake-quantized weight is Q(W diag(s)) diag(1/s).
"""

from __future__ import annotations

import math

import torch
from torch import fx

from ..quant import quantize_model
from ..quant.transforms.bn_stats import BNStatistics
from ..quant.transforms.graph import is_passthrough, layer_nodes, module_of
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from ..quant.quantizers.ranges import fake_quant
from .aciq import clip_ratio
from .base import Method


def input_quantizer(gm: fx.GraphModule, layer: fx.Node) -> ActQuantizer | None:
    """The activation quantizer whose output the layer reads (through pooling/reshapes), if any."""
    src = layer.args[0]
    while isinstance(src, fx.Node):
        mod = module_of(gm, src)
        if isinstance(mod, ActQuantizer):
            return mod
        if not is_passthrough(gm, src):
            return None
        src = src.args[0]
    return None


def weight_column_scale(scale: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Input-channel scales as a tensor broadcastable to the weight [C_out, C_in / groups, ...]."""
    c_out, c_in_group = weight.shape[:2]
    c_in = c_in_group * groups
    if scale.numel() != c_in:  # e.g. a linear layer reading a flattened C x H x W map
        scale = scale.repeat_interleave(c_in // scale.numel())
    group_of_out = torch.arange(c_out, device=weight.device) // (c_out // groups)
    cols = group_of_out[:, None] * c_in_group + torch.arange(c_in_group, device=weight.device)[None, :]
    return scale.to(weight.device)[cols].reshape((c_out, c_in_group) + (1,) * (weight.dim() - 2))


def auto_k_std(bits: int) -> float:
    """ACIQ's Laplace clip for the bit-width, with b = sigma sqrt(2/pi) (4.0 sigma at 4 bits, 7.9 at 8)."""
    return clip_ratio(2.0**bits, "laplace") * math.sqrt(2.0 / math.pi)


class FoldedInputWeightQuantizer(WeightQuantizer):
    """Quantizes W diag(s) per output channel and returns it divided by s again (s: the input's channel scales)."""

    def __init__(self, base: WeightQuantizer, input_scale: torch.Tensor, groups: int):
        super().__init__(base.bits, True, base.symmetric, base.estimator, base.lp, base.dynamic)
        self.register_buffer("input_scale", input_scale.detach().float().clone())
        self.groups = groups

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        cols = weight_column_scale(self.input_scale, weight, self.groups)
        folded = weight * cols
        if self.grid is None or self.dynamic or self.grid.scale.device != weight.device:
            self.calibrate(folded)
        return fake_quant(folded, self.grid, axis=0) / cols


class SPIQ(Method):
    def __init__(self, name: str = "spiq", k_std: float | str = "auto", fold_input_scales: bool = True,
                 **kwargs):
        super().__init__(name, **kwargs)
        if k_std != "auto" and (isinstance(k_std, bool) or not isinstance(k_std, (int, float)) or k_std <= 0):
            raise ValueError(f"method.k_std={k_std!r} is not valid; use auto or a number > 0")
        self.k_std, self.fold_input_scales = k_std, fold_input_scales

    def k_for(self, bits: int) -> float:
        return auto_k_std(bits) if self.k_std == "auto" else float(self.k_std)

    def quantize(self, model, ctx):
        qmodel = quantize_model(model, ctx.convention, ctx.wbit, ctx.abit)
        stats = BNStatistics(qmodel)
        for node in qmodel.graph.nodes:
            aq = module_of(qmodel, node)
            if isinstance(aq, ActQuantizer) and aq.enabled:  # k follows each quantizer's bits (8-bit exceptions)
                ranges = stats.channel_range_of if aq.per_channel else stats.range_of
                aq.set_range(*ranges(node.args[0], self.k_for(aq.bits)))
        ctx.info["spiq_k_std"] = round(self.k_for(ctx.abit), 4)
        folded = 0
        if self.fold_input_scales:
            for node in layer_nodes(qmodel):
                layer, aq = module_of(qmodel, node), input_quantizer(qmodel, node)
                wq = layer.weight_quantizer
                if aq is None or not aq.enabled or aq.grid is None or aq.grid.scale.numel() < 2 or not wq.enabled:
                    continue
                layer.weight_quantizer = FoldedInputWeightQuantizer(wq, aq.grid.scale, getattr(layer, "groups", 1))
                folded += 1
        ctx.info["spiq_folded_layers"] = folded
        return qmodel
