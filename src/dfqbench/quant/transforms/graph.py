"""torch.fx helpers: trace a model and classify its nodes (layers, ReLUs, shape-only ops)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...errors import UnsupportedModel
from ..quantizers import ActQuantizer, float_layer_types

_PASS_MODULES = (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout,
                 nn.Identity, ActQuantizer, nn.AvgPool1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)
_PASS_FUNCTIONS = {torch.flatten, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d,
                   F.dropout, torch.squeeze, F.adaptive_avg_pool1d, F.adaptive_max_pool1d, F.avg_pool1d,
                   F.max_pool1d}
_PASS_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "mean"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


class UntraceableModel(UnsupportedModel):
    """torch.fx cannot trace the model (data-dependent control flow), so quantizers cannot be placed."""


def explicit_attention(model: nn.Module) -> int:
    """Switch every module with timm's `fused_attn` flag to the explicit attention path (q @ k^T, softmax,
    attn @ v as separate ops, which torch.fx then sees; the same parameters and function up to float rounding)
    instead of one fused `F.scaled_dot_product_attention` call that hides the matmuls. Returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "fused_attn", None), bool):
            module.fused_attn = False
            count += 1
    return count


def trace(model: nn.Module) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    explicit_attention(model)
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many exception types for data-dependent control flow
        raise UntraceableModel(f"torch.fx cannot trace {type(model).__name__}: {exc}".splitlines()[0]) from exc


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def is_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(module_of(gm, node), float_layer_types())


def layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_layer(gm, n)]


def relu_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'relu', 'relu6' or None."""
    mod = module_of(gm, node)
    if isinstance(mod, nn.ReLU) or (node.op == "call_function" and node.target in (F.relu, torch.relu)) or (
            node.op == "call_method" and node.target in ("relu", "relu_")):
        return "relu"
    if isinstance(mod, nn.ReLU6) or (node.op == "call_function" and node.target is F.relu6):
        return "relu6"
    if isinstance(mod, nn.Hardtanh) and mod.min_val == 0.0:
        return "relu6" if mod.max_val == 6.0 else None
    return None


def is_passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that keep each channel's values (or a subset/average of them) and move no information across channels."""
    if node.op == "call_module":
        return isinstance(module_of(gm, node), _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    return node.op == "call_method" and node.target in _PASS_METHODS


def tensor_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not (u.op == "call_method" and u.target in ("size", "dim"))]


def layers_fed_by(gm: fx.GraphModule, node: fx.Node) -> set[fx.Node]:
    """Layer nodes that read `node` directly or through shape-only ops."""
    found, stack = set(), list(tensor_users(node))
    while stack:
        user = stack.pop()
        if is_layer(gm, user):
            found.add(user)
        elif is_passthrough(gm, user):
            stack.extend(tensor_users(user))
    return found


def insert_after(gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module) -> fx.Node:
    """Insert `module` on every use of `node` (one shared module: all readers see the same tensor)."""
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


def producer(node: fx.Node) -> fx.Node:
    """The tensor input of a single-input op."""
    return node.args[0]
