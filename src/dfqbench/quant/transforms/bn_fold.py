"""Fold BatchNorm into the preceding conv/linear, keeping the BN's output statistics on the layer.

After folding, ``layer.out_mean`` / ``layer.out_std`` hold BN's (beta, |gamma|): the per-channel mean and standard
deviation of the pre-activation, which data-free methods (DFQ, RTN) use as the activation distribution.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .graph import module_of, tensor_users, trace

_BN_TYPES = (nn.BatchNorm2d, nn.BatchNorm1d)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    gm = trace(model)
    for node in list(gm.graph.nodes):
        bn = module_of(gm, node)
        if not isinstance(bn, _BN_TYPES) or not bn.track_running_stats:
            continue
        src = node.args[0]
        layer = module_of(gm, src) if isinstance(src, fx.Node) else None
        if not isinstance(layer, (nn.Conv2d, nn.Conv1d, nn.Linear)) or len(tensor_users(src)) != 1:
            continue
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(std)
        beta = bn.bias if bn.affine else torch.zeros_like(std)
        factor = gamma / std
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        layer.weight.data.mul_(factor.reshape(shape))
        layer.bias = nn.Parameter((bias - bn.running_mean) * factor + beta)
        layer.register_buffer("out_mean", beta.detach().clone())
        layer.register_buffer("out_std", gamma.detach().abs().clone())
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
