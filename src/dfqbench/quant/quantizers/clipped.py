"""DFQF's learned clipping (Li et al., ACML 2020): fake-quantizers whose clipping value is a trained parameter.

Weights: symmetric signed grid, levels -2^(b-1) .. 2^(b-1) - 1, step clip / (2^(b-1) - 1). Activations (after a
ReLU): unsigned grid, levels 0 .. 2^b - 1, step clip / (2^b - 1). Both compute round(clamp(x / step)) * step with
a straight-through round, so the clip receives the gradient autograd gives that expression (through the step for
values inside the range, as in LSQ, and through the clamp for clipped values). The clip is per tensor (DFQF) or
per output channel (a per-channel convention). Every clip parameter is named `clip`, so that an optimizer can give
the clips their own learning rate (DFQF: a tenth of the weights', no momentum, no weight decay).

`init_clip` is DFQF's initialization: max(lower_bound * max|x|, the MSE-optimal clip among 1 %..99 % of max|x|).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .core import FULL_PRECISION_BITS, ActQuantizer
from .layers import is_quant_layer

CANDIDATES = torch.arange(1, 100, dtype=torch.float64) / 100  # clip candidates as fractions of max|x|


def _levels(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def clip_quantize(x: torch.Tensor, clip: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """round(clamp(x / step, qmin, qmax)) * step with step = clip / qmax and a straight-through round."""
    qmin, qmax = _levels(bits, signed)
    step = (clip / qmax).clamp_min(1e-8)
    t = torch.clamp(x / step, qmin, qmax)
    return (t + (torch.round(t) - t).detach()) * step


def init_clip(values: torch.Tensor, bits: int, signed: bool, lower_bound: float = 0.5,
              max_samples: int = 65536) -> float:
    """max(lower_bound * max|x|, argmin over c in {1 %, ..., 99 %} * max|x| of mean (q_c(x) - x)^2). The error is
    exact (DFQF: on a 201-bin histogram), over at most `max_samples` evenly strided values of a large tensor."""
    v = values.detach().flatten().double()
    if not signed:
        v = v.clamp_min(0)
    top = float(v.abs().max())
    if top == 0.0:
        return 1e-8
    if v.numel() > max_samples:
        v = v[:: -(-v.numel() // max_samples)]
    clips = CANDIDATES * top
    errors = torch.stack([(clip_quantize(v, c, bits, signed) - v).pow(2).mean() for c in clips])
    return max(lower_bound * top, float(clips[int(errors.argmin())]))


class ClippedWeightQuantizer(nn.Module):
    def __init__(self, bits: int, clip: torch.Tensor):
        super().__init__()
        self.bits = bits
        self.clip = nn.Parameter(clip.detach().clone().float())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        clip = self.clip.view(-1, *([1] * (weight.dim() - 1))) if self.clip.numel() > 1 else self.clip
        return clip_quantize(weight, clip, self.bits, signed=True)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, clips={self.clip.numel()}"


class ClippedActQuantizer(nn.Module):
    """Post-ReLU activations on the unsigned grid [0, clip] (negative inputs would be clipped to 0)."""

    def __init__(self, bits: int, clip: float):
        super().__init__()
        self.bits = bits
        self.clip = nn.Parameter(torch.tensor([float(clip)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return clip_quantize(x, self.clip, self.bits, signed=False)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, clip={float(self.clip.detach()):.4g}"


def attach_learned_clips(student: fx.GraphModule, batches: list[torch.Tensor], lower_bound: float = 0.5) -> None:
    """Replace every enabled weight and activation quantizer of a quantized model by its learned-clip version,
    initialized as DFQF does: activation clips as the mean over `batches` of each batch's init_clip at that site,
    measured with float weights and activations (DFQF collects them on the float model); weight clips from the
    weights (per output channel when the quantizer is per channel)."""
    layers = [m for m in student.modules() if is_quant_layer(m)]
    _calibrate_act_clips(student, layers, batches, lower_bound)
    for layer in layers:
        wq = layer.weight_quantizer
        if not getattr(wq, "enabled", False):
            continue
        w = layer.weight.detach()
        if getattr(wq, "per_channel", False):
            clip = torch.tensor([init_clip(row, wq.bits, True, lower_bound) for row in w])
        else:
            clip = torch.tensor([init_clip(w, wq.bits, True, lower_bound)])
        layer.weight_quantizer = ClippedWeightQuantizer(wq.bits, clip.to(w.device))


def _calibrate_act_clips(student, layers, batches, lower_bound) -> None:
    sites = {name: q for name, q in student.named_modules() if isinstance(q, ActQuantizer) and q.enabled}
    sums = dict.fromkeys(sites, 0.0)

    def keeper(name: str, bits: int):
        def keep(module, inputs, output):
            sums[name] += init_clip(inputs[0], bits, False, lower_bound)
            return inputs[0]  # calibrate on the float activations of the float-activation model
        return keep

    handles = [q.register_forward_hook(keeper(n, q.bits)) for n, q in sites.items()]
    bits = [layer.weight_quantizer.bits for layer in layers]
    try:
        for layer in layers:
            layer.weight_quantizer.bits = FULL_PRECISION_BITS  # float weights while the clips are measured
        with torch.no_grad():
            for x in batches:
                student(x)
    finally:
        for h in handles:
            h.remove()
        for layer, b in zip(layers, bits):
            layer.weight_quantizer.bits = b
    for name, q in sites.items():
        parent, _, child = name.rpartition(".")
        setattr(student.get_submodule(parent) if parent else student, child,
                ClippedActQuantizer(q.bits, sums[name] / len(batches)).to(batches[0].device))
