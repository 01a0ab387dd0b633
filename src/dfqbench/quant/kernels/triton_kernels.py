"""Triton fake-quant kernels: the `triton` backend of the protocol in backend.py.

Numerics are ATen's, bit for bit: ``inv_scale = 1 / scale`` as an IEEE float32 division, ``v = x * inv_scale``
rounded to float32 and then half to even, ``q = v + zp`` (the in-range mask is ``qmin <= q <= qmax``, taken before
the clamp) and ``y = (clamp(q, qmin, qmax) - zp) * scale``. Every kernel is compiled with
``enable_fp_fusion=False``: an FMA would round ``x * inv_scale + c`` once instead of twice and move ties.

Kernels run on CUDA tensors; on CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1 set before this
module is imported). Anywhere else, and for dtypes the kernels do not handle, the methods fall back to the ATen
built-ins, which compute the same values. Importing this module needs `triton`; backend.py imports it lazily
and registers its TritonBackend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .grid import grid_from_range
from .aten import TorchBuiltinBackend

BLOCK = 4096  # elements per program of the elementwise kernels
NUM_WARPS = 8
FUSED_SINGLE_MAX = 8192  # channels up to this size are ranged and quantized by one program, x read once
ROW_MIN = 1024  # per channel, runs of at least this many elements of one channel get their own programs
_RBLOCK = 1024  # partial min/max reduced per step by the grid kernel
_MAX_GRID_Y = 65535  # CUDA's limit on grid dimension 1 (the channel axis of the reduction kernels)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TORCH = TorchBuiltinBackend()
_OPTS = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}


def _opts(block: int) -> dict:
    """Launch options; fewer warps for small blocks (each thread keeps >= 8 elements)."""
    return {**_OPTS, "num_warps": max(1, min(NUM_WARPS, block // 256))}


@triton.jit
def _rint(v, NATIVE: tl.constexpr):
    """Round half to even, as C's nearbyint."""
    if NATIVE:
        r = libdevice.rint(v)
    else:
        # The interpreter has no libdevice. Adding 2^23 to |v| < 2^23 leaves no fraction bits, so the float32
        # adder itself rounds to the nearest integer, ties to even (2^23 is even); larger |v| are integers.
        a = tl.abs(v)
        t = (a + 8388608.0) - 8388608.0
        r = tl.where(a < 8388608.0, tl.where(v < 0, -t, t), v)
    return r


@triton.jit
def _fake_quant(x, scale, inv_scale, zp, qmin, qmax, NATIVE: tl.constexpr):
    """float32 in, float32 out: (y, in-range mask, unclamped q)."""
    q = _rint(x * inv_scale, NATIVE) + zp
    in_range = (q >= qmin) & (q <= qmax)
    y = (tl.minimum(tl.maximum(q, qmin), qmax) - zp) * scale
    return y, in_range, q


@triton.jit
def _out(y, out_ptr, NATIVE: tl.constexpr):
    """y cast for storing at out_ptr. The interpreter truncates float32 -> bfloat16 (GPUs round to nearest
    even, as torch does), so there the rounding is done on the bits."""
    if not NATIVE and out_ptr.dtype.element_ty == tl.bfloat16:
        u = y.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        y = u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y


@triton.jit
def _zero_point(zp, qmin, qmax, ZP_MODE: tl.constexpr, NATIVE: tl.constexpr):
    """ATen's treatment of a zero point: 0 integer as given, 1 round half to even then clamp (learnable forward,
    learnable per-channel backward), 2 clamp(zp + 0.5) truncated (learnable per-tensor backward)."""
    zp = zp.to(tl.float32)
    if ZP_MODE == 1:
        zp = tl.minimum(tl.maximum(_rint(zp, NATIVE), qmin), qmax)
    elif ZP_MODE == 2:
        zp = tl.minimum(tl.maximum(zp + 0.5, qmin), qmax).to(tl.int32).to(tl.float32)
    return zp


@triton.jit
def _channel_offsets(c, j, n_per_ch, inner, C, CONTIG: tl.constexpr):
    """Memory offsets of elements j of channel c in a dense tensor laid out as [outer, C, inner]."""
    if CONTIG:  # outer == 1: the channel is one contiguous run
        offs = c * n_per_ch + j
    else:
        offs = (j // inner) * (C * inner) + c * inner + j % inner
    return offs


@triton.jit
def _asym_grid(lo, hi, qmax, NATIVE: tl.constexpr):
    """ranges.grid_from_range, asymmetric: widen to contain 0, scale = max((hi - lo) / qmax, 1e-8),
    zp = clamp(0 - round(lo / scale), 0, qmax). Divisions are IEEE (div_rn), as torch's."""
    lo = tl.minimum(lo, 0.0)
    hi = tl.maximum(hi, 0.0)
    scale = tl.maximum(tl.div_rn(hi - lo, qmax), 1e-8)
    zp = tl.minimum(tl.maximum(0.0 - _rint(tl.div_rn(lo, scale), NATIVE), 0.0), qmax)
    return scale, zp


@triton.jit
def _fq_kernel(x_ptr, y_ptr, mask_ptr, scale_ptr, zp_ptr, numel, inner, C, qmin, qmax, LAYOUT: tl.constexpr,
               ZP_MODE: tl.constexpr, WRITE_MASK: tl.constexpr, BLOCK: tl.constexpr, NATIVE: tl.constexpr,
               IDX64: tl.constexpr):
    """Elementwise fake quant. LAYOUT 0: per tensor, over the memory. 1: per channel, grid (rows, blocks) over
    the [outer * C, inner] rows, so that each program has one channel (one reciprocal, no index division).
    2: per channel over the memory, channel = (offset // inner) % C (for small `inner`)."""
    if LAYOUT == 1:
        row = tl.program_id(0)
        blk = tl.program_id(1)
        if IDX64:
            row = row.to(tl.int64)
        j = blk * BLOCK + tl.arange(0, BLOCK)
        m = j < inner
        offs = row * inner + j
        scale = tl.load(scale_ptr + row % C)
        zp = tl.load(zp_ptr + row % C)
    else:
        pid = tl.program_id(0)
        if IDX64:
            pid = pid.to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        if LAYOUT == 2:
            ch = (offs // inner) % C
            scale = tl.load(scale_ptr + ch, mask=m, other=1.0)
            zp = tl.load(zp_ptr + ch, mask=m, other=0)
        else:
            scale = tl.load(scale_ptr)
            zp = tl.load(zp_ptr)
    zp = _zero_point(zp, qmin, qmax, ZP_MODE, NATIVE)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y, in_range, _ = _fake_quant(x, scale, tl.div_rn(1.0, scale), zp, qmin, qmax, NATIVE)
    tl.store(y_ptr + offs, _out(y, y_ptr, NATIVE), mask=m)
    if WRITE_MASK:
        tl.store(mask_ptr + offs, in_range, mask=m)


@triton.jit
def _lsq_bwd_kernel(x_ptr, gy_ptr, dx_ptr, ds_ptr, dz_ptr, scale_ptr, zp_ptr, n_per_ch, inner, C, qmin, qmax,
                    grad_factor, ZP_MODE: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr,
                    NATIVE: tl.constexpr, IDX64: tl.constexpr):
    """Learnable fake-quant backward, grid (splits, channels): dx, and per-program partial sums of the scale and
    zero-point gradients (ATen's per-element formulas; per tensor is one channel)."""
    blk = tl.program_id(0)
    c = tl.program_id(1)
    nsplit = tl.num_programs(0)
    if IDX64:
        blk = blk.to(tl.int64)
        c = c.to(tl.int64)
    j = blk * BLOCK + tl.arange(0, BLOCK)
    m = j < n_per_ch
    offs = _channel_offsets(c, j, n_per_ch, inner, C, CONTIG)
    scale = tl.load(scale_ptr + c)
    zp = _zero_point(tl.load(zp_ptr + c), qmin, qmax, ZP_MODE, NATIVE)
    inv_scale = tl.div_rn(1.0, scale)
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    g = tl.load(gy_ptr + offs, mask=m, other=0.0)
    xfq, in_range, q = _fake_quant(x, scale, inv_scale, zp, qmin, qmax, NATIVE)
    tl.store(dx_ptr + offs, g * in_range.to(tl.float32), mask=m)
    # d y / d scale: (xfq - x) / scale inside the range, qmin - zp or qmax - zp where clamped (LSQ);
    # d y / d zp: 0 inside, -scale where clamped. Same operation order as ATen's CPU/CUDA kernels.
    ds_out = tl.where(q < qmin, (g * (qmin - zp)) * grad_factor, (g * (qmax - zp)) * grad_factor)
    ds = tl.where(in_range, ((g * (xfq - x)) * inv_scale) * grad_factor, ds_out)
    dz = tl.where(in_range, 0.0, ((g * -1.0) * scale) * grad_factor)
    tl.store(ds_ptr + c * nsplit + blk, tl.sum(tl.where(m, ds, 0.0), axis=0))
    tl.store(dz_ptr + c * nsplit + blk, tl.sum(tl.where(m, dz, 0.0), axis=0))


@triton.jit
def _fused_minmax_fq_kernel(x_ptr, y_ptr, mask_ptr, scale_ptr, zp_ptr, n_per_ch, inner, C, qmax,
                            CONTIG: tl.constexpr, WRITE_MASK: tl.constexpr, BLOCK: tl.constexpr,
                            NATIVE: tl.constexpr, IDX64: tl.constexpr):
    """One program per channel: min/max, asymmetric grid and fake quant with the channel held in registers."""
    c = tl.program_id(0)
    if IDX64:
        c = c.to(tl.int64)
    j = tl.arange(0, BLOCK)
    m = j < n_per_ch
    offs = _channel_offsets(c, j, n_per_ch, inner, C, CONTIG)
    # Padding lanes read 0: harmless, the range is widened to contain 0 anyway.
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    scale, zp = _asym_grid(tl.min(x, axis=0), tl.max(x, axis=0), qmax, NATIVE)
    y, in_range, _ = _fake_quant(x, scale, tl.div_rn(1.0, scale), zp, 0.0, qmax, NATIVE)
    tl.store(y_ptr + offs, _out(y, y_ptr, NATIVE), mask=m)
    if WRITE_MASK:
        tl.store(mask_ptr + offs, in_range, mask=m)
    tl.store(scale_ptr + c, scale)
    tl.store(zp_ptr + c, zp.to(tl.int32))


@triton.jit
def _minmax_partial_kernel(x_ptr, pmin_ptr, pmax_ptr, n_per_ch, inner, C, CONTIG: tl.constexpr,
                           BLOCK: tl.constexpr, IDX64: tl.constexpr):
    """Large channels, step 1: min/max of each block, grid (splits, channels)."""
    blk = tl.program_id(0)
    c = tl.program_id(1)
    nsplit = tl.num_programs(0)
    if IDX64:
        blk = blk.to(tl.int64)
        c = c.to(tl.int64)
    j = blk * BLOCK + tl.arange(0, BLOCK)
    offs = _channel_offsets(c, j, n_per_ch, inner, C, CONTIG)
    x = tl.load(x_ptr + offs, mask=j < n_per_ch, other=0.0).to(tl.float32)
    tl.store(pmin_ptr + c * nsplit + blk, tl.min(x, axis=0))
    tl.store(pmax_ptr + c * nsplit + blk, tl.max(x, axis=0))


@triton.jit
def _grid_from_partials_kernel(pmin_ptr, pmax_ptr, scale_ptr, zp_ptr, nsplit, qmax, RBLOCK: tl.constexpr,
                               NATIVE: tl.constexpr):
    """Large channels, step 2: one program per channel reduces the partials and writes (scale, zero point)."""
    c = tl.program_id(0).to(tl.int64)
    lo = tl.zeros([RBLOCK], dtype=tl.float32)  # starting at 0 is the widening to contain 0
    hi = tl.zeros([RBLOCK], dtype=tl.float32)
    for start in range(0, nsplit, RBLOCK):
        k = start + tl.arange(0, RBLOCK)
        lo = tl.minimum(lo, tl.load(pmin_ptr + c * nsplit + k, mask=k < nsplit, other=0.0))
        hi = tl.maximum(hi, tl.load(pmax_ptr + c * nsplit + k, mask=k < nsplit, other=0.0))
    scale, zp = _asym_grid(tl.min(lo, axis=0), tl.max(hi, axis=0), qmax, NATIVE)
    tl.store(scale_ptr + c, scale)
    tl.store(zp_ptr + c, zp.to(tl.int32))


def interpreted() -> bool:
    """Whether the kernels were defined under Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_fq_kernel).__name__ == "InterpretedFunction"


def _runs_here(x: torch.Tensor) -> bool:
    return (x.is_cuda or interpreted()) and x.dtype in _DTYPES and x.numel() > 0


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when its memory is one dense block (contiguous or channels_last), else a contiguous copy."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t with x's memory layout (dense x), so that both can be walked by the same offsets."""
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


def _channels(x: torch.Tensor, axis: int) -> tuple[int, int, int, int]:
    """(axis, C, inner, outer): a dense x is [outer, C, inner] in memory, whatever its dimension order."""
    axis = axis % x.dim()
    C = x.shape[axis]
    inner = x.stride(axis) if C > 1 else 1
    return axis, C, inner, x.numel() // (C * inner)


def _idx64(x: torch.Tensor) -> bool:
    return x.numel() + BLOCK >= 2**31


def _forward(x, scale, zero_point, axis, qmin, qmax, zp_mode, want_mask):
    """Launch the elementwise kernel; returns (y, mask or None)."""
    y = torch.empty_like(x)
    mask = torch.empty_like(x, dtype=torch.bool) if want_mask else y
    block, C, inner = BLOCK, 1, 1
    grid = (triton.cdiv(x.numel(), BLOCK),)
    layout = 0
    if axis is not None:
        _, C, inner, outer = _channels(x, axis)
        layout = 2
        if inner >= ROW_MIN and triton.cdiv(inner, BLOCK) <= _MAX_GRID_Y:
            layout, block = 1, min(BLOCK, triton.next_power_of_2(inner))
            grid = (outer * C, triton.cdiv(inner, block))
    _fq_kernel[grid](x, y, mask, scale, zero_point, x.numel(), inner, C, float(qmin), float(qmax), LAYOUT=layout,
                     ZP_MODE=zp_mode, WRITE_MASK=want_mask, BLOCK=block, NATIVE=not interpreted(),
                     IDX64=_idx64(x), **_opts(block))
    return y, (mask if want_mask else None)


def _check_channels(x, scale, axis):
    if axis is not None and scale.numel() != x.shape[axis % x.dim()]:
        raise ValueError(f"per-channel fake quant: {scale.numel()} scales for {x.shape[axis % x.dim()]} "
                         f"channels along axis {axis} of a {tuple(x.shape)} tensor")


class _FakeQuantSTE(torch.autograd.Function):
    """Fixed-grid fake quant; gradient for x only: grad_out * in-range mask (ATen's cachemask backward)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, axis, qmin, qmax, want_mask):
        y, mask = _forward(x, scale, zero_point, axis, qmin, qmax, zp_mode=0, want_mask=want_mask)
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return (grad * mask if mask is not None else None), None, None, None, None, None, None


class _LearnableFakeQuant(torch.autograd.Function):
    """LSQ-style: gradients for x, scale and zero point, as torch._fake_quantize_learnable_per_*_affine."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, axis, qmin, qmax, grad_factor):
        y, _ = _forward(x, scale, zero_point, axis, qmin, qmax, zp_mode=1, want_mask=False)
        ctx.save_for_backward(x, scale, zero_point)
        ctx.args = (axis, qmin, qmax, grad_factor)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        axis, qmin, qmax, grad_factor = ctx.args
        if axis is None:  # per tensor: one channel of all elements; ATen rounds zp differently here
            C, inner, n_per_ch, contig, zp_mode = 1, 1, x.numel(), True, 2
        else:
            _, C, inner, outer = _channels(x, axis)
            n_per_ch, contig, zp_mode = x.numel() // C, outer == 1, 1
        nsplit = triton.cdiv(n_per_ch, BLOCK)
        dx = torch.empty_like(x)
        ds = torch.empty(C, nsplit, device=x.device, dtype=torch.float32)
        dz = torch.empty_like(ds)
        _lsq_bwd_kernel[(nsplit, C)](
            x, _like(grad, x), dx, ds, dz, scale, zero_point, n_per_ch, inner, C, float(qmin), float(qmax),
            float(grad_factor), ZP_MODE=zp_mode, CONTIG=contig, BLOCK=BLOCK, NATIVE=not interpreted(),
            IDX64=_idx64(x), **_OPTS)
        return dx, ds.sum(1).reshape(scale.shape), dz.sum(1).reshape(zero_point.shape), None, None, None, None


class _FusedMinMaxFakeQuant(torch.autograd.Function):
    """Per-channel min/max range + asymmetric grid + fake quant; STE gradient for x, the range held constant."""

    @staticmethod
    def forward(ctx, x, bits, axis, want_mask):
        axis, C, inner, outer = _channels(x, axis)
        n_per_ch, qmax, native = x.numel() // C, float(2**bits - 1), not interpreted()
        y = torch.empty_like(x)
        mask = torch.empty_like(x, dtype=torch.bool) if want_mask else y
        scale = torch.empty(C, device=x.device, dtype=torch.float32)
        zero_point = torch.empty(C, device=x.device, dtype=torch.int32)
        if n_per_ch <= FUSED_SINGLE_MAX:
            block = triton.next_power_of_2(n_per_ch)
            _fused_minmax_fq_kernel[(C,)](
                x, y, mask, scale, zero_point, n_per_ch, inner, C, qmax, CONTIG=outer == 1,
                WRITE_MASK=want_mask, BLOCK=block, NATIVE=native, IDX64=_idx64(x), **_opts(block))
        else:  # min/max partials, then the grid, then the per-channel kernel: x is read twice
            nsplit = triton.cdiv(n_per_ch, BLOCK)
            pmin = torch.empty(C, nsplit, device=x.device, dtype=torch.float32)
            pmax = torch.empty_like(pmin)
            _minmax_partial_kernel[(nsplit, C)](x, pmin, pmax, n_per_ch, inner, C, CONTIG=outer == 1, BLOCK=BLOCK,
                                                IDX64=_idx64(x), **_OPTS)
            _grid_from_partials_kernel[(C,)](pmin, pmax, scale, zero_point, nsplit, qmax, RBLOCK=_RBLOCK,
                                             NATIVE=native, **_OPTS)
            y, mask = _forward(x, scale, zero_point, axis, 0, 2**bits - 1, zp_mode=0, want_mask=want_mask)
        ctx.save_for_backward(mask if want_mask else None)
        ctx.mark_non_differentiable(scale, zero_point)
        return y, scale, zero_point

    @staticmethod
    def backward(ctx, grad, _grad_scale, _grad_zp):
        (mask,) = ctx.saved_tensors
        return (grad * mask if mask is not None else None), None, None, None


def _want_mask(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _param(t: torch.Tensor, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A qparam as a flat tensor on x's device (autograd-transparent, so learnable ones keep their gradient)."""
    return t.reshape(-1).to(device=x.device, dtype=dtype or t.dtype)


def _reduction_fits(x: torch.Tensor, axis: int | None) -> bool:
    """The reduction kernels put channels on grid axis 1 and splits on axis 0."""
    C = 1 if axis is None else x.shape[axis % x.dim()]
    return C <= _MAX_GRID_Y


class TritonBackend:
    """The protocol of backend.FakeQuantBackend on Triton kernels (ATen built-ins where the kernels cannot run)."""

    name = "triton"

    def per_tensor(self, x, scale, zero_point, qmin, qmax):
        if not _runs_here(x):
            return _TORCH.per_tensor(x, scale, zero_point, qmin, qmax)
        return _FakeQuantSTE.apply(_dense(x), _param(scale, x, torch.float32), _param(zero_point, x), None,
                                   qmin, qmax, _want_mask(x))

    def per_channel(self, x, scale, zero_point, axis, qmin, qmax):
        if not _runs_here(x):
            return _TORCH.per_channel(x, scale, zero_point, axis, qmin, qmax)
        _check_channels(x, scale, axis)
        return _FakeQuantSTE.apply(_dense(x), _param(scale, x, torch.float32), _param(zero_point, x), axis,
                                   qmin, qmax, _want_mask(x))

    def learnable_per_tensor(self, x, scale, zero_point, qmin, qmax, grad_factor=1.0):
        if not (_runs_here(x) and x.dtype == torch.float32):
            return _TORCH.learnable_per_tensor(x, scale, zero_point, qmin, qmax, grad_factor)
        return _LearnableFakeQuant.apply(_dense(x), _param(scale, x, torch.float32),
                                         _param(zero_point, x, torch.float32), None, qmin, qmax, grad_factor)

    def learnable_per_channel(self, x, scale, zero_point, axis, qmin, qmax, grad_factor=1.0):
        if not (_runs_here(x) and x.dtype == torch.float32 and _reduction_fits(x, axis)):
            return _TORCH.learnable_per_channel(x, scale, zero_point, axis, qmin, qmax, grad_factor)
        _check_channels(x, scale, axis)
        return _LearnableFakeQuant.apply(_dense(x), _param(scale, x, torch.float32),
                                         _param(zero_point, x, torch.float32), axis, qmin, qmax, grad_factor)


def fused_minmax_fake_quant_per_channel(x: torch.Tensor, bits: int, axis: int = 0):
    """Range each channel along `axis` by its min/max (widened to contain 0), build the asymmetric
    ``[0, 2^bits - 1]`` grid of grid.grid_from_range and fake-quantize, in one kernel launch (channels larger
    than FUSED_SINGLE_MAX take three launches and read x twice). Returns ``(y, scale[C] float32,
    zero_point[C] int32)``; y has the straight-through gradient of the fixed-grid op."""
    if not (_runs_here(x) and _reduction_fits(x, axis)):
        return _torch_minmax_fake_quant_per_channel(x, bits, axis)
    return _FusedMinMaxFakeQuant.apply(_dense(x), bits, axis, _want_mask(x))


def _torch_minmax_fake_quant_per_channel(x, bits, axis):
    """The same with torch ops: amin/amax, grid.grid_from_range, the ATen per-channel kernel."""
    axis = axis % x.dim()
    dims = [d for d in range(x.dim()) if d != axis]
    xd = x.detach()
    lo, hi = (xd.amin(dim=dims), xd.amax(dim=dims)) if dims else (xd, xd)
    grid = grid_from_range(lo, hi, bits, symmetric=False)
    y = torch.fake_quantize_per_channel_affine(x, grid.scale, grid.zero_point, axis, grid.qmin, grid.qmax)
    return y, grid.scale, grid.zero_point
