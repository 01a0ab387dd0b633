"""PNMQ: the parametric grid (hand values), the L4 search, the bit allocation, bad settings. Fast: no teacher, no
data (the ResNet-20 records are in results/sweeps/.../pnmq-cr*)."""

import pytest
import torch
from torch import nn

from dfqbench.methods.base import QuantContext
from dfqbench.methods.pnmq import PNMQ, allocate_bits
from dfqbench.quant import Convention
from dfqbench.quant.quantizers import WeightQuantizer
from dfqbench.quant.quantizers.parametric import (ParametricWeightQuantizer, grid_levels, quantize_to_grid,
                                                  search_grid)

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: two threads on two busy cores are slower

W5 = torch.tensor([[-1.0, -0.4, 0.1, 0.55, 0.8]])


# ---- the grid -------------------------------------------------------------------------------------------------

def test_grid_at_p1_is_the_uniform_symmetric_grid():
    # 3 bits: K = 3, s = max|w| = 1, step 1/3: -0.4 -> -1/3, 0.1 -> 0, 0.55 -> 2/3 (.117 < .217), 0.8 -> 2/3
    expected = torch.tensor([[-1.0, -1 / 3, 0.0, 2 / 3, 2 / 3]])
    assert torch.allclose(quantize_to_grid(W5, 3, 1.0, 1.0), expected, atol=1e-6)
    assert torch.allclose(WeightQuantizer(3, per_channel=False, symmetric=True)(W5), expected, atol=1e-6)
    assert torch.allclose(grid_levels(3, 1.0, 1.0), torch.tensor([-3, -2, -1, 0, 1, 2, 3.0], dtype=torch.float64) / 3)
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(quantize_to_grid(w, 4, float(w.abs().max()), 1.0),
                          WeightQuantizer(4, per_channel=False, symmetric=True)(w), atol=1e-6)


def test_grid_at_p2_crowds_levels_near_zero():
    # levels (k/3)^2 = 0, 1/9, 4/9, 1: -0.4 -> -4/9, 0.1 -> 1/9, 0.55 -> 4/9 (.106 < .45), 0.8 -> 1 (.2 < .356)
    assert torch.allclose(quantize_to_grid(W5, 3, 1.0, 2.0), torch.tensor([[-1.0, -4 / 9, 1 / 9, 4 / 9, 1.0]]),
                          atol=1e-6)
    # clipped: s = 0.5, levels 0, 1/18, 2/9, 1/2; |w| > s goes to s
    assert torch.allclose(quantize_to_grid(W5, 3, 0.5, 2.0), torch.tensor([[-0.5, -0.5, 1 / 18, 0.5, 0.5]]),
                          atol=1e-6)
    assert torch.equal(quantize_to_grid(W5, 2, 1.0, 2.0), quantize_to_grid(W5, 2, 1.0, 1.0))  # {-s, 0, s}


# ---- the L4 search --------------------------------------------------------------------------------------------

EXPS = [1.0 + 0.1 * i for i in range(11)]
RATIOS = [0.2 + 0.02 * i for i in range(41)]


def test_search_finds_weights_placed_on_a_p2_grid():
    levels = grid_levels(4, 0.5, 2.0).float()  # 4 bits, s = 0.5, p = 2: max|W| = s, so c = 1
    w = levels[torch.randint(len(levels), (2000,), generator=torch.Generator().manual_seed(0))]
    fit = search_grid(w, 4, EXPS, RATIOS)
    assert (fit.exponent, fit.scale_ratio, fit.scale) == (pytest.approx(2.0), pytest.approx(1.0), pytest.approx(0.5))
    assert fit.l4 < 1e-6
    assert search_grid(w, 4, [1.0], RATIOS).l4 > 0.01  # no uniform grid holds them


def test_search_is_the_l4_minimum_over_the_grid():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(4.0).sample((3000,)).float()
    fit = search_grid(w, 3, EXPS, RATIOS)
    amax = float(w.abs().max())
    l4 = {(p, c): float((quantize_to_grid(w, 3, c * amax, p) - w).pow(4).sum() ** 0.25) for p in EXPS for c in RATIOS}
    best = min(l4, key=l4.get)
    assert fit.l4 == pytest.approx(l4[best], rel=1e-4)
    assert (fit.exponent, fit.scale_ratio) == (pytest.approx(best[0]), pytest.approx(best[1]))
    assert fit.exponent > 1.0 and fit.l4 < min(v for (p, _), v in l4.items() if p == 1.0)  # non-uniform wins
    # the L2 optimum clips harder than the L4 one (L4 weighs the large errors of clipped weights more)
    l2 = {(p, c): float((quantize_to_grid(w, 3, c * amax, p) - w).pow(2).sum()) for p in EXPS for c in RATIOS}
    assert min(l2, key=l2.get)[1] < fit.scale_ratio


def test_quantizer_searches_or_takes_fixed_settings():
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(1))
    q = ParametricWeightQuantizer(4, exponents=EXPS, scale_ratios=RATIOS)
    out = q(w)
    assert q.fit is not None and torch.equal(out, quantize_to_grid(w, 4, q.c * float(w.abs().max()), q.p))
    fixed = ParametricWeightQuantizer(4, exponent=1.5, scale_ratio=0.8)
    assert torch.equal(fixed(w), quantize_to_grid(w, 4, 0.8 * float(w.abs().max()), 1.5)) and fixed.fit is None


# ---- the bit allocation ---------------------------------------------------------------------------------------

def test_allocation_meets_the_ratio_and_favours_the_layer_with_the_larger_error():
    # 400 weights at CR 8: budget 1600 bits. From [8, 8, 8] (3200): lower L2 8->4 (.3/800), L1 8->4 (.2/400),
    # L1 4->2 (.8/200), L2 4->2 (1.7/400) -> [8, 2, 2] = 1400; give back L1 2->4 (+200, L2 needs +400) -> 1600
    sizes = [100, 100, 200]
    losses = [{8: 0.0, 4: 4.0, 2: 20.0}, {8: 0.0, 4: 0.2, 2: 1.0}, {8: 0.0, 4: 0.3, 2: 2.0}]
    bits = allocate_bits(sizes, losses, 32 * 400 / 8)
    assert bits == [8, 4, 2]
    assert sum(n * b for n, b in zip(sizes, bits)) == 1600  # CR exactly 8
    assert allocate_bits(sizes, losses, 3200) == [8, 8, 8]
    with pytest.raises(ValueError, match="budget"):
        allocate_bits(sizes, losses, 799)


COARSE = {"exponent_steps": 6, "scale_steps": 21}  # p step 0.2, c step 0.04: a faster search


def _toy_model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.copy_(torch.randint(-3, 4, (64, 64), generator=g) / 3.0)  # on the 3-bit grid: no error
        model[2].weight.copy_(torch.rand(64, 64, generator=g) * 2 - 1)  # uniform: a small error at any bits
        model[4].weight.copy_(torch.randn(64, 64, generator=g))  # Gaussian: the largest relative error
    return model.eval()


def _run(method: PNMQ, layers: dict | None = None):
    conv = Convention.from_dict({"name": "t", "layers": layers or {}}).with_overrides(method.convention_overrides)
    ctx = QuantContext(conv, 8, 32, 0, torch.device("cpu"), (64,), 64)
    qmodel = method.quantize(_toy_model(), ctx)
    return qmodel, ctx.info


def test_toy_model_meets_the_ratio_exactly_with_more_bits_where_the_error_is_larger():
    method = PNMQ(compression_ratio=8, wbit=8, equalize=False, correct_bias=False, **COARSE)
    qmodel, info = _run(method)
    bits = list(info["pnmq_layer_bits"].values())
    assert info["pnmq_compression_ratio"] == 8.0 and info["pnmq_mean_bits"] == 4.0 and sum(bits) == 12
    assert bits == [3, 4, 5]  # relative L4 losses at 3/4/5 bits: (0, .020/.0045, .054/.015/.0038)
    assert info["pnmq_layer_loss"]["0"] == 0.0
    assert info["pnmq_layer_exponent"]["4"] > 1.0  # the Gaussian layer takes a non-uniform grid
    x = torch.randn(2, 64)
    assert qmodel(x).shape == (2, 64)
    wq = qmodel.get_submodule("4").weight_quantizer
    assert isinstance(wq, ParametricWeightQuantizer) and wq.bits == bits[2]


def test_convention_first_and_last_layers_count_at_their_bits():
    method = PNMQ(compression_ratio=32 / 6, wbit=8, equalize=False, correct_bias=False, **COARSE)
    _, info = _run(method, {"first_wbit": 8, "last_wbit": 8})
    assert info["pnmq_fixed_layers"] == {"0": 8, "4": 8}
    assert info["pnmq_layer_bits"] == {"0": 8, "2": 2, "4": 8}
    assert info["pnmq_compression_ratio"] == pytest.approx(32 / 6, abs=1e-4)


# ---- bad settings ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings,needles", [
    ({"compression_ratio": 1}, ["compression_ratio=1", "> 1"]),
    ({"compression_ratio": 0.5}, ["compression_ratio=0.5", "> 1"]),
    ({"compression_ratio": "8"}, ["compression_ratio='8'", "number"]),
    ({"compression_ratio": 20}, ["compression_ratio=20", "unreachable", "[4, 16]"]),
    ({"compression_ratio": 3}, ["compression_ratio=3", "unreachable", "[4, 16]"]),
    ({"compression_ratio": 8, "wbit": 3}, ["compression_ratio=8", "unreachable", "[10.67, 16]"]),
    ({"candidate_bits": [3, 4], "wbit": 2}, ["candidate_bits=[3, 4]", "wbit=2"]),
    ({"candidate_bits": []}, ["candidate_bits=[]", "integer bit-widths from 2 to 16"]),
    ({"candidate_bits": [2.5, 4]}, ["candidate_bits=[2.5, 4]", "integer bit-widths from 2 to 16"]),
    ({"candidate_bits": [1, 4]}, ["candidate_bits=[1, 4]", "integer bit-widths from 2 to 16"]),
    ({"candidate_bits": 4}, ["candidate_bits=4", "integer bit-widths from 2 to 16"]),
    ({"exponent_range": [0.5, 2.0]}, ["exponent_range=[0.5, 2.0]", "1 <= lo < hi <= 2"]),
    ({"exponent_range": [1.5, 1.2]}, ["exponent_range=[1.5, 1.2]", "1 <= lo < hi <= 2"]),
    ({"exponent_range": [1.0, 2.5]}, ["exponent_range=[1.0, 2.5]", "1 <= lo < hi <= 2"]),
    ({"exponent_range": [1.0]}, ["exponent_range=[1.0]", "1 <= lo < hi <= 2"]),
    ({"exponent": 3.0}, ["exponent=3.0", "[1, 2]"]),
    ({"scale_range": [0.0, 1.0]}, ["scale_range=[0.0, 1.0]", "0 < lo < hi <= 1"]),
    ({"exponent_steps": 1}, ["exponent_steps=1", ">= 2"]),
    ({"allocation_loss": "l2"}, ["allocation_loss='l2'", "relative, absolute"]),
])
def test_bad_settings_are_refused_in_the_constructor(settings, needles):
    with pytest.raises(ValueError) as info:
        PNMQ(**settings)
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message
