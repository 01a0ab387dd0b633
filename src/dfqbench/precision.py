"""Config `precision`: the arithmetic of the networks that only make data, the teacher and the generator.

"fp32" (the default, the papers') runs everything in float32. "bf16" runs the teacher's forward and backward in
the shared image-synthesis loop (synth.bn_loop: ZeroQ, DSG, Genie, IntraQ, HAST, ...) and the teacher's and
generator's in the generator-QAT trainer under bfloat16 autocast (their convolutions and linear layers in bf16).
What a loss reads comes back as float32 (`as_float32`: logits, BN inputs, tapped features, generated images), and
the optimized images, the generator's parameters and the quantized student stay float32, so the student's
fake-quant grid is never computed in bf16. On CPUs with AVX512-BF16 or AMX, and on GPUs, that is faster; whether
accuracy allows it is measured per method (results/explore/zeroq-bf16/, results/explore/gdfq-bf16/).

The runner opens a `scope` around a method's quantize; the loops call `autocast` and count each use, so that the
runner can warn when a non-fp32 precision reached nothing (rtn, PSAQ-ViT's own loop, ...).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # config value -> the autocast dtype (None: off)


class PrecisionScope:
    """The precision in force, and how many loops ran under it."""

    def __init__(self, name: str):
        self.name, self.uses = name, 0


_scope = PrecisionScope("fp32")


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"precision={name!r} is not valid; choose one of: {', '.join(PRECISIONS)}")
    return name


@contextmanager
def scope(name: str):
    """Every synthesis loop and trainer inside runs its data-making networks at this precision; yields the scope."""
    global _scope
    previous, _scope = _scope, PrecisionScope(check_precision(name))
    try:
        yield _scope
    finally:
        _scope = previous


def current() -> str:
    return _scope.name


def autocast(device: torch.device):
    """A reusable context for the current precision on `device` (nullcontext for fp32); counts as one use."""
    _scope.uses += 1
    dtype = PRECISIONS[_scope.name]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def as_float32(x):
    """A value as the losses read it: a bf16/fp16 tensor (from a forward under autocast) in float32, a list or
    tuple element-wise; a float32 tensor is the same object, not a copy."""
    if isinstance(x, (list, tuple)):
        return type(x)(as_float32(v) for v in x)
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float32:
        return x.float()
    return x
