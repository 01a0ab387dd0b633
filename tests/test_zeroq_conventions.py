"""Our grid reproduces ZeroQ's quantizer arithmetic (amirgholami/ZeroQ quant_utils, restated from its formulas).

ZeroQ: s = (2^k - 1) / (max - min), z = round(s * min) + 2^(k-1), q = clamp(round(s * x - z), -2^(k-1),
2^(k-1) - 1), x_hat = (q + z) / s; activations use a running (min, max) that starts at 0, weights per-channel
min/max. Where the range contains 0 this is our asymmetric grid with step 1/s.
"""

import torch

from dfqbench.quant import WeightQuantizer
from dfqbench.quant.quantizers.ranges import fake_quant, grid_from_range


def zeroq_reference(x: torch.Tensor, bits: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    x, lo, hi = x.double(), lo.double(), hi.double()
    s = (2**bits - 1) / (hi - lo).clamp_min(1e-8)
    z = torch.round(s * lo) + 2 ** (bits - 1)
    q = torch.clamp(torch.round(s * x - z), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return ((q + z) / s).float()


def test_activation_grid_matches_zeroq():
    torch.manual_seed(0)
    for bits in (4, 5, 6, 8):
        x = torch.relu(torch.randn(64, 16, 8, 8) * 2)
        lo, hi = torch.zeros(()), x.max()  # ZeroQ's running min starts at 0
        ours = fake_quant(x, grid_from_range(lo, hi, bits, symmetric=False))
        ref = zeroq_reference(x, bits, lo, hi)
        step = (hi - lo) / (2**bits - 1)
        diff = (ours - ref).abs()
        assert (diff > 1e-5).float().mean() < 1e-3  # only float ties at .5 may round differently
        assert diff.max() <= step + 1e-5


def test_per_channel_weight_grid_matches_zeroq():
    torch.manual_seed(1)
    w = torch.randn(32, 16, 3, 3)
    for bits in (4, 8):
        ours = WeightQuantizer(bits, per_channel=True)(w)
        flat = w.reshape(32, -1)
        lo, hi = flat.min(1).values[:, None], flat.max(1).values[:, None]
        ref = zeroq_reference(flat, bits, lo, hi).reshape_as(w)
        assert (ours - ref).abs().gt(1e-5).float().mean() < 1e-3
