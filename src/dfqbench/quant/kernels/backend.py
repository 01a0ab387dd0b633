"""Fake-quantization kernel backends.

Every quantizer in dfqbench calls its numeric kernel through the backend selected here (the AIMET v2 pattern:
a small protocol, a name -> implementation table and a context manager to switch). `torch` uses the ATen
built-ins (`torch.fake_quantize_*`), which run on CPU and CUDA and give a straight-through gradient with a
clamp mask (aten.py); `triton` (triton_kernels.py) agrees with them bit for bit. It is imported lazily, the first time
`triton` or `auto` on CUDA is asked for (or the choices are listed), so that dfqbench never needs triton installed.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch

from .aten import TorchBuiltinBackend


class FakeQuantBackend(Protocol):
    """Affine fake quantization: ``(clamp(round_half_even(x * (1/scale)) + zp, qmin, qmax) - zp) * scale``."""

    def per_tensor(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   qmin: int, qmax: int) -> torch.Tensor:
        """STE gradient for x (zero outside the clamp range); scale and zero_point are 1-element tensors."""

    def per_channel(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
                    qmin: int, qmax: int) -> torch.Tensor:
        """As per_tensor, with one (scale, zero_point) per slice along `axis`."""

    def learnable_per_tensor(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                             qmin: int, qmax: int, grad_factor: float = 1.0) -> torch.Tensor:
        """LSQ-style: gradients flow to x, scale and zero_point (float tensors)."""

    def learnable_per_channel(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                              axis: int, qmin: int, qmax: int, grad_factor: float = 1.0) -> torch.Tensor:
        """LSQ-style, one learnable (scale, zero_point) per slice along `axis`."""


_BACKENDS: dict[str, FakeQuantBackend] = {"torch": TorchBuiltinBackend()}
_active = "torch"
_UNAVAILABLE: dict[str, str] = {}  # optional backend -> why it could not be imported


def add_backend(name: str, backend: FakeQuantBackend) -> None:
    """Register a backend (e.g. Triton) under `name`."""
    _BACKENDS[name] = backend


def _load_triton() -> None:
    """Register the Triton backend if `import triton` works (once; a failure is remembered for the message)."""
    if "triton" in _BACKENDS or "triton" in _UNAVAILABLE:
        return
    try:
        from .triton_kernels import TritonBackend
    except ImportError as exc:
        _UNAVAILABLE["triton"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return
    add_backend("triton", TritonBackend())


def available_backends() -> list[str]:
    _load_triton()
    return sorted(_BACKENDS) + ["auto"]


def resolve_backend_name(name: str, device: torch.device | str = "cpu") -> str:
    """`auto` picks the Triton kernels on CUDA when triton imports, and the torch built-ins elsewhere."""
    if name == "auto":
        if torch.device(device).type != "cuda":
            return "torch"
        _load_triton()
        return "triton" if "triton" in _BACKENDS else "torch"
    if name not in _BACKENDS:
        choices = ", ".join(available_backends())  # imports triton if it can
        if name in _UNAVAILABLE:
            raise ValueError(f"quant.backend={name!r} is not available here ({_UNAVAILABLE[name]}); "
                             f"choose one of: {choices}")
        if name not in _BACKENDS:
            raise ValueError(f"unknown quant.backend={name!r}; choose one of: {choices}")
    return name


def get_backend() -> FakeQuantBackend:
    return _BACKENDS[_active]


def set_backend(name: str) -> None:
    global _active
    _active = resolve_backend_name(name)


@contextlib.contextmanager
def use_backend(name: str):
    global _active
    previous, _active = _active, resolve_backend_name(name)
    try:
        yield get_backend()
    finally:
        _active = previous
