"""The `torch` backend: fake quantization from torch ops, no custom kernels; the reference other backends match.

On CUDA it calls ATen's fused kernels (`torch.fake_quantize_*`). On CPU those kernels run a scalar loop
(`std::nearbyint` per element: 0.01-0.03x of copy bandwidth on an AMD EPYC, results/bench/fakequant_cpu.md), so
float32 CPU tensors take a vectorised formula instead, equal to ATen's value for value (tests/test_fakequant_cpu.py):

    round_half_even(x * (1/scale)) + zp, clamped to [qmin, qmax], minus zp, times scale
      == clamp(round_half_even(x * (1/scale)), qmin - zp, qmax - zp) * scale

(the zero point is an integer, so adding it and taking it off again is exact): four passes, three in place. Where
the C kernel builds (kernels/cpu_ext.py: the same formula in one OpenMP pass, rint = round half to even), it runs
instead for contiguous and channels_last tensors; the values are the same bit for bit.
Differences, both outside what a number can depend on: a value that rounds to zero keeps its sign (-0.0, ATen
gives +0.0), and NaN stays NaN (ATen maps it to the grid's end). The backward is ATen's: the incoming gradient
where the rounded value lies on the grid, zero where it was clamped.
"""

from __future__ import annotations

import torch

from . import cpu_ext


def _cpu_formula(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32


def _broadcast(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _grid_terms(x, scale, zero_point, axis, qmin, qmax):
    """(1/scale, scale, qmin - zp, qmax - zp): Python floats per tensor (a clamp to 0-d tensor bounds is not
    vectorised), tensors shaped to broadcast against x per channel."""
    scale = _broadcast(scale.float(), x, axis)
    zp = _broadcast(zero_point, x, axis).float()
    inv = scale.reciprocal()  # float32, as ATen's 1.0f / scale
    if axis is None:
        return inv.item(), scale.item(), qmin - zp.item(), qmax - zp.item()
    return inv, scale, qmin - zp, qmax - zp


def _clamp_(t, lo, hi):
    # clamp_ to tensor bounds runs a slow generic loop (20x clamp_min_ + clamp_max_ on these CPUs)
    return t.clamp_(lo, hi) if isinstance(lo, float) else t.clamp_min_(lo).clamp_max_(hi)


def _kernel(x, axis, inv, scale, lo, hi, with_mask):
    """The C kernel's (y, mask), or None where it does not apply (not built, another memory layout)."""
    if cpu_ext.library() is None:
        return None
    if axis is None:
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            return None
        return cpu_ext.per_tensor(x, inv, scale, lo, hi, with_mask)
    layout = cpu_ext.channel_layout(x, axis)
    return None if layout is None else cpu_ext.per_channel(x, layout, inv, scale, lo, hi, with_mask)


class _ClippedFakeQuant(torch.autograd.Function):
    """The formula with ATen's straight-through backward (gradient masked where the value was clamped)."""

    @staticmethod
    def forward(ctx, x, axis, inv, scale, lo, hi):
        done = _kernel(x, axis, inv, scale, lo, hi, with_mask=True)
        if done is not None:
            y, mask = done
            ctx.save_for_backward(mask)
            return y
        rounded = torch.round(x * inv)
        mask = (rounded >= lo) & (rounded <= hi)
        ctx.save_for_backward(mask)
        return _clamp_(rounded, lo, hi).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None, None


def torch_formula(x, inv, scale, lo, hi):
    """The four-pass torch formula (no gradient): the reference the C kernel equals."""
    return _clamp_(torch.mul(x, inv).round_(), lo, hi).mul_(scale)


def _formula(x, scale, zero_point, axis, qmin, qmax):
    inv, scale, lo, hi = _grid_terms(x, scale, zero_point, axis, qmin, qmax)
    if x.requires_grad and torch.is_grad_enabled():
        return _ClippedFakeQuant.apply(x, axis, inv, scale, lo, hi)
    done = _kernel(x, axis, inv, scale, lo, hi, with_mask=False)
    return done[0] if done is not None else torch_formula(x, inv, scale, lo, hi)


class TorchBuiltinBackend:
    """torch ops: ATen's fake-quant kernels on CUDA (and for non-float32 tensors), the formula above on CPU."""

    name = "torch"

    def per_tensor(self, x, scale, zero_point, qmin, qmax):
        if _cpu_formula(x):
            return _formula(x, scale, zero_point, None, qmin, qmax)
        return torch.fake_quantize_per_tensor_affine(x, scale.float(), zero_point.to(torch.int32), qmin, qmax)

    def per_channel(self, x, scale, zero_point, axis, qmin, qmax):
        if _cpu_formula(x):
            return _formula(x, scale, zero_point, axis, qmin, qmax)
        return torch.fake_quantize_per_channel_affine(x, scale.float(), zero_point.to(torch.int32), axis, qmin, qmax)

    def learnable_per_tensor(self, x, scale, zero_point, qmin, qmax, grad_factor=1.0):
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, qmin, qmax, grad_factor)

    def learnable_per_channel(self, x, scale, zero_point, axis, qmin, qmax, grad_factor=1.0):
        return torch._fake_quantize_learnable_per_channel_affine(x, scale, zero_point, axis, qmin, qmax, grad_factor)
