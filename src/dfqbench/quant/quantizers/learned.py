"""Learnable quantizer state for reconstruction (BRECQ / QDrop / Genie), attached to a wrapped model for the time
of the optimization and replaced by plain frozen fake-quant afterwards.

- `AdaRoundWeight` takes a layer's WeightQuantizer place: the integer base floor(W / s0) is fixed on the
  quantizer's grid, a rounding logit per weight decides up or down through a rectified sigmoid (AdaRound), and
  the step size s may be learned (Genie). `harden()` returns a `HardenedWeightQuantizer` holding the chosen
  integer weights.
- `LsqAct` patches an ActQuantizer's forward with an LSQ-learned step and QDrop's per-element dropping (one
  fused autograd op with the LSQ gradients of the backend's `learnable_*` kernels); `detach()` writes the
  learned grid back into the ActQuantizer as a frozen range.
- `float_mode` runs a wrapped model with every quantizer bypassed (the FP32 reference on the same graph).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from .core import ActQuantizer, WeightQuantizer
from .layers import QuantLayer
from .ranges import Grid

GAMMA, ZETA = -0.1, 1.1  # AdaRound's rectified-sigmoid stretch


def rectified_sigmoid(logits: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(logits) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """Logits whose rectified sigmoid is `h` (h in [0, 1))."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def _channel_shape(scale: torch.Tensor, dims: int, axis: int) -> list[int]:
    """Broadcast shape of a per-tensor ([] / [1]) or per-channel ([C] along `axis`) step over a `dims`-d tensor."""
    if scale.numel() == 1:
        return [1] * dims
    shape = [1] * dims
    shape[axis] = scale.numel()
    return shape


class HardenedWeightQuantizer(WeightQuantizer):
    """A weight quantizer whose rounding was learned: stores the integer weights and returns them dequantized.

    The rounding cannot be re-derived from the float weight, so `calibrate`/`reset` keep it; the gradient passes
    straight through to the float weight, as in every other weight quantizer.
    """

    def __init__(self, like: WeightQuantizer, int_weight: torch.Tensor, scale: torch.Tensor,
                 zero_point: torch.Tensor, qmin: int, qmax: int):
        super().__init__(like.bits, per_channel=like.per_channel, symmetric=like.symmetric,
                         estimator=like.estimator, lp=like.lp)
        self.register_buffer("int_weight", int_weight.to(torch.int16))
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", zero_point.detach().float().clone())
        self.qmin, self.qmax = qmin, qmax
        shape = [-1] if self.scale.numel() > 1 else []
        self.grid = Grid(self.scale.reshape(shape), self.zero_point.reshape(shape).round().to(torch.int32), qmin,
                         qmax)  # for inspection

    def reset(self) -> None:  # the rounding is data-dependent: nothing to recompute
        pass

    def calibrate(self, weight: torch.Tensor) -> None:
        pass

    def dequantized(self) -> torch.Tensor:
        return (self.int_weight.float() - self.zero_point) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        q = self.dequantized().to(weight.dtype)
        if weight.requires_grad and torch.is_grad_enabled():
            return weight + (q - weight).detach()
        return q


class AdaRoundWeight(nn.Module):
    """Learned rounding of a fixed weight on the WeightQuantizer's grid (AdaRound), optionally learned step.

    w_q = s * (clamp(floor(W / s0) + h(V) + z, qmin, qmax) - z), h = rectified sigmoid. The logits start at
    h(V) = W / s0 - floor(W / s0), so hard rounding (V >= 0) before any step is round-to-nearest.
    """

    def __init__(self, quantizer: WeightQuantizer, weight: torch.Tensor, learn_scale: bool = True):
        super().__init__()
        if quantizer.grid is None:
            quantizer.calibrate(weight)
        grid = quantizer.grid
        self.like = quantizer
        self.qmin, self.qmax = grid.qmin, grid.qmax
        shape = _channel_shape(grid.scale, weight.dim(), 0)
        scale0 = grid.scale.detach().float().reshape(shape).to(weight.device)
        self.scale = nn.Parameter(scale0.clone(), requires_grad=learn_scale)
        self.register_buffer("zero_point", grid.zero_point.float().reshape(shape).to(weight.device))
        scaled = weight.detach().float() * (1.0 / scale0)  # x * (1 / s): as the fake-quant kernels compute it
        self.register_buffer("floor", scaled.floor())
        self.logits = nn.Parameter(inverse_rectified_sigmoid(scaled - self.floor))
        self.soft = True  # soft rounding while optimizing; hard (V >= 0) otherwise

    def rounding(self) -> torch.Tensor:
        return rectified_sigmoid(self.logits) if self.soft else (self.logits >= 0).float()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(self.floor + self.rounding() + self.zero_point, self.qmin, self.qmax)
        return ((q - self.zero_point) * self.scale).to(weight.dtype)

    def regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's sum of 1 - |2h - 1|^beta: pushes every h to 0 or 1 as beta falls."""
        return (1.0 - (2.0 * rectified_sigmoid(self.logits) - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def harden(self) -> HardenedWeightQuantizer:
        ints = torch.clamp(self.floor + (self.logits >= 0).float() + self.zero_point, self.qmin, self.qmax)
        return HardenedWeightQuantizer(self.like, ints.round(), self.scale.clamp_min(1e-8), self.zero_point,
                                       self.qmin, self.qmax)


class _LsqDrop(torch.autograd.Function):
    """LSQ fake quantization (gradients to x inside the grid and to the step, as the backend's `learnable_*`
    kernels give) fused with QDrop: where the float mask `keep_float` is 1 the output is x itself. Masks are
    arithmetic, not boolean (torch.where / masked_fill are several times slower on CPU); the fused op saves
    several passes over the activation per step, which is most of a CPU iteration's cost."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, keep_float, qmin, qmax):
        v = x * (1.0 / scale)  # as the fake-quant kernels compute it
        rounded = torch.round(v)
        r = (rounded + zero_point).clamp_(qmin, qmax).sub_(zero_point)
        inside = (r == rounded).to(x.dtype)  # the clamp did not act
        out = r * scale
        coef = torch.addcmul(r, v, inside, value=-1.0)  # d out / d scale: round(v) - v inside, the level outside
        if keep_float is not None:
            out = torch.lerp(out, x, keep_float)
            coef = torch.addcmul(coef, coef, keep_float, value=-1.0)
            inside = torch.maximum(inside, keep_float)
        ctx.save_for_backward(inside, coef)
        ctx.scale_shape = scale.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        pass_x, coef = ctx.saved_tensors
        dims = [d for d in range(grad.dim()) if ctx.scale_shape[d] == 1]
        grad_s = (grad * coef).sum(dim=dims, keepdim=True).reshape(ctx.scale_shape)
        return grad * pass_x, grad_s, None, None, None, None


def lsq_fake_quant(x, scale, zero_point, qmin, qmax, keep_float=None):
    """`scale`/`zero_point` broadcast against x (per tensor: shape [1, ...]; per channel: [1, C, 1, ...]);
    `keep_float` is None or a 0/1 float tensor like x."""
    return _LsqDrop.apply(x, scale, zero_point, keep_float, qmin, qmax)


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def bernoulli_mask(like: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A 0/1 float tensor shaped (and laid out) like `like`, each element 1 with probability p. p = 0.5 (QDrop's)
    draws random bytes and splits them into bits: a quarter of the cost of torch.rand on CPU."""
    order = sorted(range(like.dim()), key=lambda d: -like.stride(d))  # the memory layout, outermost first
    shape = [like.shape[d] for d in order]
    n = like.numel()
    if p == 0.5:
        raw = torch.randint(0, 256, ((n + 7) // 8, 1), dtype=torch.uint8, generator=generator, device=like.device)
        bits = (raw >> _BIT_SHIFTS.to(like.device)) & 1
        mask = bits.reshape(-1)[:n].reshape(shape).to(like.dtype)
    else:
        mask = (torch.rand(shape, generator=generator, device=like.device) < p).to(like.dtype)
    return mask.permute([order.index(d) for d in range(like.dim())])


class LsqAct(nn.Module):
    """LSQ-learned step for a calibrated ActQuantizer, with QDrop: while `drop_p` > 0 each element keeps its
    float value with probability `drop_p` (quantization dropped) and is fake-quantized otherwise."""

    def __init__(self, quantizer: ActQuantizer, generator: torch.Generator | None = None):
        super().__init__()
        if quantizer.grid is None:
            raise ValueError("LsqAct needs a calibrated ActQuantizer")
        grid = quantizer.grid
        self.quantizer, self.generator = quantizer, generator
        self.qmin, self.qmax = grid.qmin, grid.qmax
        self.scale = nn.Parameter(grid.scale.detach().float().reshape(-1).clone())
        self.register_buffer("zero_point", grid.zero_point.detach().float().reshape(-1).clone())
        self.drop_p = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = _channel_shape(self.scale, x.dim(), 1)
        keep_float = bernoulli_mask(x, self.drop_p, self.generator) if self.drop_p > 0.0 else None
        return lsq_fake_quant(x, self.scale.clamp_min(1e-8).reshape(shape), self.zero_point.reshape(shape),
                              self.qmin, self.qmax, keep_float)

    def attach(self) -> "LsqAct":
        """From now on the ActQuantizer's forward is this module's (the graph keeps calling the ActQuantizer)."""
        self.quantizer.forward = self.forward
        return self

    @torch.no_grad()
    def detach(self) -> ActQuantizer:
        """Restore the ActQuantizer's own forward with the learned grid as its frozen range."""
        self.quantizer.__dict__.pop("forward", None)
        s = self.scale.clamp_min(1e-8)
        if self.quantizer.symmetric:
            hi = s * self.qmax
            lo = -hi if self.qmin < 0 else torch.zeros_like(hi)
        else:
            lo, hi = (self.qmin - self.zero_point) * s, (self.qmax - self.zero_point) * s
        self.quantizer.set_range(lo if lo.numel() > 1 else lo.reshape(()), hi if hi.numel() > 1 else hi.reshape(()))
        return self.quantizer


@contextlib.contextmanager
def float_mode(model: nn.Module):
    """Bypass every activation quantizer and run every quantized layer with its float weight."""
    saved = []
    for mod in model.modules():
        if isinstance(mod, ActQuantizer):
            saved.append((mod, mod.__dict__.get("forward")))
            mod.forward = _identity
        elif isinstance(mod, QuantLayer):
            saved.append((mod, mod.__dict__.get("forward")))
            mod.forward = mod.float_forward
    try:
        yield model
    finally:
        for mod, previous in saved:
            if previous is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = previous


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
