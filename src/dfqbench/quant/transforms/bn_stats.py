"""Data-free activation statistics from BatchNorm parameters (Nagel et al., DFQ, Sec. 4.2).

Each BatchNorm output is modelled as a per-channel Gaussian N(beta, gamma^2). The model propagates through the
graph: ReLU gives the clipped-normal moments, a residual sum adds means and variances (independence), a conv
or linear layer without a following BN propagates linearly, pooling and reshapes keep the statistics. The
network input is taken as normalized data, N(0, 1) per channel.

`range_of(node, k)` turns the statistics into an activation range ``mean +- k std`` (clipped by a following ReLU),
which is how RTN and DFQ set activation quantizers without a single image; `channel_range_of` gives the same
range per channel (per-channel activation quantizers).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...errors import UnsupportedModel
from .graph import ADD_FUNCTIONS, is_passthrough, module_of, relu_kind

_MIN_STD = 1e-8
_SIGMOIDS = (nn.Sigmoid, nn.Hardsigmoid)


class UnknownStatistics(UnsupportedModel):
    """The graph has an op the BatchNorm-statistics model cannot propagate through."""


class Gaussian:
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean.detach().float().reshape(-1), std.detach().float().reshape(-1).clamp_min(0)

    @property
    def var(self) -> torch.Tensor:
        return self.std**2


def relu_moments(g: Gaussian) -> Gaussian:
    """Mean and std of max(0, X) for X ~ N(mean, std^2), per channel."""
    std = g.std.clamp_min(_MIN_STD)
    alpha = g.mean / std
    cdf = 0.5 * (1 + torch.erf(alpha / math.sqrt(2)))
    pdf = torch.exp(-0.5 * alpha**2) / math.sqrt(2 * math.pi)
    mean = g.mean * cdf + std * pdf
    second = (g.mean**2 + std**2) * cdf + g.mean * std * pdf
    return Gaussian(mean, (second - mean**2).clamp_min(0).sqrt())


class BNStatistics:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        # the input's N(0, 1) and fixed ranges live where the model does (a conv on a CUDA model refuses CPU stats)
        self.device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        self.stats: dict[fx.Node, Gaussian | None] = {}
        with torch.no_grad():
            for node in gm.graph.nodes:
                self.stats[node] = self._propagate(node)

    def of(self, node: fx.Node) -> Gaussian:
        g = self.stats.get(node)
        if g is None:
            raise UnknownStatistics(f"no BatchNorm-derived statistics for node {node.name!r} ({node.op} "
                                    f"{getattr(node.target, '__name__', node.target)}): this data-free range "
                                    f"model does not cover that op; use a calibration-based method (zeroq)")
        return g

    def range_of(self, node: fx.Node, k: float) -> tuple[float, float]:
        """Per-tensor range of `node`'s output: min/max over channels of mean -/+ k std, clipped by ReLUs."""
        lo, hi = self.channel_range_of(node, k)
        return float(lo.min()), float(hi.max())

    def channel_range_of(self, node: fx.Node, k: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel range of `node`'s output (shape [C], or [1] where the statistics are per tensor)."""
        kind = relu_kind(self.gm, node)
        if kind:
            lo, hi = self.channel_range_of(node.args[0], k)
            top = 6.0 if kind == "relu6" else float("inf")
            return lo.clamp(0.0, top), hi.clamp(0.0, top)
        if is_passthrough(self.gm, node) and self.stats.get(node) is None:
            return self.channel_range_of(node.args[0], k)
        if isinstance(module_of(self.gm, node), _SIGMOIDS):
            return torch.zeros(1, device=self.device), torch.ones(1, device=self.device)
        g = self.of(node)
        return g.mean - k * g.std, g.mean + k * g.std

    def _propagate(self, node: fx.Node) -> Gaussian | None:
        gm, mod = self.gm, module_of(self.gm, node)
        if node.op == "placeholder":
            return Gaussian(torch.zeros(1, device=self.device), torch.ones(1, device=self.device))
        if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
            if mod.affine:
                return Gaussian(mod.bias, mod.weight.abs())
            return Gaussian(torch.zeros_like(mod.running_mean), torch.ones_like(mod.running_var))
        inputs = [self.stats.get(a) if isinstance(a, fx.Node) else a for a in node.args]
        if isinstance(mod, (nn.Conv2d, nn.Conv1d, nn.Linear)):
            if hasattr(mod, "out_mean"):  # a layer with a folded BatchNorm
                return Gaussian(mod.out_mean, mod.out_std)
            return _through_layer(mod, inputs[0]) if inputs[0] is not None else None
        if relu_kind(gm, node):
            return relu_moments(inputs[0]) if inputs[0] is not None else None
        if is_passthrough(gm, node):
            return inputs[0]
        if node.op == "call_function" and node.target in ADD_FUNCTIONS:
            return _add(*inputs[:2])
        if node.op == "call_function" and node.target is torch.cat and _cat_dim(node) == 1:
            parts = [self.stats.get(a) for a in node.args[0]]
            if all(p is not None for p in parts):
                return Gaussian(torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts]))
            return None
        if node.op == "call_function" and node.target in (operator.mul, torch.mul):
            return _scaled(*inputs[:2]) or self._gated(node, inputs)
        if node.op == "call_function" and node.target in (operator.truediv, torch.div):
            return _scaled(inputs[0], 1.0 / inputs[1]) if _is_number(inputs[1]) and inputs[1] else None
        if node.op == "call_function" and node.target in (operator.sub, torch.sub):
            b = inputs[1]
            return _add(inputs[0], Gaussian(-b.mean, b.std) if isinstance(b, Gaussian) else _negate(b))
        if node.op == "call_function" and node.target in (torch.zeros_like,):
            return Gaussian(torch.zeros(1, device=self.device), torch.zeros(1, device=self.device))
        return None

    def _gated(self, node: fx.Node, inputs) -> Gaussian | None:
        """x * gate with gate in [0, 1] (squeeze-excitation): bound by x's statistics."""
        for gate, other in ((0, 1), (1, 0)):
            arg = node.args[gate]
            if isinstance(arg, fx.Node) and isinstance(module_of(self.gm, arg), _SIGMOIDS):
                return inputs[other]
        return None


def _cat_dim(node: fx.Node) -> int:
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _negate(x):
    return -x if _is_number(x) else None


def _scaled(a, b) -> Gaussian | None:
    """Gaussian times a constant."""
    for g, c in ((a, b), (b, a)):
        if isinstance(g, Gaussian) and _is_number(c):
            return Gaussian(g.mean * c, g.std * abs(c))
    return None


def _add(a, b) -> Gaussian | None:
    if isinstance(a, Gaussian) and isinstance(b, Gaussian):
        return Gaussian(a.mean + b.mean, (a.var + b.var).sqrt())
    for g, c in ((a, b), (b, a)):
        if isinstance(g, Gaussian) and _is_number(c):
            return Gaussian(g.mean + c, g.std)
    return None


def _through_layer(mod: nn.Module, g: Gaussian) -> Gaussian:
    """Linear propagation of independent per-channel Gaussians through a conv/linear layer."""
    weight = mod.weight.detach().float()
    bias = mod.bias.detach().float() if mod.bias is not None else None
    if isinstance(mod, nn.Linear):
        mean, var = _expand(g.mean, weight.shape[1]), _expand(g.var, weight.shape[1])
        return Gaussian(F.linear(mean, weight, bias), F.linear(var, weight**2).sqrt())
    cin = weight.shape[1] * mod.groups
    kh, kw = weight.shape[2:]
    mean = _expand(g.mean, cin).reshape(1, cin, 1, 1).expand(1, cin, kh, kw)
    var = _expand(g.var, cin).reshape(1, cin, 1, 1).expand(1, cin, kh, kw)
    out_mean = F.conv2d(mean, weight, bias, groups=mod.groups)
    out_var = F.conv2d(var, weight**2, None, groups=mod.groups)
    return Gaussian(out_mean, out_var.clamp_min(0).sqrt())


def _expand(values: torch.Tensor, size: int) -> torch.Tensor:
    """Broadcast per-channel values to `size` features (a flattened C x H x W map repeats each channel)."""
    if values.numel() == size:
        return values
    if values.numel() == 1 or size % values.numel() == 0:
        return values.repeat_interleave(size // values.numel())
    raise UnknownStatistics(f"cannot map {values.numel()} channels onto {size} features")
