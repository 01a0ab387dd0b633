"""Fold BatchNorm into the preceding conv/linear, keeping the BN's output statistics on the layer.

After folding, ``layer.out_mean`` / ``layer.out_std`` hold BN's (beta, |gamma|): the per-channel mean and standard
deviation of the pre-activation, which data-free methods (DFQ, RTN) use as the activation distribution.

Scope (`Convention.fold_scope`): "graph" folds every BatchNorm that reads a conv/linear output no other operation
reads; "module" folds only a BatchNorm registered right after that conv in the same parent module, as a walk over
each module's children does (the ACIQ code's search_absorbe_bn). On a pre-activation net the two differ: the conv
ending one unit feeds the BatchNorm that opens the next block, a graph pair but not a module pair.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..convention import FOLD_SCOPES
from .graph import module_of, tensor_users, trace

NORM_TYPES = (nn.BatchNorm2d, nn.BatchNorm1d)


def _module_pair(root: nn.Module, layer_name: str, bn_name: str) -> bool:
    """Whether `bn_name` is registered right after `layer_name` among the same parent module's children (in the
    model as built: a traced copy keeps only the called modules, in call order)."""
    parent, _, layer_child = layer_name.rpartition(".")
    bn_parent, _, bn_child = bn_name.rpartition(".")
    if parent != bn_parent:
        return False
    children = list((root.get_submodule(parent) if parent else root)._modules)
    return layer_child in children and bn_child in children and \
        children.index(bn_child) == children.index(layer_child) + 1


@torch.no_grad()
def fold_batchnorm(model: nn.Module, scope: str = "graph") -> fx.GraphModule:
    if scope not in FOLD_SCOPES:
        raise ValueError(f"fold scope {scope!r} is not valid; choose one of: {', '.join(FOLD_SCOPES)}")
    gm = trace(model)
    for node in list(gm.graph.nodes):
        bn = module_of(gm, node)
        if not isinstance(bn, NORM_TYPES) or not bn.track_running_stats:
            continue
        src = node.args[0]
        layer = module_of(gm, src) if isinstance(src, fx.Node) else None
        if not isinstance(layer, (nn.Conv2d, nn.Conv1d, nn.Linear)) or len(tensor_users(src)) != 1:
            continue
        if scope == "module" and (getattr(layer, "groups", 1) != 1 or not _module_pair(model, src.target, node.target)):
            continue  # that code's is_absorbing also leaves grouped convs alone
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
