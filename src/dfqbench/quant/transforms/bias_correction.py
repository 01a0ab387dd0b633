"""Data-free bias correction (Nagel et al., ICCV 2019, Sec. 4.2).

The weight rounding error eps = W_q - W shifts each output by eps . E[x]; subtract it from the bias, with E[x]
taken from the BatchNorm-derived statistics of the layer's input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .bn_stats import BNStatistics, UnknownStatistics, _expand
from .graph import module_of
from ..quantizers import QuantLinear, is_quant_layer


@torch.no_grad()
def correct_bias(gm: fx.GraphModule) -> int:
    """Returns the number of layers corrected."""
    stats = BNStatistics(gm)
    corrected = 0
    for node in gm.graph.nodes:
        layer = module_of(gm, node)
        if not is_quant_layer(layer) or not layer.weight_quantizer.enabled:
            continue
        try:
            mean_in = stats.of(node.args[0]).mean
        except UnknownStatistics:
            continue
        eps = layer.quantized_weight() - layer.weight
        if isinstance(layer, QuantLinear):
            shift = eps @ _expand(mean_in, eps.shape[1])
        else:
            cin, (kh, kw) = eps.shape[1] * layer.groups, eps.shape[2:]
            x = _expand(mean_in, cin).reshape(1, cin, 1, 1).expand(1, cin, kh, kw)
            shift = F.conv2d(x, eps, None, groups=layer.groups).reshape(-1)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(shift))
        layer.bias.data.sub_(shift)
        corrected += 1
    return corrected
