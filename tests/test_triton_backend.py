"""Triton fake-quant kernels against the ATen built-ins (bit for bit) and a float64 reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. Triton reads TRITON_INTERPRET when a kernel
is decorated, its own `tl.sum`/`tl.max` included, so the variable must be set before `triton` is first imported:
this module sets it around its imports (and while its tests run). If something in the session imported triton
earlier without it, the tests here re-run themselves in a fresh `python -m pytest` subprocess instead. With CUDA
(scripts/gpu_check.sh) the kernels run natively on the GPU. Tensors are small: the interpreter runs every program
in numpy.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

NATIVE = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if NATIVE else "cpu"
REPO = Path(__file__).resolve().parents[1]
BITS = range(2, 9)


@contextlib.contextmanager
def _interpreter_env():
    saved = os.environ.get("TRITON_INTERPRET")
    if not NATIVE:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


with _interpreter_env():
    triton = pytest.importorskip("triton", reason="triton is not installed: the Triton backend is optional")
    # False when triton.language was imported earlier in this process without the interpreter
    IN_PROCESS = NATIVE or type(triton.language.standard.sum).__name__ == "InterpretedFunction"
    import dfqbench.quant.kernels.triton_kernels as tb

    if IN_PROCESS and tb.interpreted() == NATIVE:  # the backend was imported in the other mode: redefine kernels
        tb = importlib.reload(tb)
BACKEND = tb.TritonBackend()


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    with _interpreter_env():
        yield


@pytest.fixture(autouse=True)
def _in_process_only(request):
    if not IN_PROCESS and request.node.name != "test_in_fresh_interpreter_process":
        pytest.skip("triton was imported before TRITON_INTERPRET was set; run by test_in_fresh_interpreter_process")


def test_in_fresh_interpreter_process():
    if IN_PROCESS:
        pytest.skip("the kernels run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- helpers


def _qrange(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _bcast(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    return t.reshape(shape) if x.dim() else t.reshape(())


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (so -0.0 != +0.0), any layout."""
    view = torch.int32 if a.dtype == torch.float32 else torch.int16
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().cpu().contiguous().view(view), b.detach().cpu().contiguous().view(view))


def _sample(shape, scale, axis, qmin, qmax, gen, dtype=torch.float32):
    """Values in grid units spread over and beyond [qmin, qmax], with exact ties (k + 0.5) * scale and outliers."""
    units = torch.randn(shape, generator=gen, dtype=torch.float64) * (qmax - qmin) * 0.45
    pick = torch.rand(shape, generator=gen)
    units = torch.where(pick < 0.2, units.round() + 0.5, units)
    units = torch.where(pick > 0.97, units.sign() * 1e4, units)
    return (units * _bcast(scale.double(), units, axis)).to(dtype)


def _qparams(n, qmin, qmax, gen, integer=True):
    scale = (torch.rand(n, generator=gen) * 0.3 + 0.01).float()
    scale[0] = 1.0 / 3.0  # a scale whose reciprocal is inexact: x * (1/s) and x / s differ
    if integer:
        zp = torch.randint(qmin, qmax + 1, (n,), generator=gen, dtype=torch.int32)
    else:
        zp = (qmin + torch.rand(n, generator=gen) * (qmax - qmin)).float()
        # qmin + 2.5: the learnable forward rounds it half to even (down), ATen's per-tensor backward up
        zp[-1] = qmin + 2.5
    return scale, zp


def _ref_fake_quant(x, scale, zp, axis, qmin, qmax):
    """float64 evaluation of ATen's formula. A product of two float32 is exact in float64, so rounding it to
    float32 once reproduces float32 arithmetic: v = fl(x * fl(1/s)), q = round_half_even(v) + zp."""
    x64 = x.detach().cpu().double()
    s = _bcast(scale.detach().cpu().float(), x64, axis)
    inv = (1.0 / s).double()  # float32 reciprocal
    v = (x64 * inv).float().double()
    q = torch.round(v) + _bcast(zp.detach().cpu().double(), x64, axis)
    in_range = (q >= qmin) & (q <= qmax)
    y = (q.clamp(qmin, qmax) - _bcast(zp.cpu().double(), x64, axis)) * s.double()
    return y.to(x.dtype), in_range, q, v, inv


def _to(t):
    """A fresh copy on the test device (never the CPU tensor itself, so requires_grad_ stays local)."""
    return t.detach().clone().to(DEVICE)


CASES = [  # (shape, axis, channels_last)
    ((37,), None, False),
    ((3, 5, 7), None, False),
    ((2, 3, 4, 5), None, True),
    ((3, 5, 7), 0, False),
    ((3, 5, 7), 1, False),
    ((7, 1), 0, False),  # channels of one element
    ((1, 9), 1, False),
    ((2, 3, 4, 5), 1, True),  # channels_last activation, per channel along C
    ((3, 1531), 0, False),  # 4593 elements: more than one program
]


# ---------------------------------------------------------------------------------------------- fixed grid


def test_round_half_to_even_and_reciprocal():
    for s in (0.1, 1.0 / 3.0, 0.7, 0.125):
        scale, zp = torch.tensor([s]), torch.tensor([0], dtype=torch.int32)
        x = ((torch.arange(-60, 60, dtype=torch.float64) + 0.5) * s).float()
        y = BACKEND.per_tensor(_to(x), _to(scale), _to(zp), -128, 127)
        assert _bits_equal(y, torch.fake_quantize_per_tensor_affine(x, scale, zp, -128, 127))
        assert _bits_equal(y, _ref_fake_quant(x, scale, zp, None, -128, 127)[0])
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5])
    y = BACKEND.per_tensor(_to(x), _to(torch.tensor([1.0])), _to(torch.tensor([0], dtype=torch.int32)), -8, 7)
    assert y.cpu().tolist() == [0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 4.0]


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_fixed_grid_matches_builtin_and_float64(bits, signed):
    qmin, qmax = _qrange(bits, signed)
    gen = torch.Generator().manual_seed(100 * bits + signed)
    for shape, axis, channels_last in CASES:
        n = 1 if axis is None else shape[axis]
        scale, zp = _qparams(n, qmin, qmax, gen)
        x = _sample(shape, scale, axis, qmin, qmax, gen)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        if axis is None:
            ours = lambda t: BACKEND.per_tensor(t, _to(scale), _to(zp), qmin, qmax)  # noqa: E731
            builtin = lambda t: torch.fake_quantize_per_tensor_affine(t, scale, zp, qmin, qmax)  # noqa: E731
        else:
            ours = lambda t: BACKEND.per_channel(t, _to(scale), _to(zp), axis, qmin, qmax)  # noqa: E731
            builtin = lambda t: torch.fake_quantize_per_channel_affine(t, scale, zp, axis, qmin, qmax)  # noqa: E731
        xd = _to(x).requires_grad_()
        y = ours(xd)
        xb = x.clone().requires_grad_()
        ref = builtin(xb)
        ref64, in_range, *_ = _ref_fake_quant(x, scale, zp, axis, qmin, qmax)
        case = f"{shape} axis={axis}"
        assert _bits_equal(y, ref), case
        assert _bits_equal(y, ref64), case
        gy = torch.randn(shape, generator=gen)
        y.backward(_to(gy))
        ref.backward(gy)
        assert _bits_equal(xd.grad, xb.grad), case  # grad_out * in-range mask
        assert torch.equal(xd.grad.cpu(), gy * in_range), case
        with torch.no_grad():  # the kernel variant that writes no mask
            assert _bits_equal(ours(_to(x)), ref), case


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_match_builtin(dtype):
    gen = torch.Generator().manual_seed(7)
    scale, zp = _qparams(5, 0, 255, gen)
    x = _sample((4, 5, 6), scale, 1, 0, 255, gen, dtype=dtype)
    assert _bits_equal(BACKEND.per_tensor(_to(x), _to(scale[:1]), _to(zp[:1]), 0, 255),
                       torch.fake_quantize_per_tensor_affine(x, scale[:1], zp[:1], 0, 255))
    assert _bits_equal(BACKEND.per_channel(_to(x), _to(scale), _to(zp), 1, 0, 255),
                       torch.fake_quantize_per_channel_affine(x, scale, zp, 1, 0, 255))


def test_small_blocks_row_programs_and_non_dense_input(monkeypatch):
    monkeypatch.setattr(tb, "BLOCK", 64)  # many programs, partial last blocks
    monkeypatch.setattr(tb, "ROW_MIN", 8)  # per channel: one program per (row, block) whenever inner >= 8
    gen = torch.Generator().manual_seed(3)
    scale, zp = _qparams(11, -8, 7, gen)
    x = _sample((11, 43), scale, 0, -8, 7, gen)
    cases = [(x, 0), (x.t(), 1),  # rows of 43; transposed: neither contiguous nor channels_last, inner = 1
             (_sample((2, 11, 70), scale, 1, -8, 7, gen), 1)]  # 22 rows of 70: two blocks each
    for t, axis in cases:
        assert _bits_equal(BACKEND.per_channel(_to(t), _to(scale), _to(zp), axis, -8, 7),
                           torch.fake_quantize_per_channel_affine(t, scale, zp, axis, -8, 7))
        assert _bits_equal(BACKEND.per_tensor(_to(t), _to(scale[:1]), _to(zp[:1]), -8, 7),
                           torch.fake_quantize_per_tensor_affine(t, scale[:1], zp[:1], -8, 7))


# ---------------------------------------------------------------------------------------------- learnable


def _avoid_ambiguous_rounding(x, scale, zp_bwd, axis):
    """ATen's CPU learnable backward rounds zp + x * inv_scale (on AVX2 builds contracted into one FMA) where its
    forward, its CUDA kernels and ours round x * inv_scale first and then add zp. The in-range decisions differ
    only next to a .5 tie; zero those inputs so that the comparison can be exact."""
    s, z = _bcast(scale, x, axis), _bcast(zp_bwd, x, axis)
    inv = 1.0 / s
    v = x * inv
    ours = torch.round(v) + z
    fma = (x.double() * inv.double() + z.double()).float()  # exact product and sum, one rounding
    amb = (torch.round(z + v) != ours) | (torch.round(fma) != ours)
    return torch.where(amb, torch.zeros_like(x), x)


def _ref_learnable_grads(x, gy, scale, zp_bwd, axis, qmin, qmax, grad_factor):
    """float64 sums of ATen's per-element scale / zero-point gradients (derivatives of the clamp formula)."""
    _, in_range, q, _, inv = _ref_fake_quant(x, scale, zp_bwd, axis, qmin, qmax)
    x64, g = x.double(), gy.double()
    s, z = _bcast(scale.double(), x64, axis), _bcast(zp_bwd.double(), x64, axis)
    xfq = ((q.clamp(qmin, qmax) - z) * s).float().double()
    ds = torch.where(in_range, g * (xfq - x64) * inv, torch.where(q < qmin, g * (qmin - z), g * (qmax - z)))
    dz = torch.where(in_range, torch.zeros_like(g), -g * s)
    dims = [d for d in range(x.dim()) if d != axis] if axis is not None else list(range(x.dim()))
    # Scale of the float32 rounding: |term|, and for xfq - x (which cancels) the size of its operands
    # (ATen's CPU build may contract (q - zp) * s - x into an FMA, which rounds it differently).
    ds_mag = ds.abs() + torch.where(in_range, g.abs() * (x64.abs() + xfq.abs()) * inv, torch.zeros_like(g))
    sums = [(t * grad_factor).sum(dim=dims) if dims else t * grad_factor for t in (ds, dz)]
    mags = [(t * abs(grad_factor)).sum(dim=dims) if dims else t * abs(grad_factor) for t in (ds_mag, dz.abs())]
    return sums, mags


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_learnable_matches_builtin_and_float64(bits, signed):
    qmin, qmax = _qrange(bits, signed)
    gen = torch.Generator().manual_seed(1000 + 10 * bits + signed)
    grad_factor = [1.0, 0.37, 1.9][bits % 3]
    for shape, axis, _ in [c for c in CASES if not c[2]]:
        n = 1 if axis is None else shape[axis]
        scale, zp = _qparams(n, qmin, qmax, gen, integer=False)
        if axis is None:  # ATen's per-tensor backward uses clamp(zp + 0.5) truncated, the forward round(zp)
            zp_bwd = torch.clamp(zp + 0.5, qmin, qmax).trunc()
            ours, builtin = BACKEND.learnable_per_tensor, torch._fake_quantize_learnable_per_tensor_affine
            extra = ()
        else:
            zp_bwd = zp.round().clamp(qmin, qmax)
            ours, builtin = BACKEND.learnable_per_channel, torch._fake_quantize_learnable_per_channel_affine
            extra = (axis,)
        x = _avoid_ambiguous_rounding(_sample(shape, scale, axis, qmin, qmax, gen), scale, zp_bwd, axis)
        gy = torch.randn(shape, generator=gen)
        mine = [_to(t).requires_grad_() for t in (x, scale, zp)]
        theirs = [t.clone().requires_grad_() for t in (x, scale, zp)]
        y = ours(mine[0], mine[1], mine[2], *extra, qmin, qmax, grad_factor)
        ref = builtin(theirs[0], theirs[1], theirs[2], *extra, qmin, qmax, grad_factor)
        case = f"{shape} axis={axis}"
        assert _bits_equal(y, ref), case
        assert _bits_equal(y, _ref_fake_quant(x, scale, zp.round().clamp(qmin, qmax), axis, qmin, qmax)[0]), case
        y.backward(_to(gy))
        ref.backward(gy)
        assert _bits_equal(mine[0].grad, theirs[0].grad), case
        (ds64, dz64), (ds_abs, dz_abs) = _ref_learnable_grads(x, gy, scale, zp_bwd, axis, qmin, qmax, grad_factor)
        for got, aten, want, mag, name in ((mine[1].grad, theirs[1].grad, ds64, ds_abs, "scale"),
                                           (mine[2].grad, theirs[2].grad, dz64, dz_abs, "zero point")):
            assert got.shape == aten.shape, case
            tol = 2e-5 * mag.reshape(got.shape) + 1e-6  # float32 rounding, sums in different orders
            assert ((got.cpu().double() - want.reshape(got.shape)).abs() <= tol).all(), (case, name, got, want)
            assert ((got.cpu().double() - aten.double()).abs() <= tol).all(), (case, name, got, aten)


# ---------------------------------------------------------------------------------------------- fused min/max


def _special_channels(x, axis):
    """Channel 0 all positive, 1 all negative, 2 all zero: ranges widened to 0 and the 1e-8 scale floor."""
    x = x.movedim(axis, 0).clone()
    if x.shape[0] >= 3:
        x[0], x[1], x[2] = x[0].abs() + 0.5, -x[1].abs() - 0.25, 0.0
    return x.movedim(0, axis).contiguous()


@pytest.mark.parametrize("split", [False, True], ids=["one-kernel", "split"])
@pytest.mark.parametrize("axis", [0, 1])
def test_fused_minmax_matches_grid_from_range_and_builtin(axis, split, monkeypatch):
    from dfqbench.quant.quantizers.ranges import grid_from_range

    if split:  # force the partial min/max + grid + quantize path on small channels
        monkeypatch.setattr(tb, "FUSED_SINGLE_MAX", 16)
        monkeypatch.setattr(tb, "BLOCK", 16)
        monkeypatch.setattr(tb, "_RBLOCK", 2)  # several reduction steps over the partials
    gen = torch.Generator().manual_seed(11 + axis + 2 * split)
    shapes = [(5, 6, 7), (9, 1), (1, 9), (4, 37)] if axis == 0 else [(6, 5, 7), (1, 9), (9, 1), (37, 4)]
    for bits in BITS:
        for shape in shapes:
            x = _special_channels(torch.randn(shape, generator=gen) * 3 + 0.5, axis)
            dims = [d for d in range(x.dim()) if d != axis]
            grid = grid_from_range(x.amin(dim=dims), x.amax(dim=dims), bits, symmetric=False)
            xd = _to(x).requires_grad_()
            y, scale, zp = tb.fused_minmax_fake_quant_per_channel(xd, bits, axis)
            xb = x.clone().requires_grad_()
            ref = torch.fake_quantize_per_channel_affine(xb, grid.scale, grid.zero_point, axis, 0, 2**bits - 1)
            case = f"bits={bits} {shape}"
            assert _bits_equal(scale, grid.scale), case
            assert torch.equal(zp.cpu(), grid.zero_point), case
            assert _bits_equal(y, ref), case
            assert _bits_equal(y, _ref_fake_quant(x, grid.scale, grid.zero_point, axis, 0, 2**bits - 1)[0]), case
            gy = torch.randn(shape, generator=gen)
            y.backward(_to(gy))
            ref.backward(gy)
            assert _bits_equal(xd.grad, xb.grad), case


# ---------------------------------------------------------------------------------------------- selection


def test_backend_selection_and_quantizers_agree():
    from dfqbench.quant import ActQuantizer, WeightQuantizer
    from dfqbench.quant.kernels.backend import available_backends, resolve_backend_name, use_backend

    assert resolve_backend_name("triton") == "triton"
    assert "triton" in available_backends()
    assert resolve_backend_name("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="choose one of: torch, triton, auto"):
        resolve_backend_name("cutlass")
    gen = torch.Generator().manual_seed(5)
    w = _to(torch.randn(6, 3, 3, 3, generator=gen))
    a = _to(torch.randn(2, 6, 5, 5, generator=gen).relu())
    outs = {}
    for name in ("torch", "triton"):
        with use_backend(name) as backend:
            assert backend.name == name
            wq, aq = WeightQuantizer(4, per_channel=True), ActQuantizer(4).to(DEVICE)
            aq.set_range(0.0, 2.0)
            outs[name] = (wq(w), aq(a), WeightQuantizer(3, per_channel=False, estimator="mse")(w))
    for ours, theirs in zip(outs["triton"], outs["torch"]):
        # the torch backend's CPU formula keeps the sign of a value rounded to zero (kernels/aten.py): equal values
        assert _bits_equal(ours, theirs) if DEVICE == "cuda" else torch.equal(ours, theirs)


def test_config_accepts_triton_and_refuses_unknown_backends_in_one_line():
    from omegaconf import OmegaConf

    from dfqbench.errors import ConfigError
    from dfqbench.methods.base import Method
    from dfqbench.runner import build_convention

    method = Method("stand-in")  # no convention requirements
    cfg = OmegaConf.create({"quant": OmegaConf.load(REPO / "conf" / "quant" / "gdfq.yaml")})
    assert cfg.quant.backend == "torch"  # the presets keep the ATen kernels
    for name in ("triton", "auto", "torch"):
        cfg.quant.backend = name
        assert build_convention(cfg, method).backend == name
    cfg.quant.backend = "nope"
    with pytest.raises(ConfigError) as err:
        build_convention(cfg, method)
    assert str(err.value) == "unknown quant.backend='nope'; choose one of: torch, triton, auto"
