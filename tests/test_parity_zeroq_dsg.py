"""ZeroQ / DSG against their official code (scripts/parity/zeroq.py, dsg.py): DSG's layer-wise sample
enhancement as htqin/DSG's main_loss computes it, and ZeroQ's weight grid on dfqbench's gdfq quantizer."""

import math

import pytest
import torch
from torch import nn

from dfqbench.quant import Convention, quant_layers, quantize_model
from dfqbench.synth.bn_loop import EPS
from dfqbench.synth.dsg import DSGSettings, DSGSynthesis, _DSGBatch, enhancement_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_official_enhancement_pairs_sample_i_with_layer_i_and_squares_the_doubled_hinge():
    # main_loss: for i < min(N, layer_num = 20), D[i] *= 2 at layer cnt == i, then ||D||^2: a factor 4
    w = enhancement_weights(3, 2, DSGSettings())
    torch.testing.assert_close(w, torch.tensor([[4.0, 1.0], [1.0, 4.0], [1.0, 1.0]]))
    # ResNet-20: 21 BN layers, a batch of 40: samples 0..19 enhance layers 0..19; layer 20 and samples 20.. none
    w = enhancement_weights(40, 21, DSGSettings())
    assert w.shape == (40, 21)
    assert torch.equal(w[:20, :20], torch.eye(20) * 3 + 1)
    assert torch.equal(w[20:], torch.ones(20, 21)) and torch.equal(w[:, 20], torch.ones(40))
    assert float(w.sum()) == 40 * 21 + 20 * 3


def test_permutation_enhancement_is_the_earlier_rule():
    w = enhancement_weights(5, 2, DSGSettings(enhance="permutation"), torch.Generator().manual_seed(0))
    assert sorted(w.flatten().tolist()) == [1.0] * 5 + [2.0] * 5  # one layer per sample, weight 2 on the term
    assert sorted((w == 2).float().sum(0).tolist()) == [2.0, 3.0]  # dealt evenly over the layers
    with pytest.raises(ValueError, match="enhance='nope'"):
        DSGSettings(enhance="nope").validate()


class _Taps:
    def __init__(self, pairs):
        self._pairs = pairs

    def pairs(self):
        return self._pairs


def _loss(settings):
    """Two samples, two BN layers, every per-sample channel mean 1 away from its target (std on target), zero
    margins, the image prior at ~0, no CE / TV / L2: the BN part of DSG's loss alone."""
    act = torch.ones(2, 1, 1, 1)  # mean 1, std sqrt(0 + eps)
    target = (torch.zeros(1), torch.full((1,), math.sqrt(EPS)))
    synth = DSGSynthesis((3, 1, 2), 10, settings, torch.Generator().manual_seed(0), torch.device("cpu"))
    synth.num_layers, synth.margins = 2, [(0.0, 0.0), (0.0, 0.0)]
    a = 1 / math.sqrt(2)  # each image channel [-a, a]: mean 0, unbiased std 1
    x = torch.tensor([-a, a]).expand(2, 3, 1, 2).contiguous()
    batch = _DSGBatch(x.clone(), torch.zeros(2, dtype=torch.long),
                      enhancement_weights(2, 2, settings, torch.Generator().manual_seed(0)), settings)
    return float(synth.loss(batch, x, torch.zeros(2, 10), _Taps([(act, target), (act, target)])))


def test_dsg_loss_with_the_official_enhancement_hand_value():
    s = DSGSettings(margins="none", ce_weight=0.0, tv_weight=0.0, l2_weight=0.0)
    # per sample: hinge 1 at both layers; sample 0 enhanced at layer 0 (2^2), sample 1 at layer 1:
    # (4 + 1 + 1 + 4) / N = 10 / 2 = 5 (the earlier rule, weight 2 on the term: (2 + 1 + 1 + 2) / 2 = 3)
    assert _loss(s) == pytest.approx(5.0, rel=1e-5)
    assert _loss(DSGSettings(**{**vars(s), "enhance": "permutation"})) == pytest.approx(3.0, rel=1e-5)


def test_gdfq_weight_grid_is_zeroq_asymmetric_quant_function():
    # ZeroQ's AsymmetricQuantFunction at 2 bits on the row [-1, 0.2, 0.5, -0.4]: scale = 3 / 1.5 = 2,
    # zero point round(2 * -1) + 2 = 0, q = clamp(round(2 x), -2, 1), x_q = q / 2 -> [-1, 0, 0.5, -0.5]
    conv = nn.Conv2d(1, 1, (1, 4), bias=False)
    conv.weight.data = torch.tensor([[[[-1.0, 0.2, 0.5, -0.4]]]])
    q = quantize_model(nn.Sequential(conv), Convention.from_dict({"name": "gdfq"}), 2, 8)
    torch.testing.assert_close(quant_layers(q)[0].quantized_weight().flatten(), torch.tensor([-1.0, 0.0, 0.5, -0.5]))
