"""The ATen fake-quant kernels (`torch.fake_quantize_*`): the `torch` backend, and the reference every other
backend is tested against. They run on CPU and CUDA and give a straight-through gradient with a clamp mask."""

from __future__ import annotations

import torch


class TorchBuiltinBackend:
    """The ATen kernels; the reference every other backend is tested against."""

    name = "torch"

    def per_tensor(self, x, scale, zero_point, qmin, qmax):
        return torch.fake_quantize_per_tensor_affine(x, scale.float(), zero_point.to(torch.int32), qmin, qmax)

    def per_channel(self, x, scale, zero_point, axis, qmin, qmax):
        return torch.fake_quantize_per_channel_affine(x, scale.float(), zero_point.to(torch.int32), axis, qmin, qmax)

    def learnable_per_tensor(self, x, scale, zero_point, qmin, qmax, grad_factor=1.0):
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, qmin, qmax, grad_factor)

    def learnable_per_channel(self, x, scale, zero_point, axis, qmin, qmax, grad_factor=1.0):
        return torch._fake_quantize_learnable_per_channel_affine(x, scale, zero_point, axis, qmin, qmax, grad_factor)
