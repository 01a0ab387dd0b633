"""DSG (post-training): slack hinge, data-free margins, generation, ema calibration, runs on the real teacher."""

import math

import pytest
import torch
from pytorchcv.model_provider import get_model
from torch import nn

from conftest import compose_cfg, run_cli, tiny_bn_model
from dfqbench.methods.base import QuantContext
from dfqbench.methods.dsg import DSG, calibrate_ema
from dfqbench.quant import ActQuantizer, Convention
from dfqbench.runner import run
from dfqbench.synth.calib_data import SOURCES, calibration_batches
from dfqbench.synth.dsg import (DSGSettings, bn_input_sizes, dsg_batches, dsg_source, gaussian_margins,
                                layer_margins, slack_hinge)

SLICE = 1000
Z90 = 1.6448536269514722  # the 95th percentile of N(0, 1): |N(0, 1)| has it as its 90th percentile


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(*overrides):
    return compose_cfg("threads=1", "method=dsg", *overrides)


def _teacher(path):
    model = get_model("resnet20_cifar10", pretrained=False)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def _ctx(tmp_path=None, seed=0):
    conv = Convention.from_dict({"name": "gdfq"})
    return QuantContext(conv, 8, 8, seed, torch.device("cpu"), (3, 8, 8), 5, progress=False,
                        model_sha256="tiny" if tmp_path else None, cache_dir=str(tmp_path) if tmp_path else None)


def test_slack_hinge_is_zero_inside_the_margin_and_linear_outside():
    value = torch.tensor([0.5, 1.2, 0.8, 2.0, -1.0, 1.3])
    out = slack_hinge(value, torch.tensor(1.0), 0.3)
    # |value - 1| = 0.5, 0.2, 0.2, 1.0, 2.0, 0.3 -> minus 0.3, clipped at 0
    torch.testing.assert_close(out, torch.tensor([0.2, 0.0, 0.0, 0.7, 1.7, 0.0]))
    torch.testing.assert_close(slack_hinge(value, torch.tensor(1.0), 0.0), (value - 1).abs())
    # linear outside: the gradient is +-1 there and 0 inside
    v = value.clone().requires_grad_(True)
    slack_hinge(v, torch.tensor(1.0), 0.3).sum().backward()
    torch.testing.assert_close(v.grad, torch.tensor([-1.0, 0.0, 0.0, 1.0, -1.0, 0.0]))


def test_gaussian_margins_hand_values():
    bn = nn.BatchNorm2d(3, eps=0.0)
    bn.running_var.fill_(4.0)  # sigma = 2 (up to the 1e-6 of the target's eps)
    (m, s), = gaussian_margins([bn], [16], 90.0)
    assert m == pytest.approx(Z90 * 2 / 4, rel=1e-5)  # |N(0, sigma^2 / n)|
    assert s == pytest.approx(Z90 * 2 / math.sqrt(2 * 15), rel=1e-5)  # |N(0, sigma^2 / (2 (n - 1)))|
    # channels with different sigma: the pooled 90th percentile lies between the channels' own
    bn.running_var.copy_(torch.tensor([1.0, 4.0, 9.0]))
    (m, _), = gaussian_margins([bn], [1], 90.0)
    assert Z90 * 1 < m < Z90 * 3
    cdf = sum(math.erf(m / (sd * math.sqrt(2))) for sd in (1.0, 2.0, 3.0)) / 3
    assert cdf == pytest.approx(0.9, abs=1e-6)


def test_margins_of_the_real_teacher_are_positive_and_finite(teacher):
    model = _teacher(teacher)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn_input_sizes(model, bns, (3, 32, 32), "cpu") == [1024] * 7 + [256] * 7 + [64] * 7
    margins = layer_margins(model, (3, 32, 32), DSGSettings(margins="gaussian"), "cpu")
    assert len(margins) == len(bns) == 21
    for (m, s), bn in zip(margins, bns):
        assert 0 < m < math.inf and 0 < s < math.inf
        assert s < m  # the std of n values scatters less than their mean: sqrt(2 (n - 1)) > sqrt(n)
        assert m < float(bn.running_var.sqrt().max())  # a fraction of the layer's spread
    assert layer_margins(model, (3, 32, 32), DSGSettings(margins="none"), "cpu") == [(0.0, 0.0)] * 21
    # the default is the parity-checked zero margins (the official code run with zeros for its missing files)
    assert DSGSettings().margins == "none"
    assert layer_margins(model, (3, 32, 32), DSGSettings(), "cpu") == [(0.0, 0.0)] * 21


def test_generated_batch_shape_normalization_and_cache(tmp_path):
    model, ctx = tiny_bn_model(), _ctx(tmp_path)
    settings = DSGSettings(batch_size=6, iterations=150, margins="gaussian")  # the bounds below were set for it
    batches = dsg_batches(model, ctx, settings, 10)
    assert [tuple(b.shape) for b in batches] == [(6, 3, 8, 8), (4, 3, 8, 8)]
    x = torch.cat(batches)
    assert torch.isfinite(x).all()
    # from U(0, 1) (channel mean 0.5, std 0.29) into the teacher's normalized input space: the input prior pulls
    # each image's channels to mean 0 / std 1 (TV and L2 pull the std down a little, CE and BN terms push)
    flat = x.flatten(2)
    assert flat.mean(2).abs().max() < 0.3
    assert 0.5 < flat.std(2).min() and flat.std(2).max() < 2.0  # the official enhancement weighs 4: 1.59 seen
    assert "calib_cached" not in ctx.info and len(list((tmp_path / "calib").glob("dsg-*.pt"))) == 1
    again = dsg_batches(model, ctx, settings, 10)
    assert ctx.info["calib_cached"] is True
    torch.testing.assert_close(torch.cat(again), x)
    other_seed = dsg_batches(model, _ctx(tmp_path, seed=1), settings, 10)
    assert not torch.equal(torch.cat(other_seed), x)


def test_dsg_is_a_registered_calibration_source(tmp_path):
    assert SOURCES["dsg"] == "dfqbench.synth.dsg:dsg_source"
    ctx = _ctx(tmp_path)
    batches = calibration_batches("dsg", tiny_bn_model(), ctx, 5, 5)  # the paper's 500 steps, on a tiny model
    assert [tuple(b.shape) for b in batches] == [(5, 3, 8, 8)]
    assert ctx.info["calib_data"] == "dsg"
    torch.testing.assert_close(dsg_source(tiny_bn_model(), ctx, 5, 5)[0], batches[0])  # from the cache


def test_ema_range_is_the_batch_mean_of_per_sample_extremes_with_running_max():
    q = ActQuantizer(8)
    model = nn.Sequential(q)
    # per-sample min 1, -1 (mean 0), max 3, 5 (mean 4)
    calibrate_ema(model, [torch.tensor([[1.0, 2.0, 3.0], [-1.0, 5.0, 0.0]])])
    assert (float(q.lo), float(q.hi)) == (0.0, 4.0)
    calibrate_ema(model, [torch.tensor([[1.0, 2.0, 3.0], [-1.0, 5.0, 0.0]]), torch.tensor([[0.5, 6.0, 1.0]])])
    assert (float(q.lo), float(q.hi)) == (0.0, 6.0)  # running max over batches, min starts at 0
    calibrate_ema(model, [torch.tensor([[-2.0, 1.0], [-4.0, 3.0]])])
    assert (float(q.lo), float(q.hi)) == (-3.0, 2.0)
    # the range is frozen afterwards: a wider input is clipped to it
    assert float(model(torch.tensor([[-10.0, 10.0]])).abs().max()) <= 3.0 + 1e-6


def test_dsg_w8a8_close_to_fp32_and_w4a4_on_a_slice(tmp_path, cache_dir, cifar10_root, teacher):
    common = [f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}", f"dataset.max_samples={SLICE}",
              f"paths.cache_dir={cache_dir}", "method.iterations=50"]
    w8 = run(_cfg(*common, "wbit=8", "abit=8"), tmp_path / "w8")
    w4 = run(_cfg(*common, "wbit=4", "abit=4"), tmp_path / "w4")  # the same DSG batch, from the cache
    assert w8["status"] == w4["status"] == "done" and w8["stochastic"]
    # at most 0.5 below FP32; above it is slice noise (W8A8 gave 86.5 vs 85.9 here: 6 of 1000 images)
    assert w8["fp32_top1"] - w8["top1"] <= 0.5 and abs(w8["fp32_top1"] - w8["top1"]) <= 1.0
    assert w4["info"]["calib_cached"] and w4["info"]["act_range"] == "ema"
    assert 60.0 < w4["top1"] < w8["top1"]
    print(f"DSG (50 steps) on {SLICE} test images: FP32 {w8['fp32_top1']:.2f}, W8A8 {w8['top1']:.2f}, "
          f"W4A4 {w4['top1']:.2f}")


@pytest.mark.parametrize("quant", ["gdfq", "brecq", "dfq"])
def test_dsg_runs_under_every_convention(tmp_path, cache_dir, cifar10_root, teacher, quant):
    record = run(_cfg(f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}", "dataset.max_samples=200",
                      f"paths.cache_dir={cache_dir}", f"quant={quant}", "wbit=8", "abit=8",
                      "method.iterations=20", "method.batch_size=16", "method.num_images=16"), tmp_path)
    assert record["status"] == "done" and record["quant"] == quant
    assert abs(record["fp32_top1"] - record["top1"]) <= 2.0


@pytest.mark.parametrize("act_range", ["minmax", "percentile", "mse", "convention"])
def test_other_ranges_and_calibration_sources(tmp_path, cache_dir, cifar10_root, teacher, act_range):
    record = run(_cfg(f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}", "dataset.max_samples=200",
                      f"paths.cache_dir={cache_dir}", "wbit=8", "abit=8", f"method.range={act_range}",
                      "method.calib_data=gaussian_noise", "method.num_images=16"), tmp_path)
    assert record["status"] == "done" and record["info"]["calib_data"] == "gaussian_noise"
    assert record["info"]["act_range"] == act_range and record["top1"] > 50.0


def test_dsg_on_a_random_weight_preresnet20(tmp_path, cache_dir, cifar10_root):
    record = run(_cfg("model=pytorchcv", "model.arch=preresnet20_cifar10", "model.pretrained=false",
                      f"dataset.root={cifar10_root}", "dataset.max_samples=100", f"paths.cache_dir={cache_dir}",
                      "wbit=4", "abit=4", "method.iterations=3", "method.batch_size=4", "method.num_images=4"),
                 tmp_path)
    assert record["status"] == "done" and record["weights"] == "random"


@pytest.mark.parametrize("kwargs,needles", [
    ({"margin_percentile": 100}, ["margin_percentile=100", "(0, 100)"]),
    ({"iterations": 0}, ["iterations=0", ">= 1"]),
    ({"num_images": 0}, ["num_images=0", ">= 1"]),
    ({"enhance_weight": 0.5}, ["enhance_weight=0.5", ">= 1"]),
    ({"ce_weight": -1.0}, ["ce_weight=-1.0", ">= 0"]),
    ({"percentile": 0.0}, ["percentile=0.0", "(0, 100]"]),
    ({"lr": 0.0}, ["method.lr=0.0 must be a number > 0"]),
    ({"min_lr": float("nan")}, ["method.min_lr=nan must be a number >= 0"]),
    ({"enhance_layers": True}, ["method.enhance_layers=True must be an integer >= 0"]),
])
def test_bad_values_raise_in_the_constructor(kwargs, needles):
    with pytest.raises(ValueError) as err:
        DSG(**kwargs)
    assert all(needle in str(err.value) for needle in needles) and "\n" not in str(err.value)


@pytest.mark.parametrize("arg,needles", [
    ("method.range=nope", ["range='nope'", "ema", "minmax", "percentile", "mse", "convention"]),
    ("method.calib_data=nope", ["calib_data='nope'", "dsg", "distill", "real"]),
    ("method.margins=nope", ["margins='nope'", "gaussian", "none"]),
])
def test_bad_settings_are_refused(tmp_path, teacher, cifar10_root, arg, needles):
    proc = run_cli("method=dsg", arg, f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}",
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dfqbench: error: ")
    for needle in needles:
        assert needle in lines[0]
    assert not (tmp_path / "record.json").exists()
