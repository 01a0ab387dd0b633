"""REx (Yvinec et al., NeurIPS 2023): data-free residual quantization error expansion.

Each layer's weight becomes a sum of `expansion_order` quantized terms at the layer's bit-width, W ~ Q(W) +
Q(W - Q(W)) + ..., optionally sparse (dfqbench.quant.quantizers.expansion): extra compute and memory for accuracy.
Activations are uniform with ranges from the BatchNorm statistics (as `rtn`). No images.
"""

from __future__ import annotations

import torch

from ..quant import quant_layers, quantize_model
from ..quant.calibration.calibrate import set_ranges_from_bn
from ..quant.quantizers.expansion import ExpansionWeightQuantizer
from .base import Method
from ..settings import check_number


class REx(Method):
    def __init__(self, name: str = "rex", expansion_order: int = 2, sparsity: float = 1.0, k_std: float = 6.0,
                 **kwargs):
        super().__init__(name, **kwargs)
        if isinstance(expansion_order, bool) or not isinstance(expansion_order, int) or expansion_order < 1:
            raise ValueError(f"method.expansion_order={expansion_order!r} is not valid; use an integer >= 1")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity <= 1:
            raise ValueError(f"method.sparsity={sparsity!r} is not valid; use a number in (0, 1]")
        check_number("method.k_std", k_std, strict=True)
        self.order, self.sparsity, self.k_std = expansion_order, float(sparsity), float(k_std)

    def quantize(self, model, ctx):
        qmodel = quantize_model(model, ctx.convention, ctx.wbit, ctx.abit)
        numel = slots = nonzeros = 0
        with torch.no_grad():
            for layer in quant_layers(qmodel):
                wq = ExpansionWeightQuantizer.like(layer.weight_quantizer, order=self.order, sparsity=self.sparsity)
                layer.weight_quantizer = wq
                if wq.enabled:
                    layer.quantized_weight()
                    numel += layer.weight.numel()
                    slots, nonzeros = slots + wq.term_slots, nonzeros + wq.nonzeros
        # the extra cost: weight entries stored / multiplied relative to one dense quantized tensor
        ctx.info["rex_weight_terms_relative"] = round(slots / max(numel, 1), 4)
        ctx.info["rex_nonzero_weights_relative"] = round(nonzeros / max(numel, 1), 4)
        set_ranges_from_bn(qmodel, self.k_std)
        return qmodel
