"""Transformer graphs in torch.fx: attention matmuls made visible, nodes classified by the operation they compute.

A fused attention (timm's `F.scaled_dot_product_attention` path) hides its two matmuls, so `graph.trace` first
switches every timm attention module to its explicit path (`graph.explicit_attention`). `op_kind` then names
what a node computes, from its module type or function (never from its name), and `op_output_sites` places
activation quantizers on the outputs of the kinds a convention lists (`quant.act.sites=op_outputs`, PSAQ-ViT's
placement).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..convention import OP_KINDS  # noqa: F401  (the kinds op_kind returns)
from .graph import is_layer, module_of, tensor_users


_ACTIVATION_MODULES = (nn.GELU, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.Mish)
_ACTIVATION_FUNCTIONS = {F.gelu, F.relu, F.relu6, F.silu, F.hardswish, F.mish, torch.relu, torch.tanh, torch.sigmoid}
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_NORM_FUNCTIONS = {F.layer_norm, F.group_norm, F.rms_norm}
_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d)
_POOL_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.avg_pool1d, F.avg_pool2d, torch.mean}
# ops that move or select values without computing new ones: a quantizer after them equals one before them
# (per tensor), so a site slides over a single-reader chain of them to the tensor the next op reads
_REARRANGE_METHODS = {"view", "reshape", "flatten", "contiguous", "permute", "transpose", "squeeze", "unsqueeze",
                      "expand"}
_REARRANGE_FUNCTIONS = {torch.flatten, torch.transpose, torch.permute, torch.reshape, operator.getitem, F.dropout}


def _is_shape_value(node: fx.Node, memo: dict) -> bool:
    """True for nodes that compute sizes, not tensors (x.shape[0], B * N, ...)."""
    if node in memo:
        return memo[node]
    if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
        result = True
    elif node.op == "call_method" and node.target in ("size", "dim"):
        result = True
    elif node.op in ("call_function", "call_method"):
        inputs = [a for a in node.all_input_nodes]
        result = bool(inputs) and all(_is_shape_value(a, memo) for a in inputs)
    else:
        result = False
    memo[node] = result
    return result


def _is_constant(gm: fx.GraphModule, node: fx.Node, memo: dict) -> bool:
    """A tensor that does not depend on the input and is not a learned parameter: a buffer or a constant torch.fx
    baked in (Swin's shifted-window attention mask), or an op on such tensors only."""
    key = ("constant", node)
    if key in memo:
        return memo[key]
    if node.op == "get_attr":
        result = not isinstance(_attr(gm, node.target), nn.Parameter)
    elif node.op in ("call_function", "call_method"):
        inputs = node.all_input_nodes
        result = bool(inputs) and all(_is_constant(gm, a, memo) for a in inputs)
    else:
        result = False
    memo[key] = result
    return result


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def op_kind(gm: fx.GraphModule, node: fx.Node, memo: dict | None = None) -> str | None:
    """The OP_KINDS entry `node` computes, or None (shape ops, dropout, getitem, constants, ...). `param`: a learned
    parameter (a position embedding, Swin's relative-position-bias table) that an add reads, directly or through
    rearrangements and indexing; `add`: a sum of two input-dependent tensors (adding a constant mask is not one)."""
    memo = {} if memo is None else memo
    if is_layer(gm, node):
        return "layer"
    mod = module_of(gm, node)
    if node.op == "call_module":
        if isinstance(mod, _ACTIVATION_MODULES):
            return "activation"
        if isinstance(mod, _NORM_MODULES):
            return "norm"
        if isinstance(mod, nn.Softmax):
            return "softmax"
        if isinstance(mod, _POOL_MODULES):
            return "pool"
        return None
    if node.op == "get_attr":
        if not isinstance(_attr(gm, node.target), nn.Parameter):
            return None
        users = tensor_users(slide_to_reader(gm, node))
        return "param" if any(op_kind(gm, u, memo) == "add" for u in users) else None
    if _is_shape_value(node, memo) or _is_constant(gm, node, memo):
        return None
    if node.op == "call_function":
        if node.target in _ACTIVATION_FUNCTIONS:
            return "activation"
        if node.target in _NORM_FUNCTIONS:
            return "norm"
        if node.target in _MATMUL_FUNCTIONS:
            return "matmul"
        if node.target is torch.cat:
            return "concat"
        if node.target is F.softmax:
            return "softmax"
        if node.target in _POOL_FUNCTIONS:
            return "pool"
        if node.target in _ADD_FUNCTIONS:
            return "add" if _adds_two_activations(gm, node, memo) else None
    if node.op == "call_method":
        if node.target in ("matmul", "bmm"):
            return "matmul"
        if node.target == "softmax":
            return "softmax"
        if node.target in ("gelu", "relu", "relu_"):
            return "activation"
        if node.target in ("add", "add_"):
            return "add" if _adds_two_activations(gm, node, memo) else None
        if node.target == "mean":
            return "pool"
    return None


def _adds_two_activations(gm: fx.GraphModule, node: fx.Node, memo: dict) -> bool:
    """Both operands are tensors (nodes), neither a constant (a mask) nor a size."""
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    return len(operands) == 2 and not any(_is_constant(gm, a, memo) or _is_shape_value(a, memo) for a in operands)


def is_rearrange(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(module_of(gm, node), (nn.Identity, nn.Dropout, nn.Flatten))
    if node.op == "call_function":
        return node.target in _REARRANGE_FUNCTIONS
    return node.op == "call_method" and node.target in _REARRANGE_METHODS


def slide_to_reader(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Follow `node` down a chain of single-reader rearranging ops (reshape, transpose, a [:, 0] slice, dropout,
    identity): the site is the tensor the next computing op reads (PSAQ-ViT quantizes `norm(x)[:, 0]`, the
    class token, not every token)."""
    while True:
        users = tensor_users(node)
        if len(users) != 1 or not is_rearrange(gm, users[0]):
            return node
        node = users[0]


def op_output_sites(gm: fx.GraphModule, kinds) -> list[fx.Node]:
    """One site per output of a node whose kind is in `kinds`, in graph order. A layer whose only reader is an
    activation function is fused with it (the activation's output is the site, as integer backends fuse
    linear + activation and PSAQ-ViT quantizes GELU(fc1(x)), not fc1(x))."""
    kinds, memo, sites = set(kinds), {}, []
    for node in gm.graph.nodes:
        kind = op_kind(gm, node, memo)
        if kind not in kinds:
            continue
        users = tensor_users(node)
        if kind == "layer" and "activation" in kinds and len(users) == 1 and op_kind(gm, users[0], memo) == \
                "activation":
            continue
        site = slide_to_reader(gm, node)
        if site not in sites:
            sites.append(site)
    return sites
