"""The CPU speed paths (issue 16) compute what the slow paths computed: the `torch` backend's vectorised fake-quant
formula against ATen's kernels value for value and gradient for gradient, ZeroQ's closed-form moment backward
against autograd through `Tensor.var`, weights quantized once inside `frozen_weights`, and the allocator switch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from dfqbench.quant.kernels.aten import TorchBuiltinBackend
from dfqbench.quant.quantizers.core import WeightQuantizer, frozen_weights
from dfqbench.synth.bn_distill import per_sample_moments

BACKEND = TorchBuiltinBackend()
GRIDS = [(0, 15), (-8, 7), (0, 255), (-128, 127)]


def _case(seed: int, channels: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, channels, 5, 7, generator=g) * 4
    scale = torch.rand(8, generator=g) * 0.3 + 1e-3  # enough for a grid along any of x's dims
    zp = torch.randint(0, 8, (8,), generator=g, dtype=torch.int32)
    # exact ties: x * (1/scale) lands on k + 0.5, where round-half-even and round-half-up differ
    x[0, :, 0, 0] = (torch.arange(channels) - 3 + 0.5) * scale[:channels]
    x[1, 0, 0, :3] = torch.tensor([1e6, -1e6, 0.0])  # far outside the grid, and zero
    return x, scale, zp


@pytest.mark.parametrize("qmin,qmax", GRIDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_formula_equals_aten_values(qmin, qmax, layout):
    for seed in range(5):
        x, scale, zp = _case(seed)
        zp = zp.clamp(max=qmax) if qmin == 0 else torch.zeros_like(zp)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        ref = torch.fake_quantize_per_tensor_affine(x, scale[:1], zp[:1], qmin, qmax)
        assert torch.equal(BACKEND.per_tensor(x, scale[:1], zp[:1], qmin, qmax), ref)
        for axis in (0, 1, 3):
            n = x.shape[axis]
            ref = torch.fake_quantize_per_channel_affine(x, scale[:n], zp[:n], axis, qmin, qmax)
            assert torch.equal(BACKEND.per_channel(x, scale[:n], zp[:n], axis, qmin, qmax), ref), (axis, seed)


def test_formula_by_hand():
    """scale 0.5, zero point 2, grid [0, 15]: representable values -1.0 .. 6.5; ties go to the even integer."""
    x = torch.tensor([0.25, 0.75, -0.26, -3.0, 7.0, 1.26, 6.4])
    y = BACKEND.per_tensor(x, torch.tensor([0.5]), torch.tensor([2], dtype=torch.int32), 0, 15)
    assert y.tolist() == [0.0, 1.0, -0.5, -1.0, 6.5, 1.5, 6.5]


@pytest.mark.parametrize("qmin,qmax", [(0, 15), (-8, 7)])
def test_formula_gradient_is_atens_clamp_mask(qmin, qmax):
    x, scale, zp = _case(7)
    zp = zp.clamp(max=qmax) if qmin == 0 else torch.zeros_like(zp)
    upstream = torch.randn_like(x)
    for call, ref_call in [
        (lambda t: BACKEND.per_tensor(t, scale[:1], zp[:1], qmin, qmax),
         lambda t: torch.fake_quantize_per_tensor_affine(t, scale[:1], zp[:1], qmin, qmax)),
        (lambda t: BACKEND.per_channel(t, scale[:6], zp[:6], 1, qmin, qmax),
         lambda t: torch.fake_quantize_per_channel_affine(t, scale[:6], zp[:6], 1, qmin, qmax)),
    ]:
        ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        call(ours).backward(upstream)  # noqa: B023
        ref_call(ref).backward(upstream)
        assert torch.equal(ours.grad, ref.grad)
        assert (ours.grad == 0).any() and (ours.grad != 0).any()  # both sides of the mask are exercised


def test_non_float32_takes_atens_kernel():
    x = torch.randn(4, 8, dtype=torch.float64)
    y = BACKEND.per_tensor(x, torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32), -8, 7)
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, torch.tensor([0.1]),
                                                                torch.tensor([0], dtype=torch.int32), -8, 7))


def _reference_moments(x):
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return flat.mean(dim=2), torch.sqrt(flat.var(dim=2) + 1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_moments_and_their_gradient_match_autograd(layout):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 5, 6, 7, generator=g, dtype=torch.float64) * 2 + 1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weights = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    (m, s), (m0, s0) = per_sample_moments(ours), _reference_moments(ref)
    torch.testing.assert_close(m, m0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s0, rtol=1e-12, atol=1e-12)
    ((m * weights[0]).sum() + (s * weights[1]).sum()).backward()
    ((m0 * weights[0]).sum() + (s0 * weights[1]).sum()).backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-10, atol=1e-12)
    # only the std used: the mean's gradient slot arrives as None
    ours.grad = None
    per_sample_moments(ours)[1].sum().backward()
    ref.grad = None
    _reference_moments(ref)[1].sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-10, atol=1e-12)


def test_moments_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0]).reshape(1, 1, 2, 2)  # mean 3, unbiased var 14/3
    m, s = per_sample_moments(x)
    assert m.item() == pytest.approx(3.0)
    assert s.item() == pytest.approx((14 / 3 + 1e-6) ** 0.5)


def test_frozen_weights_quantizes_once_and_forgets_on_exit(monkeypatch):
    q = WeightQuantizer(4)
    layer = nn.Linear(8, 4)
    model = nn.Sequential(q)
    rounds = []
    original = WeightQuantizer.quantize_on_grid
    monkeypatch.setattr(WeightQuantizer, "quantize_on_grid", lambda self, w: rounds.append(1) or original(self, w))
    with frozen_weights(model), torch.inference_mode():
        first = q(layer.weight)
        for _ in range(3):
            assert q(layer.weight) is first
    assert len(rounds) == 1
    with torch.no_grad():
        layer.weight.mul_(2.0)
    q.reset()
    again = q(layer.weight)  # outside the block: computed from the edited weight
    assert len(rounds) == 2 and not torch.equal(again, first)
    assert not q.frozen and q._frozen_weight is None


def test_evaluate_runs_each_weight_quantizer_once(monkeypatch):
    from dfqbench.data import EvalSet
    from dfqbench.evaluate import evaluate
    from dfqbench.quant.quantizers.layers import QuantLinear

    layer = QuantLinear.from_float(nn.Linear(6, 3), WeightQuantizer(4))
    rounds = []
    original = WeightQuantizer.quantize_on_grid
    monkeypatch.setattr(WeightQuantizer, "quantize_on_grid", lambda self, w: rounds.append(1) or original(self, w))

    images = (torch.rand(40, 1, 2, 3) * 255).to(torch.uint8)  # 6 features as a 1x2x3 image
    data = EvalSet(name="tiny", num_samples=40, mean=torch.zeros(1, 1, 1, 1), std=torch.ones(1, 1, 1, 1),
                   images=images, labels=torch.randint(0, 3, (40,)))
    model = nn.Sequential(nn.Flatten(), layer)
    evaluate(model, data, 10, torch.device("cpu"))
    assert len(rounds) == 1  # 4 batches, one rounding


@pytest.mark.parametrize("env,expected", [("1", "True"), ("0", "False")])
def test_keep_freed_memory_switch(env, expected):
    code = ("from dfqbench.cpu_allocator import keep_freed_memory; print(keep_freed_memory())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "DFQ_KEEP_FREED_MEMORY": env})
    glibc = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
    assert out.stdout.strip() == (expected if glibc else "False")


def test_job_threads_share_the_cores_and_warn_on_oversubscription(caplog):
    from dfqbench.runner import job_threads

    assert job_threads(None, 1, cores=16) is None  # one job: torch's default (OMP_NUM_THREADS)
    assert job_threads(None, 4, cores=16) == 4
    assert job_threads(None, 3, cores=16) == 5
    assert job_threads(None, 32, cores=16) == 1
    with caplog.at_level("WARNING", logger="dfqbench"):
        assert job_threads(2, 4, cores=8) == 2 and not caplog.records
        assert job_threads(4, 4, cores=8) == 4
    assert "oversubscribe" in caplog.text


def test_c_kernel_builds_and_equals_the_torch_formula_on_large_tensors(monkeypatch):
    """The one-pass C kernel (kernels/cpu_ext.py) runs here (a C compiler is part of the setup) and gives the
    four-pass formula's values bit for bit, multi-threaded (> its grain), per tensor and per channel."""
    import shutil

    from dfqbench.quant.kernels import aten, cpu_ext

    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler: the formula runs instead")
    assert cpu_ext.library() is not None, cpu_ext.why_unavailable()
    calls = []
    real = cpu_ext.per_channel
    monkeypatch.setattr(cpu_ext, "per_channel", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    scale, zp = torch.rand(16, generator=g) * 0.2 + 0.01, torch.randint(0, 16, (16,), generator=g,
                                                                         dtype=torch.int32)
    with torch.no_grad():
        for memory_format in (torch.contiguous_format, torch.channels_last):
            x = (torch.randn(16, 16, 32, 32, generator=g) * 3).contiguous(memory_format=memory_format)
            for axis in (None, 0, 1):
                s, z = (scale[:1], zp[:1]) if axis is None else (scale, zp)
                terms = aten._grid_terms(x, s, z, axis, 0, 15)
                ours = BACKEND.per_tensor(x, s, z, 0, 15) if axis is None else \
                    BACKEND.per_channel(x, s, z, axis, 0, 15)
                assert torch.equal(ours, aten.torch_formula(x, *terms)), (memory_format, axis)
    # in C: axes 0 and 1 of the contiguous tensor, axis 1 (innermost) of the channels_last one; axis 0 of a
    # channels_last tensor takes the formula
    assert len(calls) == 3


def test_c_kernel_can_be_switched_off():
    code = ("import torch; from dfqbench.quant.kernels import cpu_ext; "
            "print(cpu_ext.library() is None, cpu_ext.why_unavailable())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "DFQ_CPU_KERNEL": "0"}).stdout
    assert out.startswith("True disabled by DFQ_CPU_KERNEL=0")
