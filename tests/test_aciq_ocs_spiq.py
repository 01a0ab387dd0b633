"""ACIQ, OCS and SPIQ, and the per-channel activation granularity they use: hand-computed quantizer outputs,
the ACIQ clipping equation, OCS splitting, and W8A8 accuracy of each method with the real teacher."""

import math

import pytest
import torch
from torch import nn

from conftest import compose_cfg as _cfg, run_cli
from dfqbench.methods.aciq import (ACIQ, ChannelMoments, allocate_levels, clip_ratio, level_grid,
                                   match_mean_std)
from dfqbench.methods.ocs import OCS, OCSWeightQuantizer, expand, merge, profile_float_ranges, split_channels
from dfqbench.methods.spiq import SPIQ, FoldedInputWeightQuantizer, weight_column_scale
from dfqbench.quant import ActQuantizer, Convention, WeightQuantizer, quantize_model
from dfqbench.quant.calibration.calibrate import set_ranges_from_bn
from dfqbench.quant.transforms.graph import trace
from dfqbench.quant.quantizers.ranges import grid_from_range
from dfqbench.runner import run

SLICE = 1000


# ---- ACIQ's clipping equation --------------------------------------------------------------------------------

def _laplace_mse(t, levels):  # b = 1: clipping 2 e^-t + rounding t^2 / (3 L^2)
    return 2 * math.exp(-t) + t * t / (3 * levels**2)


def _gauss_mse(t, levels):  # sigma = 1
    clip = (t * t + 1) * math.erfc(t / math.sqrt(2)) - math.sqrt(2 / math.pi) * t * math.exp(-t * t / 2)
    return clip + t * t / (3 * levels**2)


def test_optimal_clip_matches_the_paper_and_minimizes_the_mse():
    assert clip_ratio(16, "laplace") == pytest.approx(5.03, abs=0.005)  # 4 bits: alpha = 5.03 b
    assert clip_ratio(8, "laplace") == pytest.approx(3.89, abs=0.01)
    assert clip_ratio(4, "laplace") == pytest.approx(2.83, abs=0.005)
    assert clip_ratio(16, "gaussian") == pytest.approx(2.55, abs=0.01)  # 4 bits: alpha = 2.55 sigma
    assert clip_ratio(4, "gaussian") == pytest.approx(1.71, abs=0.005)
    # Laplace optimum by hand: e^-t = t / (3 * 16^2) at t = 5.03
    assert math.exp(-5.03) == pytest.approx(5.03 / 768, rel=0.01)
    for levels in (4, 16, 2**5.5, 256):  # fractional bit-widths work too
        for prior, mse in (("laplace", _laplace_mse), ("gaussian", _gauss_mse)):
            t = clip_ratio(levels, prior)
            assert mse(t, levels) <= min(mse(t * 0.98, levels), mse(t * 1.02, levels))


def test_bad_prior_is_refused():
    with pytest.raises(ValueError, match=r"prior='cauchy'.*laplace, gaussian"):
        ACIQ(prior="cauchy")


# ---- per-channel activation granularity ----------------------------------------------------------------------

def test_per_channel_activation_fake_quant_by_hand():
    q = ActQuantizer(bits=2, per_channel=True)
    q.set_range(torch.tensor([0.0, -1.0]), torch.tensor([3.0, 1.0]))
    # channel 0: [0, 3], scale 1, zero point 0. channel 1: [-1, 1], scale 2/3, zero point round(1.5) = 2
    x = torch.tensor([[[[0.4, 1.6, 5.0]], [[-0.9, 0.2, 0.9]]]])  # [N=1, C=2, H=1, W=3]
    expected = torch.tensor([[[[0.0, 2.0, 3.0]], [[-2 / 3, 0.0, 2 / 3]]]])
    assert q.lo.shape == (2,)
    assert torch.allclose(q(x), expected, atol=1e-6)
    # the same range per tensor is the envelope [-1, 3]: scale 4/3, zero point 1
    t = ActQuantizer(bits=2)
    t.set_range(torch.tensor([0.0, -1.0]), torch.tensor([3.0, 1.0]))
    assert (t.lo.item(), t.hi.item()) == (-1.0, 3.0)
    assert torch.allclose(t(x[:, :1]), torch.tensor([[[[0.0, 4 / 3, 8 / 3]]]]), atol=1e-6)


def test_per_channel_observing_and_state_dict():
    q = ActQuantizer(bits=8, per_channel=True)
    q.start_observing()
    q(torch.tensor([[[1.0], [-2.0]], [[3.0], [0.5]]]))  # [N=2, C=2, L=1]
    q(torch.tensor([[[-1.0], [4.0]]]))
    q.stop_observing()
    assert q.lo.tolist() == [-1.0, -2.0] and q.hi.tolist() == [3.0, 4.0]
    fresh = ActQuantizer(bits=8, per_channel=True)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(4, 2, 5)
    assert torch.equal(fresh(x), q(x))


def _conv_bn_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model[1].weight.data = torch.tensor([1.0, 0.5, 2.0, 1.0])
    model[1].bias.data = torch.tensor([0.0, 1.0, -1.0, -10.0])
    return model.eval()


def test_per_channel_ranges_from_batchnorm_by_hand():
    conv = Convention.from_dict({"name": "t", "act": {"granularity": "per_channel"}})
    qmodel = quantize_model(_conv_bn_relu(), conv, 8, 8)
    set_ranges_from_bn(qmodel, 3.0)
    (q,) = [m for m in qmodel.modules() if isinstance(m, ActQuantizer)]
    # beta +- 3 |gamma|, clipped at 0 by the ReLU
    assert q.lo.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert q.hi.tolist() == [3.0, 2.5, 5.0, 0.0]


def test_act_granularity_is_validated():
    with pytest.raises(ValueError, match=r"quant.act.granularity='per_row'.*per_channel, per_tensor"):
        Convention.from_dict({"name": "t", "act": {"granularity": "per_row"}})


@pytest.mark.parametrize("key", ["weight", "act"])
def test_the_mse_estimators_norm_must_be_positive(key):
    """estimator=mse picks the range minimizing the L_p error: p <= 0 is no norm and was accepted silently."""
    for lp in (0, -3, float("inf"), True):
        with pytest.raises(ValueError, match=f"quant.{key}.lp={lp!r} must be a number > 0"):
            Convention.from_dict({"name": "t", key: {"estimator": "mse", "lp": lp}})
    assert getattr(Convention.from_dict({"name": "t", key: {"estimator": "mse", "lp": 2.4}}), key).lp == 2.4
    Convention.from_dict({"name": "t", key: {"estimator": "minmax", "lp": 0}})  # not read: left alone


# ---- ACIQ bit allocation and bias correction -----------------------------------------------------------------

def test_level_grid_with_power_of_two_levels_is_the_ordinary_grid():
    lo, hi = torch.tensor([-1.0, -0.2, 0.0]), torch.tensor([2.0, 0.3, 1.5])
    for symmetric in (False, True):
        ours, clamp_lo, clamp_hi = level_grid(lo, hi, torch.full((3,), 16.0), symmetric)
        ref = grid_from_range(lo, hi, 4, symmetric)
        assert torch.allclose(ours.scale, ref.scale) and torch.equal(ours.zero_point, ref.zero_point)
        assert (ours.qmin, ours.qmax) == (ref.qmin, ref.qmax)


def test_bit_allocation_follows_the_two_thirds_power_and_keeps_the_level_budget():
    ranges = torch.tensor([1.0, 8.0, 27.0, 64.0])  # R^(2/3) = 1, 4, 9, 16 (sum 30)
    levels = allocate_levels(ranges, 4)  # budget 4 * 16 = 64 levels
    assert levels.tolist() == [round(64 / 30), round(64 * 4 / 30), round(64 * 9 / 30), round(64 * 16 / 30)]
    assert abs(levels.sum().item() - 64) <= 2


def test_channel_with_fewer_levels_stays_on_its_own_grid():
    grid, clamp_lo, clamp_hi = level_grid(torch.tensor([0.0, 0.0]), torch.tensor([3.0, 3.0]),
                                          torch.tensor([4.0, 2.0]), symmetric=False)
    assert grid.scale.tolist() == [1.0, 3.0] and clamp_hi.tolist() == [3.0, 3.0]


def test_bias_correction_restores_each_channels_mean_and_std():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    q = WeightQuantizer(3, per_channel=True)(w)
    fixed = match_mean_std(q, w)
    dims = (1, 2, 3)
    assert torch.allclose(fixed.mean(dims), w.mean(dims), atol=1e-6)
    assert torch.allclose(fixed.std(dims), w.std(dims), atol=1e-5)


def test_channel_moments_match_a_direct_computation():
    model = _conv_bn_relu()
    gm = trace(model)
    batches = [torch.randn(4, 3, 8, 8), torch.randn(2, 3, 8, 8)]
    moments = ChannelMoments(gm, batches)
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")  # the BN output
    with torch.no_grad():
        out = torch.cat([model[1](model[0](x)) for x in batches]).transpose(0, 1).reshape(4, -1)
    mean, mad, std = moments.of(node)
    assert torch.allclose(mean, out.mean(1), atol=1e-5)
    assert torch.allclose(mad, (out - out.mean(1, keepdim=True)).abs().mean(1), atol=1e-5)
    assert torch.allclose(std, out.std(1, unbiased=False), atol=1e-5)


# ---- OCS -----------------------------------------------------------------------------------------------------

def test_splitting_by_hand_and_float_output_preserved():
    w = torch.tensor([[4.0, -1.0, 2.0]])
    index, factor = split_channels(w, 2)  # 4 -> 2, 2 (then the first 2 again -> 1, 1)
    assert index.tolist() == [0, 1, 2, 0, 0] and factor.tolist() == [0.25, 1.0, 1.0, 0.5, 0.25]
    assert expand(w, index, factor).tolist() == [[1.0, -1.0, 2.0, 2.0, 1.0]]

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, bias=False)
    conv.weight.data[3, 5, 1, 1] = 3.0  # an outlier
    index, factor = split_channels(conv.weight, 3)
    expanded = expand(conv.weight, index, factor)
    assert expanded.abs().max() < conv.weight.abs().max()
    assert torch.equal(merge(expanded, index, 16), conv.weight)  # halving is exact in floating point
    x = torch.randn(2, 16, 6, 6)
    split_out = nn.functional.conv2d(x[:, index], expanded)  # the expanded layer on duplicated inputs
    assert torch.allclose(split_out, conv(x), atol=1e-5)


def test_ocs_quantizer_by_hand():
    base = WeightQuantizer(3, per_channel=False, symmetric=True)
    q = OCSWeightQuantizer(base, expand_ratio=0.5, clip="max")  # ceil(0.5 * 3) = 2 splits
    w = torch.tensor([[4.0, -0.9, 2.2]])
    # splits 4 -> 2 + 2, then 2.2 -> 1.1 + 1.1: expanded [2, -0.9, 1.1, 2, 1.1], max 2 (was 4); signed 3-bit grid
    # (qmax 3), scale 2/3: [2, -2/3, 4/3, 2, 4/3]; summed back per input channel: [4, -2/3, 8/3]
    assert torch.allclose(q(w), torch.tensor([[4.0, -2 / 3, 8 / 3]]), atol=1e-6)
    assert q.index.tolist() == [0, 1, 2, 0, 2] and q.splits == 2
    plain = OCSWeightQuantizer(base, expand_ratio=0.0, clip="max")  # scale 4/3: a larger error on -0.9 and 2.2
    assert torch.allclose(plain(w), torch.tensor([[4.0, -4 / 3, 8 / 3]]), atol=1e-6) and plain.splits == 0


def test_float_profile_sees_the_float_model_and_restores_the_quantizers():
    """OCS's profile mode: every activation quantizer's range is the min / max of its input in the float model
    (float weights, every activation passed through), and the quantizers are as before afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.ReLU(),
                          nn.Conv2d(3, 2, 1)).eval()
    qmodel = quantize_model(model, Convention.from_dict({"name": "t"}), 2, 2)
    acts = [m for m in qmodel.modules() if isinstance(m, ActQuantizer)]
    weights = [m.weight_quantizer for m in qmodel.modules() if isinstance(getattr(m, "weight_quantizer", None),
                                                                            WeightQuantizer)]
    assert len(acts) == 2 and len(weights) == 3
    for q in acts:  # a narrow range: an activation quantized while profiling would change what the next one sees
        q.set_range(torch.tensor(0.0), torch.tensor(0.1))
    batches = [torch.randn(5, 3, 6, 6), 3 * torch.randn(2, 3, 6, 6)]
    seen = profile_float_ranges(qmodel, batches)
    with torch.no_grad():
        firsts = [model[:3](x) for x in batches]
        seconds = [model[:5](x) for x in batches]
    for q, feats in zip(acts, (firsts, seconds)):
        lo, hi = seen[q]
        assert torch.equal(lo, min(f.min() for f in feats)) and torch.equal(hi, max(f.max() for f in feats))
    assert [m.weight_quantizer for m in qmodel.modules() if hasattr(m, "weight_quantizer")] == weights
    assert [q.bits for q in acts] == [2, 2] and not any(q._forward_pre_hooks for q in acts)


@pytest.mark.parametrize("per_channel,symmetric", [(False, True), (True, False)])
def test_ocs_without_splits_is_the_shared_weight_quantizer(per_channel, symmetric):
    assert OCSWeightQuantizer.forward is WeightQuantizer.forward  # only calibrate / quantize_on_grid differ
    torch.manual_seed(0)
    w = torch.randn(8, 16, 3, 3).requires_grad_(True)
    base = WeightQuantizer(4, per_channel=per_channel, symmetric=symmetric)
    ocs = OCSWeightQuantizer(base, expand_ratio=0.0, clip="max")
    assert torch.equal(ocs(w), base(w))
    ocs(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through, as the shared quantizer


@pytest.mark.parametrize("kwargs,needle", [
    ({"expand_ratio": 0.6}, "expand_ratio=0.6"), ({"expand_ratio": -0.01}, "expand_ratio=-0.01"),
    ({"clip": "entropy"}, "clip='entropy'"), ({"stats": "data"}, "stats='data'"),
    ({"calib_data": "imagenet"}, "calib_data='imagenet'"),
])
def test_ocs_refuses_bad_settings(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        OCS(**kwargs)


def test_bad_settings_of_aciq_and_spiq_are_refused():
    with pytest.raises(ValueError, match="stats='online'.*bn, calib"):
        ACIQ(stats="online")
    with pytest.raises(ValueError, match="calib_data='nope'"):
        ACIQ(calib_data="nope")
    with pytest.raises(ValueError, match="k_std=-1"):
        SPIQ(k_std=-1)


def test_cli_refuses_an_out_of_range_expand_ratio(tmp_path):
    proc = run_cli("method=ocs", "method.expand_ratio=0.9", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dfqbench: error: ")
    assert "expand_ratio=0.9" in lines[0] and "[0, 0.5]" in lines[0]
    assert not (tmp_path / "record.json").exists()


# ---- SPIQ ----------------------------------------------------------------------------------------------------

def test_input_scales_fold_into_the_weights_by_hand():
    w = torch.tensor([[1.0, 1.0], [0.5, -2.0]])  # linear [out=2, in=2]
    s = torch.tensor([1.0, 0.25])  # input channel scales
    q = FoldedInputWeightQuantizer(WeightQuantizer(2, per_channel=True, symmetric=True), s, groups=1)
    # W diag(s) = [[1, 0.25], [0.5, -0.5]]; signed 2-bit (qmax 1): row 0 scale 1 -> [1, 0], row 1 scale 0.5 ->
    # [0.5, -0.5]; divided by s again: [[1, 0], [0.5, -2]]
    assert torch.allclose(q(w), torch.tensor([[1.0, 0.0], [0.5, -2.0]]))
    grouped = weight_column_scale(torch.arange(1.0, 5.0), torch.zeros(4, 2, 1, 1), groups=2)
    assert grouped.flatten().tolist() == [1, 2, 1, 2, 3, 4, 3, 4]


# ---- whole methods -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,quant", [
    ("aciq", "gdfq"), ("aciq", "aciq"), ("ocs", "gdfq"), ("ocs", "ocs"), ("spiq", "gdfq"), ("spiq", "brecq"),
])
def test_w8a8_stays_within_half_a_point_of_fp32(tmp_path, cache_dir, cifar10_root, teacher, method, quant):
    record = run(_cfg(f"method={method}", f"quant={quant}", "wbit=8", "abit=8", f"model.checkpoint={teacher}",
                      f"dataset.root={cifar10_root}", f"dataset.max_samples={SLICE}",
                      f"paths.cache_dir={cache_dir}"), tmp_path)
    assert record["status"] == "done" and record["n_test"] == SLICE
    assert abs(record["fp32_top1"] - record["top1"]) <= 0.5


@pytest.mark.parametrize("method,quant", [
    (m, q) for m, own in (("aciq", ["aciq"]), ("ocs", ["ocs"]), ("spiq", [])) for q in ["gdfq", "brecq", "dfq", *own]
])
def test_methods_run_on_a_never_seen_teacher_under_every_preset(tmp_path, cache_dir, cifar10_root, method, quant):
    record = run(_cfg("model=pytorchcv", "model.arch=preresnet20_cifar10", "model.pretrained=false",
                      f"dataset.root={cifar10_root}", "dataset.max_samples=100", f"paths.cache_dir={cache_dir}",
                      f"method={method}", f"quant={quant}", "wbit=4", "abit=4"), tmp_path)
    assert record["status"] == "done", record.get("error")


@pytest.mark.parametrize("method", ["aciq", "ocs"])
def test_calibration_statistics_option_uses_the_named_source(tmp_path, cache_dir, cifar10_root, teacher, method):
    record = run(_cfg(f"method={method}", f"quant={method}", "method.stats=calib", "method.calib_data=uniform_noise",
                      "wbit=8", "abit=8", f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}",
                      "dataset.max_samples=200", f"paths.cache_dir={cache_dir}"), tmp_path)
    assert record["status"] == "done" and record["info"]["calib_data"] == "uniform_noise"
    assert record["stochastic"]
