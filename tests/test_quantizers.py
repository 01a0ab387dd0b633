"""Quantizer numerics against hand-computed values."""

import pytest
import torch

from dfqbench.quant import ActQuantizer, WeightQuantizer
from dfqbench.quant.quantizers.ranges import estimate_range, fake_quant, grid_from_range


def test_asymmetric_grid_hand_computed():
    # range [-1, 2] at 2 bits: 4 levels, scale (2 - -1) / 3 = 1, zero point 0 - round(-1 / 1) = 1
    grid = grid_from_range(torch.tensor(-1.0), torch.tensor(2.0), bits=2, symmetric=False)
    assert (grid.qmin, grid.qmax) == (0, 3)
    assert grid.scale.item() == pytest.approx(1.0)
    assert grid.zero_point.item() == 1
    x = torch.tensor([-1.4, -0.6, 0.2, 0.5, 0.51, 1.5, 2.6])
    # round half to even: 0.5 -> 0 and 1.5 -> 2; out-of-range values clamp to -1 and 2
    assert fake_quant(x, grid).tolist() == [-1.0, -1.0, 0.0, 0.0, 1.0, 2.0, 2.0]


def test_asymmetric_grid_always_contains_zero():
    grid = grid_from_range(torch.tensor(0.5), torch.tensor(3.5), bits=3, symmetric=False)
    # lo is widened to 0: scale 3.5 / 7 = 0.5, zero point 0, and 0 stays exactly representable
    assert grid.scale.item() == pytest.approx(0.5)
    assert grid.zero_point.item() == 0
    assert fake_quant(torch.tensor([0.0, 0.74, 0.76, 9.0]), grid).tolist() == [0.0, 0.5, 1.0, 3.5]


def test_symmetric_signed_and_unsigned_grids():
    signed = grid_from_range(torch.tensor(-3.0), torch.tensor(1.5), bits=3, symmetric=True)
    assert (signed.qmin, signed.qmax, signed.zero_point.item()) == (-4, 3, 0)
    assert signed.scale.item() == pytest.approx(1.0)  # max |x| = 3 over 3 positive levels
    assert fake_quant(torch.tensor([-5.0, -2.5, 0.4, 3.2]), signed).tolist() == [-4.0, -2.0, 0.0, 3.0]
    unsigned = grid_from_range(torch.tensor(0.0), torch.tensor(7.0), bits=3, symmetric=True)
    assert (unsigned.qmin, unsigned.qmax) == (0, 7)
    assert unsigned.scale.item() == pytest.approx(1.0)
    assert fake_quant(torch.tensor([-1.0, 2.5, 3.5, 8.0]), unsigned).tolist() == [0.0, 2.0, 4.0, 7.0]


def test_per_channel_weight_quantizer_hand_computed():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0], [0.0, 0.3, 0.6, 0.9]])
    q = WeightQuantizer(bits=2, per_channel=True, symmetric=False)
    out = q(w)
    # channel 0: range [-1, 2], scale 1, zp 1 -> grid {-1, 0, 1, 2}; channel 1: range [0, 0.9], scale 0.3, zp 0
    assert torch.allclose(q.grid.scale, torch.tensor([1.0, 0.3]))
    assert q.grid.zero_point.tolist() == [1, 0]
    assert torch.allclose(out, torch.tensor([[-1.0, 0.0, 0.0, 2.0], [0.0, 0.3, 0.6, 0.9]]))


def test_per_tensor_weight_quantizer_and_full_precision_passthrough():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    q = WeightQuantizer(bits=2, per_channel=False)
    assert q(w).tolist() == [[-1.0, 0.0, 0.0, 2.0]]
    assert torch.equal(WeightQuantizer(bits=32)(w), w)


def test_straight_through_gradient_is_the_in_range_mask():
    grid = grid_from_range(torch.tensor(-1.0), torch.tensor(2.0), bits=2, symmetric=False)
    x = torch.tensor([-3.0, -0.2, 0.7, 1.9, 4.0], requires_grad=True)
    fake_quant(x, grid).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_weight_quantizer_passes_gradient_to_the_float_weight():
    w = torch.tensor([[0.1, -0.4, 0.9]], requires_grad=True)
    WeightQuantizer(bits=4)(w).sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 1.0]]


def test_mse_estimator_clips_an_outlier_and_percentile_ignores_it():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(10000), torch.tensor([40.0])])
    lo, hi = estimate_range(x, "minmax", 4, False)
    assert hi.item() == pytest.approx(40.0)
    _, hi_mse = estimate_range(x, "mse", 4, False)
    assert 1.0 < hi_mse.item() < 20.0
    _, hi_pct = estimate_range(x, "percentile", 4, False, percentile=99.0)
    assert hi_pct.item() == pytest.approx(torch.quantile(x, 0.99).item(), abs=0.05)


def test_act_quantizer_running_min_max_then_frozen():
    q = ActQuantizer(bits=8)
    x = torch.tensor([0.0, 1.0, 2.0])
    assert torch.equal(q(x), x)  # uncalibrated: float pass-through
    q.start_observing()
    q(torch.tensor([0.0, 1.0, 2.0]))
    q(torch.tensor([-1.0, 0.5, 3.0]))
    q.stop_observing()
    assert (q.lo.item(), q.hi.item()) == (-1.0, 3.0)
    q(torch.tensor([-10.0, 10.0]))  # frozen: no longer widens
    assert (q.lo.item(), q.hi.item()) == (-1.0, 3.0)
    # scale 4 / 255, zero point round(63.75) = 64: the top level is (255 - 64) * 4 / 255, not exactly 3
    assert q(torch.tensor([10.0])).item() == pytest.approx((255 - 64) * 4 / 255, abs=1e-6)


def test_act_quantizer_set_range():
    q = ActQuantizer(bits=2)
    q.set_range(0.0, 3.0)
    assert q(torch.tensor([0.4, 0.6, 2.4, 5.0])).tolist() == [0.0, 1.0, 2.0, 3.0]
