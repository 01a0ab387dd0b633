"""The Knowledge Within (kw) and AAC+ABN (aac_abn): the BN KL against its closed form, the synthesis lowering
it, the peak clip and BN re-estimation against hand values, and the bad-input errors."""

import math
import re

import pytest
import torch
from torch import nn

from conftest import tiny_bn_model
from dfqbench.methods.aac_abn import AACABN, adapt_batchnorm, most_responsive, peak_ranges
from dfqbench.methods.base import QuantContext
from dfqbench.methods.kw import KnowledgeWithin
from dfqbench.quant import ActQuantizer, Convention, quantize_model
from dfqbench.synth.bn_loop import BNTaps, bn_layers
from dfqbench.synth.bn_kl import bn_kl_loss, gaussian_kl
from dfqbench.synth.kw import KWSettings, KWSynthesis

pytestmark = pytest.mark.usefixtures("one_thread")


def _ctx(convention="gdfq", seed=0):
    return QuantContext(Convention.from_dict({"name": convention, "fold_bn": convention != "gdfq"}), 4, 4, seed,
                        torch.device("cpu"), (3, 8, 8), 5, progress=False)


def test_gaussian_kl_hand_values():
    one, two, zero = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.0)
    # KL(N(1, 4) || N(0, 1)) = log(1/2) + (4 + 1) / 2 - 1/2
    assert float(gaussian_kl(one, two, zero, one)) == pytest.approx(math.log(0.5) + 2.0, abs=1e-6)
    # KL(N(0, 1) || N(1, 4)) = log 2 + (1 + 1) / 8 - 1/2: not symmetric
    assert float(gaussian_kl(zero, one, one, two)) == pytest.approx(math.log(2) - 0.25, abs=1e-6)
    assert float(gaussian_kl(one, two, one, two)) == 0.0


def test_bn_kl_loss_is_zero_at_the_stored_statistics_and_the_channel_mean_of_the_kl_otherwise():
    torch.manual_seed(0)
    z = torch.randn(8, 2, 5, 5)
    z = (z - z.mean(dim=(0, 2, 3), keepdim=True)) / z.std(dim=(0, 2, 3), unbiased=False, keepdim=True)
    target_mean, target_std = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    x = z * target_std.view(1, 2, 1, 1) + target_mean.view(1, 2, 1, 1)  # batch moments = the targets exactly
    assert float(bn_kl_loss([(x, (target_mean, target_std))], unbiased=False)) == pytest.approx(0.0, abs=1e-4)
    # batch statistics N(0, 1) per channel against the stored ones: the channel mean of the closed form
    expected = sum(math.log(1 / s) + (s * s + m * m) / 2 - 0.5 for m, s in ((1.0, 0.5), (-2.0, 3.0))) / 2
    assert float(bn_kl_loss([(z, (target_mean, target_std))], unbiased=False)) == pytest.approx(expected, rel=1e-4)


def test_kw_synthesis_lowers_the_bn_kl_of_a_bn_net():
    model = tiny_bn_model()
    settings = KWSettings(batch_size=16, iterations=60, lr=0.1)
    synthesis = KWSynthesis(16, (3, 8, 8), 5, settings, torch.Generator().manual_seed(0), torch.device("cpu"))

    def kl(x):
        with torch.no_grad(), BNTaps(bn_layers(model, "test")) as taps:
            model(x)
            return float(bn_kl_loss(taps.pairs(), unbiased=False))

    start = torch.randn((16, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    from dfqbench.synth.bn_loop import synthesize_batches
    images, = synthesize_batches(model, synthesis, torch.device("cpu"))
    assert kl(images) < 0.5 * kl(start)


def test_peak_ranges_hand_values():
    q = ActQuantizer(4)
    model = nn.Sequential(nn.Identity(), q)
    b1 = torch.tensor([[1.0, 3.0], [0.0, 2.0]]).view(2, 2, 1, 1)  # image peaks 3, 2
    b2 = torch.tensor([[5.0, 0.5]]).view(1, 2, 1, 1)  # image peak 5
    assert peak_ranges(model, [b1, b2], "max") == 1
    assert (float(q.lo), float(q.hi)) == (0.0, 5.0)
    q2 = ActQuantizer(4)
    peak_ranges(nn.Sequential(q2), [b1, b2], "mean")
    assert float(q2.hi) == pytest.approx(10 / 3)
    qc = ActQuantizer(4, per_channel=True)
    peak_ranges(nn.Sequential(qc), [b1, b2], "mean")  # per channel: channel 0 peaks 1, 0, 5; channel 1 3, 2, .5
    torch.testing.assert_close(qc.hi, torch.tensor([2.0, 5.5 / 3]))


def test_adapt_batchnorm_sets_the_statistics_of_what_reaches_it():
    bn = nn.BatchNorm2d(2)
    model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), bn).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1) * 2)
    x1, x2 = torch.randn(4, 2, 3, 3), torch.randn(6, 2, 3, 3)
    assert adapt_batchnorm(model, [x1, x2]) == 1
    seen = torch.cat([x1, x2]) * 2
    # cumulative average over the two batches of each batch's mean and unbiased var
    mean = (seen[:4].mean(dim=(0, 2, 3)) + seen[4:].mean(dim=(0, 2, 3))) / 2
    var = (seen[:4].var(dim=(0, 2, 3)) + seen[4:].var(dim=(0, 2, 3))) / 2
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert not bn.training and bn.momentum == 0.1


def test_most_responsive_keeps_the_most_confident_images_in_order():
    model = nn.Sequential(nn.Flatten())  # logits = the input itself
    images = torch.tensor([[5.0, 0.0], [0.0, 0.1], [0.0, 9.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    kept, probs = most_responsive(model, images, labels, 2, batch_size=3)
    torch.testing.assert_close(kept, images[[0, 2]])
    assert probs.min() > 0.99


def test_aac_abn_quantizes_a_tiny_net_end_to_end():
    model = tiny_bn_model()
    method = AACABN(num_images=8, synthesis={"batch_size": 8, "iterations": 5})
    qmodel = method.quantize(model, ctx := _ctx())
    quantizers = [m for m in qmodel.modules() if isinstance(m, ActQuantizer) and m.enabled]
    assert quantizers and all(q.calibrated for q in quantizers)
    assert ctx.info["aac_quantizers"] == len(quantizers) and ctx.info["abn_layers"] == 2
    assert ctx.info["candidates"] == 16  # 8 kept / keep 0.5


@pytest.mark.parametrize("make, message", [
    (lambda: KnowledgeWithin(scheme="dream"), "method.scheme='dream' is not valid; choose one of: bn_stats, "
                                              "inception, gaussian"),
    (lambda: KnowledgeWithin(num_images=0), "method.num_images=0 must be an integer >= 1"),
    (lambda: KnowledgeWithin(lr=-1), "method.lr=-1 must be a number > 0"),
    (lambda: AACABN(peak="p99"), "method.peak='p99' is not valid; choose one of: max, mean"),
    (lambda: AACABN(keep=0), "method.keep=0 must be a number in (0, 1]"),
    (lambda: AACABN(synthesis={"steps": 3}), "method.synthesis has unknown keys ['steps']"),
])
def test_bad_settings_are_one_line_errors(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_abn_refuses_a_convention_that_folds_batchnorm():
    with pytest.raises(ValueError, match="ABN re-estimates BatchNorm layers, but quant=dfq folds them"):
        AACABN().check_convention(Convention.from_dict({"name": "dfq", "fold_bn": True}))
    AACABN(abn=False).check_convention(Convention.from_dict({"name": "dfq", "fold_bn": True}))


def test_kw_gaussian_scheme_is_the_unoptimized_start():
    model = tiny_bn_model()
    ctx = _ctx()
    qmodel = KnowledgeWithin(scheme="gaussian", num_images=8, batch_size=8).quantize(model, ctx)
    assert ctx.info["calib_data"] == "kw-gaussian"
    assert all(q.calibrated for q in qmodel.modules() if isinstance(q, ActQuantizer) and q.enabled)


def test_shift_batchnorm_moves_the_running_statistics_by_the_quantization_shift():
    from dfqbench.methods.aac_abn import shift_batchnorm

    def net(scale, bias):
        conv = nn.Conv2d(1, 1, 1, bias=True)
        with torch.no_grad():
            conv.weight.fill_(scale)
            conv.bias.fill_(bias)
        bn = nn.BatchNorm2d(1)
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(4.0)
        return nn.Sequential(conv, bn).eval()

    teacher, quantized = net(1.0, 0.0), net(2.0, 1.0)  # the "quantized" conv doubles and shifts its output
    x = torch.randn(8, 1, 3, 3)
    assert shift_batchnorm(teacher, quantized, [x]) == 1
    bn = quantized[1]
    mean, var = float(x.mean()), float(x.var(unbiased=False))
    assert float(bn.running_mean) == pytest.approx(5.0 + (2 * mean + 1) - mean, abs=1e-5)
    assert float(bn.running_var) == pytest.approx(4.0 * (4 * var + bn.eps) / (var + bn.eps), rel=1e-5)
    assert float(teacher[1].running_mean) == 5.0  # the teacher is left alone
    with pytest.raises(ValueError, match="method.abn=True is not valid; choose one of: shift, reestimate, false"):
        AACABN(abn=True)
