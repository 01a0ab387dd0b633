"""Activation-range calibration passes shared by every method."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from ..transforms.bn_stats import BNStatistics
from ..transforms.graph import module_of
from ..quantizers import ActQuantizer
from ..quantizers.core import float_forward

OBSERVE_MODES = ("quantized", "float")


@torch.no_grad()
def calibrate_on_batches(model: nn.Module, batches: Iterable[torch.Tensor], observe: str = "quantized") -> None:
    """Observe every activation quantizer over `batches`, then freeze the ranges. observe="quantized": each
    quantizer quantizes with the range seen so far while observing, so later layers see quantized inputs (ZeroQ's
    code); "float": the whole model runs in float while observing (PSAQ-ViT's code calibrates before
    `model_quant()`)."""
    if observe not in OBSERVE_MODES:
        raise ValueError(f"observe={observe!r} is not valid; choose one of: {', '.join(OBSERVE_MODES)}")
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    for q in quantizers:
        q.start_observing()
    model.eval()
    with float_forward(model) if observe == "float" else contextlib.nullcontext():
        for x in batches:
            model(x)
    for q in quantizers:
        q.stop_observing()


def forward_with_hooks(model: nn.Module, handles: list, batches: Iterable[torch.Tensor]) -> None:
    """`model` in eval mode over `batches` while the hooks behind `handles` observe; the hooks are removed
    afterwards, also on an error (a calibration pass of a method's own)."""
    try:
        model.eval()
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def set_ranges_from_bn(gm, k_std: float) -> None:
    """Data-free ranges: mean +- k std of the BatchNorm-derived statistics of each quantized tensor (per channel
    for per-channel quantizers)."""
    stats = BNStatistics(gm)
    for node in gm.graph.nodes:
        q = module_of(gm, node)
        if isinstance(q, ActQuantizer):
            ranges = stats.channel_range_of if q.per_channel else stats.range_of
            q.set_range(*ranges(node.args[0], k_std))
