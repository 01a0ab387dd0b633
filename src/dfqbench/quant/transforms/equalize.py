"""Cross-layer equalization and high-bias absorption (Nagel et al., ICCV 2019, Sec. 4.1 and 4.3).

Both act on pairs of layers A -> [ReLU] -> B where A's output reaches only B. They need BatchNorm folded
first (`fold_batchnorm`), which leaves each A's pre-activation statistics in `A.out_mean` / `A.out_std`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from .graph import module_of, relu_kind, tensor_users


@dataclass
class LayerPair:
    first: nn.Module
    second: nn.Module
    through_relu: bool

    @property
    def second_is_depthwise(self) -> bool:
        s = self.second
        return isinstance(s, nn.Conv2d) and s.groups > 1 and s.groups == s.in_channels == s.out_channels


def find_pairs(gm: fx.GraphModule) -> list[LayerPair]:
    pairs = []
    for node in gm.graph.nodes:
        first = module_of(gm, node)
        if not isinstance(first, (nn.Conv2d, nn.Linear)):
            continue
        users = tensor_users(node)
        if len(users) != 1:
            continue
        nxt, through_relu = users[0], False
        if relu_kind(gm, nxt) == "relu":
            through_relu, users = True, tensor_users(nxt)
            if len(users) != 1:
                continue
            nxt = users[0]
        second = module_of(gm, nxt)
        if not isinstance(second, (nn.Conv2d, nn.Linear)):
            continue
        pair = LayerPair(first, second, through_relu)
        in_ch = second.in_channels if isinstance(second, nn.Conv2d) else second.in_features
        grouped = isinstance(second, nn.Conv2d) and second.groups > 1 and not pair.second_is_depthwise
        if in_ch == first.weight.shape[0] and not grouped:
            pairs.append(pair)
    return pairs


def _input_channel_view(pair: LayerPair) -> torch.Tensor:
    """B's weight as [C_in, -1]: one row per channel A produces."""
    w = pair.second.weight
    if pair.second_is_depthwise:
        return w.reshape(w.shape[0], -1)
    return w.transpose(0, 1).reshape(w.shape[1], -1)


def _scale_pair(pair: LayerPair, s: torch.Tensor) -> None:
    """A's output channel i divided by s_i, B's input channel i multiplied by s_i (exact through a ReLU)."""
    a, b = pair.first, pair.second
    a.weight.data.div_(s.reshape(-1, *([1] * (a.weight.dim() - 1))))
    if a.bias is not None:
        a.bias.data.div_(s)
    for name in ("out_mean", "out_std"):
        if hasattr(a, name):
            getattr(a, name).div_(s)
    shape = (-1,) + (1,) * (b.weight.dim() - 1) if pair.second_is_depthwise else (1, -1) + (1,) * (b.weight.dim() - 2)
    b.weight.data.mul_(s.reshape(shape))


EQUALIZE_RANGES = ("absmax", "minmax")


def _channel_range(rows: torch.Tensor, kind: str) -> torch.Tensor:
    """Per row: max |w| (absmax, a symmetric grid's range / 2) or max - min (minmax: jakc4103/DFQ's unsigned range,
    an asymmetric grid's)."""
    if kind == "minmax":
        return rows.amax(dim=1) - rows.amin(dim=1)
    return rows.abs().amax(dim=1)


@torch.no_grad()
def equalize(pairs: list[LayerPair], max_iterations: int = 100, tol: float = 2e-7, channel_range: str = "absmax"
             ) -> int:
    """Iterate s_i = sqrt(r1_i / r2_i) over all pairs until no scale moves by more than `tol`; r is each channel's
    range (`channel_range`: absmax | minmax)."""
    if channel_range not in EQUALIZE_RANGES:
        raise ValueError(f"channel_range={channel_range!r} is not valid; choose one of: {', '.join(EQUALIZE_RANGES)}")
    for iteration in range(1, max_iterations + 1):
        worst = 0.0
        for pair in pairs:
            r1 = _channel_range(pair.first.weight.reshape(pair.first.weight.shape[0], -1), channel_range)
            r2 = _channel_range(_input_channel_view(pair), channel_range)
            ok = (r1 > 0) & (r2 > 0)
            s = torch.where(ok, torch.sqrt(r1 / r2.clamp_min(1e-12)), torch.ones_like(r1))
            _scale_pair(pair, s)
            worst = max(worst, float((s - 1).abs().max()))
        if worst < tol:
            return iteration
    return max_iterations


@torch.no_grad()
def absorb_high_bias(pairs: list[LayerPair], k_std: float = 3.0) -> None:
    """Move c = max(0, mean - k std) of A's pre-activation into B's bias (valid where ReLU(x - c) = ReLU(x) - c)."""
    for pair in pairs:
        a, b = pair.first, pair.second
        if not pair.through_relu or not hasattr(a, "out_mean") or a.bias is None:
            continue
        c = (a.out_mean - k_std * a.out_std).clamp_min(0)
        a.bias.data.sub_(c)
        a.out_mean.sub_(c)
        w = b.weight
        if pair.second_is_depthwise:
            shift = w.reshape(w.shape[0], -1).sum(dim=1) * c
        else:
            shift = w.reshape(w.shape[0], w.shape[1], -1).sum(dim=2) @ c
        if b.bias is None:
            b.bias = nn.Parameter(torch.zeros(w.shape[0], device=w.device))
        b.bias.data.add_(shift)
