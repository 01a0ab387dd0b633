"""The fixes that parity with the official SQuant and ACIQ code exposed (scripts/parity/, results/parity.csv), each
pinned by a hand-computed value that the behaviour before the fix does not give."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import compose_cfg
from dfqbench.methods.aciq import (ACIQ, ACIQWeightQuantizer, ImageMoments, allocate_bits, clip_range, clip_ratio,
                                   match_mean, relu_clip_ratio)
from dfqbench.methods.base import QuantContext
from dfqbench.methods.squant import SQuant, squant_clip, squant_round
from dfqbench.quant import Convention, WeightQuantizer, act_quantizers, quantize_model
from dfqbench.runner import build_convention, build_method
from test_wrap import tiny_model

SIGMAS = {4: 12.0, 6: 14.0, 8: 25.0}


# ---- SQuant --------------------------------------------------------------------------------------------------

def test_squant_takes_the_rounding_error_before_the_clamp():
    # grid [-8, 7]; -8.45 (half a step below the grid, as a rounded zero point leaves a channel's minimum) rounds
    # to -8 with error +0.45, which counts: errors +0.45 +0.35 +0.10 sum to 0.90 -> one flip down, of the largest
    # down candidate (-8.45 may not go below the grid): -2.35 -> -3. Clamping first gave error 0 there, a sum of
    # 0.45 and no flip: [-8, -2, 1].
    x = torch.tensor([[[-8.45, -2.35, 0.9]]])
    assert squant_round(x, -8, 7, "ek").tolist() == [[[-8.0, -3.0, 1.0]]]
    assert squant_round(x, -8, 7, "ekc").tolist() == [[[-8.0, -3.0, 1.0]]]
    assert squant_round(x, -8, 7, "e").tolist() == [[[-8.0, -2.0, 1.0]]]  # round to nearest: no sums


def test_squant_clamps_first_what_lies_beyond_half_a_step():
    # -11.3 is a clipped element (a clipping estimator cut it): clamped to -8 first, no error; 0.35 + 0.1 < 0.5
    x = torch.tensor([[[-11.3, -2.35, 0.9]]])
    assert squant_round(x, -8, 7, "ekc").tolist() == [[[-8.0, -2.0, 1.0]]]


def test_squant_result_stays_on_the_grid_at_both_ends():
    torch.manual_seed(0)
    x = torch.empty(16, 8, 9).uniform_(-8.5, 7.5)  # the whole min/max range, half a step past both ends
    for mode in ("e", "ek", "ekc"):
        q = squant_round(x, -8, 7, mode)
        assert q.min() >= -8 and q.max() <= 7 and torch.equal(q, q.round())
    lo = torch.full((16, 1, 1), -3.0)
    hi = torch.full((16, 1, 1), 12.0)
    q = squant_round(x + 5.0, lo, hi, "ekc")  # per-channel bounds
    assert q.min() >= -3 and q.max() <= 12


def test_squant_clip_sigma_of_the_run_for_an_8_bit_quantizer():
    # positives 1, 2, 3: std 1. An 8-bit quantizer in a W4A4 run: s = 12 (the run's -s, official), no cap at 8 bit
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert squant_clip(x, 8, SIGMAS, sigma_bits=4) == (0.0, pytest.approx(12.0))
    assert squant_clip(x, 8, SIGMAS) == (0.0, pytest.approx(25.0))  # sigma_from=quantizer: its own bits
    assert squant_clip(x, 4, SIGMAS, sigma_bits=4) == (0.0, 3.0)  # capped at the max below 6 bits


def _official_squant() -> Convention:
    return Convention.from_dict({"name": "official_squant", "act": {"sites": "each_layer_input"},
                                 "layers": {"last_abit": 8}})


@pytest.mark.parametrize("sigma_from,s", [("abit", 12.0), ("quantizer", 25.0)])
def test_squant_method_sets_the_fc_input_with_the_runs_multiplier(sigma_from, s):
    model = tiny_model()
    conv = _official_squant()
    qmodel = quantize_model(model, conv, 4, 4)
    last = act_quantizers(qmodel)[-1]
    assert last.bits == 8
    seen = []
    last.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    method = SQuant(batch_size=8, sigma_from=sigma_from)
    ctx = QuantContext(conv, 4, 4, 0, torch.device("cpu"), (3, 8, 8), 4, progress=False)
    method._set_activation_ranges(qmodel, ctx)
    pos = seen[0][seen[0] > 0]
    assert float(last.lo) == 0.0
    assert float(last.hi) == pytest.approx(s * float(pos.std()), rel=1e-4)


def test_squant_refuses_an_unknown_sigma_source():
    with pytest.raises(ValueError, match="sigma_from"):
        SQuant(sigma_from="bits")


# ---- placement: each_layer_input -----------------------------------------------------------------------------

def test_each_layer_input_leaves_identities_in_float_and_quantizes_the_pooled_fc_input():
    q = quantize_model(tiny_model(), _official_squant(), wbit=4, abit=4)
    # conv1, conv2 and fc quantize their own input; the image (stem conv's input) is not quantized
    assert [a.bits for a in act_quantizers(q)] == [4, 4, 8]
    nodes = {n.name: n for n in q.graph.nodes}
    add = next(n for n in q.graph.nodes if n.name == "add")
    assert nodes["stem_2"] in add.args  # the residual identity reads the float ReLU output
    assert nodes["conv1"].args[0].op == "call_module" and nodes["conv1"].args[0].target.startswith("act_quant")
    fc_in = nodes["fc"].args[0]
    assert fc_in.target.startswith("act_quant") and fc_in.args[0].name == "flatten"  # after pool and flatten
    x = torch.randn(2, 3, 8, 8)
    float_conv = Convention.from_dict({"name": "x", "act": {"sites": "each_layer_input"}})
    assert torch.allclose(quantize_model(tiny_model(), float_conv, 32, 32)(x), tiny_model()(x))


def test_layer_inputs_still_shares_one_quantizer_before_the_pool():
    conv = Convention.from_dict({"name": "squant", "act": {"sites": "layer_inputs"}, "layers": {"last_abit": 8}})
    q = quantize_model(tiny_model(), conv, wbit=4, abit=4)
    assert [a.bits for a in act_quantizers(q)] == [4, 4, 8]
    nodes = {n.name: n for n in q.graph.nodes}
    add = nodes["add"]
    assert any(a.op == "call_module" and a.target == "act_quant_0" for a in add.args)  # shared with the identity
    assert nodes["pool"].args[0].target == "act_quant_2"  # the FC's quantizer sits before the pool


def test_official_squant_preset_composes():
    cfg = compose_cfg("method=squant", "quant=official_squant")
    conv = build_convention(cfg, build_method(cfg))
    assert conv.act.sites == "each_layer_input" and conv.layers.last_abit == 8 and not conv.fold_bn
    assert conv.layers.first_wbit is None and conv.layers.input_abit is None
    assert cfg.method.sigma_from == "abit"


# ---- ACIQ ----------------------------------------------------------------------------------------------------

def test_aciq_one_sided_laplace_clip_of_a_unit_scale_tensor():
    # [0, alpha] with 16 levels has the step of [-alpha, alpha] with 32: the 5-bit two-sided optimum (the official
    # table: alpha_laplace_positive[4] = 6.2 = alpha_laplace[5]); two-sided at 4 bits it is 5.03
    assert relu_clip_ratio(16, "laplace") == pytest.approx(6.2048, abs=1e-3)
    assert clip_ratio(16, "laplace") == pytest.approx(5.0286, abs=1e-3)
    assert relu_clip_ratio(16, "gaussian") == pytest.approx(2.9362, abs=1e-3)  # official 2.93 (truncated)
    assert relu_clip_ratio(4, "laplace") == pytest.approx(3.8972, abs=1e-3)  # 2 bits: the 3-bit two-sided 3.89


def _aciq_convention() -> Convention:
    return Convention.from_dict({"name": "aciq", "fold_bn": True,
                                 "act": {"sites": "after_relu", "granularity": "per_channel"}})


@pytest.mark.parametrize("relu_clip,ratio", [("one_sided", 6.2048), ("two_sided", 5.0286)])
def test_aciq_post_relu_range_from_bn_statistics(relu_clip, ratio):
    model = tiny_model()
    bn = model.stem[1]
    beta, b = bn.bias.detach(), bn.weight.detach().abs() * (2 / torch.pi) ** 0.5  # Laplace b of N(beta, gamma^2)
    conv = _aciq_convention()
    method = ACIQ(bit_alloc_acts=False, bit_alloc_weights=False, bias_correction=False, relu_clip=relu_clip)
    ctx = QuantContext(conv, 32, 4, 0, torch.device("cpu"), (3, 8, 8), 4, progress=False)
    q = method.quantize(tiny_model(), ctx)
    stem = act_quantizers(q)[0]  # after the stem's ReLU
    if relu_clip == "one_sided":  # [0, max(beta, 0) + 6.20 b]
        expected_lo, expected_hi = torch.zeros_like(beta), beta.clamp_min(0) + ratio * b
    else:  # [beta - 5.03 b, beta + 5.03 b], cut at 0 by the ReLU
        expected_lo, expected_hi = (beta - ratio * b).clamp_min(0), (beta + ratio * b).clamp_min(0)
    assert torch.allclose(stem.lo, expected_lo, atol=1e-4)
    assert torch.allclose(stem.hi, expected_hi, rtol=1e-3, atol=1e-4)


def test_aciq_refuses_an_unknown_relu_clip():
    with pytest.raises(ValueError, match="relu_clip"):
        ACIQ(relu_clip="half")


def test_allocate_bits_whole_bits_by_std_keeping_the_mean():
    # std 1 and 8: s^(2/3) = 1 and 4; 2 x 2^4 levels shared 1:4 = 6.4 and 25.6 -> log2 2.68, 4.68 -> 3 and 5 bits
    assert allocate_bits(torch.tensor([1.0, 8.0]), 4).tolist() == [8.0, 32.0]
    levels = allocate_bits(torch.tensor([0.0, 1.0, 1.0, 1.0]), 4)
    assert levels[0] == 1.0  # a dead channel gets 0 bits: one level
    assert float(levels.log2().max()) <= 8


def test_weight_bias_correction_of_the_mean_only():
    q, w = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.4]])
    assert torch.allclose(match_mean(q, w), torch.tensor([[-0.2, 0.8]]))  # + (0.3 - 0.5); the spread stays


def test_zero_bit_weight_channel_is_its_mean():
    base = WeightQuantizer(4, per_channel=True)
    wq = ACIQWeightQuantizer(base, bit_alloc=True, correct=True, alloc_mode="bits_by_std", correct_std=False)
    w = torch.tensor([[0.1, 0.1, 0.1, 0.1], [-1.0, 0.0, 1.0, 2.0]])
    q = wq(w)
    assert wq.levels.tolist() == [1.0, 256.0]  # std 0 -> 0 bits; the mean of 4 bits goes to the other channel
    assert torch.allclose(q[0], torch.full((4,), 0.1))
    assert torch.allclose(q[1], w[1], atol=3 / 255)


def test_clip_range_two_sided_min_anchored_and_one_sided():
    mean, scale, levels = torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([16.0])
    lo, hi = clip_range(mean, scale, levels, "laplace")  # centred: +- 5.03
    assert lo.item() == pytest.approx(-5.0286, abs=1e-3) and hi.item() == pytest.approx(5.0286, abs=1e-3)
    lo, hi = clip_range(mean, scale, levels, "laplace", low=torch.tensor([-3.0]))  # max(-3, -5.03) + 2 x 5.03
    assert lo.item() == pytest.approx(-3.0) and hi.item() == pytest.approx(-3.0 + 10.0573, abs=1e-3)
    lo, hi = clip_range(torch.tensor([-0.5]), scale, levels, "laplace", floor=0.0, one_sided=True)
    assert lo.item() == 0.0 and hi.item() == pytest.approx(6.2048, abs=1e-3)  # max(mu, 0) + 6.20 b


class _Identity(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        self.conv.weight.data.fill_(1.0)

    def forward(self, x):
        return self.conv(x)


def test_image_moments_average_each_images_statistics():
    gm = torch.fx.symbolic_trace(_Identity())
    images = torch.tensor([[[[0.0, 2.0]]], [[[4.0, 8.0]]]])  # two 1x1x2 images
    m = ImageMoments(gm, [images[:1], images[1:]])
    node = next(n for n in gm.graph.nodes if n.name == "conv")
    st = m.of(node)
    # per image: mean 1, 6; E|x - mean| 1, 2; std sqrt 2, sqrt 8; min 0, 4; max 2, 8 -> their averages
    assert st["mean"].item() == pytest.approx(3.5) and st["mad"].item() == pytest.approx(1.5)  # pooled: 2.5
    assert st["std"].item() == pytest.approx((2**0.5 + 8**0.5) / 2, rel=1e-5)
    assert st["min"].item() == pytest.approx(2.0) and st["max"].item() == pytest.approx(5.0)
    assert m.spatial(node)


# ---- placement: layer_outputs --------------------------------------------------------------------------------

def _layer_outputs(**layers) -> Convention:
    return Convention.from_dict({"name": "official_aciq", "fold_bn": True, "layers": layers,
                                 "act": {"sites": "layer_outputs", "granularity": "per_channel"}})


def test_layer_outputs_quantizes_every_conv_and_linear_output():
    q = quantize_model(tiny_model(), _layer_outputs(second_abit=8), wbit=4, abit=4)
    # the stem conv (8 bit: what the 2nd layer reads), conv1, conv2 (the signed residual branch) and the logits
    assert [a.bits for a in act_quantizers(q)] == [8, 4, 4, 4]
    nodes = {n.name: n for n in q.graph.nodes}
    output = next(n for n in q.graph.nodes if n.op == "output")
    assert output.args[0].target.startswith("act_quant")  # the logits
    assert any(a.op == "call_module" and a.target.startswith("act_quant") for a in nodes["add"].args)
    assert nodes["fc"].args[0].name == "flatten"  # the FC input is not quantized


def test_aciq_quantizer_in_front_of_a_relu_clips_one_sided():
    model = tiny_model()
    bn = model.stem[1]
    beta, b = bn.bias.detach(), bn.weight.detach().abs() * (2 / torch.pi) ** 0.5
    conv = _layer_outputs()
    method = ACIQ(bit_alloc_acts=False, bit_alloc_weights=False, bias_correction=False)
    q = method.quantize(tiny_model(), QuantContext(conv, 32, 4, 0, torch.device("cpu"), (3, 8, 8), 4, progress=False))
    stem = act_quantizers(q)[0]  # the stem conv's output, read by its ReLU only
    assert torch.allclose(stem.lo, torch.zeros_like(beta))
    assert torch.allclose(stem.hi, beta.clamp_min(0) + 6.2048 * b, rtol=1e-3, atol=1e-4)


# ---- an official preset carries the method's official settings -----------------------------------------------

def test_method_settings_of_the_convention_replace_the_methods():
    conv = Convention.from_dict({"name": "x", "method_settings": {"aciq": {"weight_correction": "mean",
                                                                          "stats": "calib", "calib_data": "real"}}})
    method = ACIQ()
    assert (method.weight_correction, method.stochastic) == ("mean_std", False)
    method.check_convention(conv)
    assert (method.weight_correction, method.stats, method.stochastic) == ("mean", "calib", True)
    with pytest.raises(ValueError, match="unknown setting"):
        ACIQ().check_convention(Convention.from_dict({"name": "x", "method_settings": {"aciq": {"alpha": 1}}}))
    with pytest.raises(ValueError, match="method_settings"):
        Convention.from_dict({"name": "x", "method_settings": {"aciq": 3}})


def test_official_aciq_preset_composes():
    cfg = compose_cfg("method=aciq", "quant=official_aciq")
    method = build_method(cfg)
    conv = build_convention(cfg, method)
    assert conv.act.sites == "layer_outputs" and conv.fold_bn and conv.layers.first_wbit == 8
    assert conv.layers.second_abit == 8 and conv.layers.last_wbit is None and conv.layers.last_abit is None
    assert conv.fold_scope == "module" and conv.layers.norm_abit == 8  # search_absorbe_bn; BatchNorm2dWithId
    assert method.first_output_range == "mean_minmax"  # the code's 'ignored' conv0_activation
    assert (method.stats, method.calib_data, method.calib_images) == ("calib", "real", 32)
    assert (method.calib_stats, method.signed_range, method.bit_alloc, method.weight_correction, method.relu_clip) \
        == ("per_image", "min_anchored", "bits_by_std", "mean", "one_sided")
    other = compose_cfg("method=rtn", "quant=official_aciq")  # another method ignores aciq's settings
    build_convention(other, build_method(other))


def test_aciq_driver_pairs_dfqbench_with_the_images_each_official_seed_drew():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "parity"))
    import aciq as driver

    runs = [{"seed": 0, "calib_list": "results/parity/aciq/w4a4/official-s0.calib.txt"}, {"seed": 1}]
    over = driver.paired_overrides(runs, 0, "official_aciq")
    assert over[0] == "quant.method_settings.aciq.calib_data=listed"
    assert over[1].startswith("paths.calib_list=/") and over[1].endswith("results/parity/aciq/w4a4/official-s0.calib.txt")
    assert driver.paired_overrides(runs, 1, "official_aciq") == []  # an older run without its drawn images
    assert driver.paired_overrides(runs, 0, "aciq") == []  # the data-free preset reads no training images


@pytest.mark.parametrize("relu", [True, False])
def test_aciq_first_output_range_mean_minmax_is_the_mean_of_per_image_extremes(relu):
    from dfqbench.quant.transforms.graph import module_of, trace
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU() if relu else nn.Identity(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(5, 3, 6, 6)
    gm = trace(model)
    moments = ImageMoments(gm, [x])
    conv = Convention.from_dict({"name": "t", "act": {"sites": "layer_outputs", "granularity": "per_channel"},
                                 "layers": {"second_abit": 8}})
    q = quantize_model(gm, conv, 4, 4)
    ctx = QuantContext(conv, 4, 4, 0, torch.device("cpu"), (3, 6, 6), 2, progress=False)
    ours = ACIQ(stats="calib", calib_stats="per_image", first_output_range="mean_minmax")
    ours._set_activation_ranges(q, moments, ctx)
    first = next(module_of(q, n) for n in q.graph.nodes if n.op == "call_module" and n.args
                 and getattr(n.args[0], "target", None) == "0" and module_of(q, n) is not q.get_submodule("2"))
    with torch.no_grad():
        y = model[0](x).reshape(5, -1)
    lo = 0.0 if relu else float(y.amin(1).mean())  # the code's half_range before a ReLU
    assert not first.per_channel and first.bits == 8
    assert float(first.lo) == pytest.approx(lo, abs=1e-6) and float(first.hi) == pytest.approx(float(y.amax(1).mean()))
    default = quantize_model(trace(model), conv, 4, 4)
    ACIQ(stats="calib", calib_stats="per_image")._set_activation_ranges(default, ImageMoments(trace(model), [x]), ctx)
    assert any(m.per_channel and m.bits == 8 for m in default.modules() if hasattr(m, "per_channel") and
               hasattr(m, "bits") and not hasattr(m, "weight"))  # aciq: the first output per channel, as before
    with pytest.raises(ValueError, match="method.first_output_range='max' is not valid; choose one of: aciq, "
                                         "mean_minmax"):
        ACIQ(first_output_range="max")


def test_official_aciq_keeps_a_1000_way_classifier_at_8_bit_on_imagenet_only():
    cfg = compose_cfg("method=aciq", "quant=official_aciq", "model=resnet18", "dataset=imagenet")
    method = build_method(cfg)
    conv = build_convention(cfg, method)
    assert (conv.layers.last_wbit, conv.layers.logits_abit, method.last_output_range) == (8, 8, "global_minmax")
    assert "per_setting" not in cfg.quant  # merged into the run's quant config (its hash and record)
    cifar = compose_cfg("method=aciq", "quant=official_aciq")
    method = build_method(cifar)
    conv = build_convention(cifar, method)
    assert (conv.layers.last_wbit, conv.layers.logits_abit, method.last_output_range) == (None, None, "aciq")
    from dfqbench.method_overrides import apply_per_setting
    user = compose_cfg("method=aciq", "quant=official_aciq", "model=resnet18", "dataset=imagenet",
                       "quant.layers.last_wbit=4")
    apply_per_setting(user, ["quant.layers.last_wbit=4"])  # the command line wins over the preset's entry
    assert (user.quant.layers.last_wbit, user.quant.layers.logits_abit) == (4, 8)


@pytest.mark.parametrize("relu_before", [True, False])
def test_aciq_last_output_range_global_minmax_is_the_extreme_logit_over_the_images(relu_before):
    from dfqbench.quant.transforms.graph import module_of, trace
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5),
                          nn.ReLU() if relu_before else nn.Identity()).eval()
    x = torch.randn(6, 3, 6, 6)
    conv = Convention.from_dict({"name": "t", "act": {"sites": "layer_outputs", "granularity": "per_channel"},
                                 "layers": {"last_wbit": 8, "logits_abit": 8}})
    q = quantize_model(trace(model), conv, 4, 4)
    ctx = QuantContext(conv, 4, 4, 0, torch.device("cpu"), (3, 6, 6), 5, progress=False)
    ACIQ(stats="calib", calib_stats="per_image", last_output_range="global_minmax")._set_activation_ranges(
        q, ImageMoments(trace(model), [x[:4], x[4:]]), ctx)
    logits_q = next(module_of(q, n) for n in q.graph.nodes if n.op == "call_module" and n.args
                    and getattr(n.args[0], "target", None) == "3")
    with torch.no_grad():
        y = model[:4](x)
    assert not logits_q.per_channel and logits_q.bits == 8
    # over all 6 images, not a mean of per-image extremes, and no half range even before a ReLU (the code's)
    assert float(logits_q.lo) == pytest.approx(float(y.min())) and float(logits_q.hi) == pytest.approx(float(y.max()))
    assert q.get_submodule("3").weight_quantizer.bits == 8 and q.get_submodule("0").weight_quantizer.bits == 4
    with pytest.raises(ValueError, match="method.last_output_range=global_minmax needs method.stats=calib and "
                                         "method.calib_stats=per_image, not bn / pooled"):
        ACIQ(last_output_range="global_minmax")
