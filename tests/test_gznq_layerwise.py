"""GZNQ (gznq) and layer-wise data-free compression (layerwise), both reconstructions from abstracts: the
distribution loss and the layer-wise data against hand values, the one-layer blocks, the yamls, and both methods
end to end on tiny nets."""

import math
import re

import pytest
import torch
from torch import nn

from conftest import compose_cfg, tiny_bn_model
from dfqbench.methods.base import QuantContext
from dfqbench.methods.gznq import GZNQ
from dfqbench.methods.layerwise import LayerWise
from dfqbench.quant import ActQuantizer, Convention, quantize_model
from dfqbench.quant.calibration.blocks import block_module
from dfqbench.quant.calibration.layerwise import layer_block, layer_data, node_shapes, sample_gaussian
from dfqbench.quant.quantizers.learned import HardenedWeightQuantizer, float_mode
from dfqbench.quant.transforms.bn_fold import fold_batchnorm
from dfqbench.quant.transforms.bn_stats import BNStatistics, Gaussian
from dfqbench.quant.transforms.graph import layer_nodes
from dfqbench.runner import build_convention, build_method
from dfqbench.synth import calib_data
from dfqbench.synth.bn_loop import BNTaps, EPS, bn_layers, synthesize_batches
from dfqbench.synth.gznq import (GZNQSettings, GZNQSynthesis, channel_moments, distribution_kl, gznq_loss,
                                 gznq_source, negentropy)

pytestmark = pytest.mark.usefixtures("one_thread")

SQRT3 = math.sqrt(3.0)


def _ctx(fold_bn=False, seed=0, **kwargs):
    return QuantContext(Convention.from_dict({"name": "gdfq", "fold_bn": fold_bn}), 4, 4, seed, torch.device("cpu"),
                        (3, 8, 8), 5, progress=False, **kwargs)


def _channels(*columns) -> torch.Tensor:
    """[N, C, 1, 1] from one list of N values per channel."""
    return torch.tensor(list(zip(*columns)), dtype=torch.float64).view(len(columns[0]), len(columns), 1, 1)


# a standardized sample with the first four moments of N(0, 1): mean 0, variance 1, skew 0, kurtosis 3
GAUSS4 = [-SQRT3, 0.0, 0.0, 0.0, 0.0, SQRT3]


# ---- GZNQ: the distribution loss ---------------------------------------------------------------------------------

def test_channel_moments_hand_values():
    # channel 0: 0, 0, 3 -> mean 1, centred -1, -1, 2: var 2, E c^3 = 2, E c^4 = 6; channel 1: +-1 (two-point)
    x = _channels([0.0, 0.0, 3.0], [-1.0, 1.0, 1.0])
    mean, std, skew, kurt = channel_moments(x)
    torch.testing.assert_close(mean, torch.tensor([1.0, 1 / 3], dtype=torch.float64))
    assert float(std[0]) == pytest.approx(math.sqrt(2 + EPS))
    assert float(skew[0]) == pytest.approx(2 / 2 ** 1.5, rel=1e-5)
    assert float(kurt[0]) == pytest.approx(6 / 4 - 3, rel=1e-5)
    _, _, skew, kurt = channel_moments(_channels([-1.0, 1.0, -1.0, 1.0]))
    assert float(skew[0]) == pytest.approx(0.0, abs=1e-12) and float(kurt[0]) == pytest.approx(-2.0, rel=1e-5)
    assert float(negentropy(torch.tensor(0.6), torch.tensor(-2.0))) == pytest.approx(0.36 / 12 + 4 / 48)


def test_distribution_loss_is_zero_at_the_stored_gaussian_and_positive_otherwise():
    mean_t, std_t = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 3.0], dtype=torch.float64)
    g = _channels(GAUSS4, GAUSS4)
    x = mean_t.view(1, 2, 1, 1) + std_t.view(1, 2, 1, 1) * g  # the stored mean, variance, skew 0, kurtosis 3
    assert float(distribution_kl(x, mean_t, std_t)) == pytest.approx(0.0, abs=1e-5)
    assert float(gznq_loss([(x, (mean_t, std_t)), (x, (mean_t, std_t))])) == pytest.approx(0.0, abs=1e-5)
    # the right moments, the wrong shape: +-1 has excess kurtosis -2, so KL = J = 4 / 48 per channel
    two_point = _channels([-1.0, 1.0] * 3)
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    assert float(distribution_kl(two_point, zero, one)) == pytest.approx(1 / 12, rel=1e-4)
    assert float(distribution_kl(two_point, zero, one, shape_weight=0.0)) == pytest.approx(0.0, abs=1e-5)
    # a Gaussian shape with the wrong moments: N(0, 1) against N(1, 2^2), KL(synthetic || stored)
    gauss = _channels(GAUSS4)
    expected = math.log(2) + (1 + 1) / 8 - 0.5
    assert float(distribution_kl(gauss, one, 2 * one)) == pytest.approx(expected, rel=1e-4)
    # the direction: KL(N(1, 4) || N(0, 1)) = log(1/2) + (4 + 1) / 2 - 1/2 is another number
    assert float(distribution_kl(1 + 2 * gauss, zero, one)) == pytest.approx(math.log(0.5) + 2.0, rel=1e-4)
    # both wrong: the two terms add
    assert float(distribution_kl(1 + 2 * two_point, zero, one)) == pytest.approx(math.log(0.5) + 2.0 + 1 / 12,
                                                                                   rel=1e-4)


def test_the_generator_lowers_the_distribution_loss_of_a_bn_net():
    model = tiny_bn_model()
    settings = GZNQSettings(iterations=60, batch_size=16, latent_dim=16, width=16)

    def loss(images):
        with torch.no_grad(), BNTaps(bn_layers(model, "test")) as taps:
            model(images)
            return float(gznq_loss(taps.pairs()))

    untrained = GZNQSynthesis((3, 8, 8), 16, GZNQSettings(iterations=1, batch_size=16, latent_dim=16, width=16,
                                                          lr=1e-12), 0, torch.device("cpu"))
    start, = synthesize_batches(model, untrained, torch.device("cpu"))
    images, = synthesize_batches(model, GZNQSynthesis((3, 8, 8), 16, settings, 0, torch.device("cpu")),
                                 torch.device("cpu"))
    assert images.shape == (16, 3, 8, 8) and torch.isfinite(images).all()
    assert loss(images) < 0.7 * loss(start)  # 0.94 vs 1.78 (the tiny net plateaus near 0.8)


def test_gznq_is_a_calibration_source_cached_per_settings(tmp_path):
    assert calib_data.SOURCES["gznq"] == "dfqbench.synth.gznq:gznq_source"
    assert calib_data.check_source("gznq") == "gznq"
    model, settings = tiny_bn_model(), GZNQSettings(iterations=2, batch_size=4, latent_dim=8, width=4)
    ctx = _ctx(cache_dir=str(tmp_path), model_sha256="abc")
    batches = gznq_source(model, ctx, 10, 4, settings)
    assert [tuple(b.shape) for b in batches] == [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]
    again = gznq_source(model, ctx, 10, 4, settings)
    assert ctx.info["calib_cached"] and all(torch.equal(a, b) for a, b in zip(batches, again))
    assert len(list((tmp_path / "calib").glob("gznq-*.pt"))) == 1


@pytest.mark.parametrize("stage", ["calibrate", "reconstruct"])
def test_gznq_quantizes_a_tiny_net_end_to_end(stage):
    method = GZNQ(num_images=8, calib_batch_size=4, stage=stage,
                  synthesis={"iterations": 3, "batch_size": 8, "latent_dim": 8, "width": 8},
                  reconstruct={"iterations": 3, "batch_size": 4})
    qmodel = method.quantize(tiny_bn_model(), ctx := _ctx())
    quantizers = [m for m in qmodel.modules() if isinstance(m, ActQuantizer) and m.enabled]
    assert quantizers and all(q.calibrated for q in quantizers)
    assert ctx.info["calib_data"] == "gznq" and ctx.info["calib_images"] == 8
    assert ("reconstruct_blocks" in ctx.info) == (stage == "reconstruct")
    assert torch.isfinite(qmodel(torch.randn(2, 3, 8, 8))).all()


# ---- layer-wise data -------------------------------------------------------------------------------------------

class _Residual(nn.Module):
    """conv1-BN1-ReLU = a; s = a + BN2(conv2(a)); ReLU(s) -> pooling -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 5)

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        s = a + self.bn2(self.conv2(a))
        return self.fc(torch.flatten(self.pool(torch.relu(s)), 1))


def _residual():
    torch.manual_seed(0)
    model = _Residual()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))  # gamma; beta = 0
        model.bn2.weight.copy_(torch.tensor([1.0, 1.0, 2.0, 0.5]))
        model.bn2.bias.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_sample_gaussian_has_the_channel_statistics():
    g = Gaussian(torch.tensor([1.0, -2.0, 0.0]), torch.tensor([0.5, 3.0, 1.0]))
    x = sample_gaussian(g, (3, 16, 16), 512, torch.Generator().manual_seed(0))
    assert x.shape == (512, 3, 16, 16)
    std, mean = torch.std_mean(x, dim=(0, 2, 3))
    torch.testing.assert_close(mean, g.mean, atol=0.02, rtol=0)
    torch.testing.assert_close(std, g.std, atol=0, rtol=0.01)
    flat = sample_gaussian(Gaussian(torch.zeros(1), torch.full((1,), 2.0)), (6,), 4000, torch.Generator())
    assert flat.shape == (4000, 6) and float(flat.std()) == pytest.approx(2.0, rel=0.02)


def test_layer_blocks_run_from_the_source_through_relu_quantizer_and_pooling():
    gm = quantize_model(fold_batchnorm(_residual()), Convention.from_dict({"name": "gdfq", "fold_bn": True}), 4, 4)
    blocks = [layer_block(gm, layer) for layer in layer_nodes(gm)]
    assert [b.input.name for b in blocks] == ["x", "conv1", "add"]
    kinds = [[n.op if n.op != "call_module" else type(gm.get_submodule(n.target)).__name__ for n in b.nodes]
             for b in blocks]
    assert kinds == [["QuantConv2d"], ["call_function", "ActQuantizer", "QuantConv2d"],
                     ["call_function", "ActQuantizer", "AdaptiveAvgPool2d", "call_function", "QuantLinear"]]


def test_layerwise_data_matches_the_bn_statistics_feeding_each_layer():
    model = _residual()
    gm = quantize_model(fold_batchnorm(model), Convention.from_dict({"name": "gdfq", "fold_bn": True}), 4, 4)
    stats, shapes = BNStatistics(gm), node_shapes(gm, (3, 8, 8))
    gen = torch.Generator().manual_seed(0)
    conv1, conv2, fc = layer_nodes(gm)
    # conv2 reads ReLU(BN1): the source is N(beta1 = 0, gamma1^2) per channel
    block = layer_block(gm, conv2)
    x = layer_data(gm, block, stats, shapes, 4096, gen)
    assert x.shape == (4096, 4, 8, 8)
    gamma1 = model.bn1.weight.detach()
    std, mean = torch.std_mean(x, dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.zeros(4), atol=0.01 * float(gamma1.max()), rtol=0)
    torch.testing.assert_close(std, gamma1, atol=0, rtol=0.01)
    # through the ReLU: a half-normal, mean gamma / sqrt(2 pi), variance gamma^2 (1/2 - 1/(2 pi))
    r = torch.relu(x)
    std, mean = torch.std_mean(r, dim=(0, 2, 3))
    torch.testing.assert_close(mean, gamma1 / math.sqrt(2 * math.pi), atol=0, rtol=0.01)
    torch.testing.assert_close(std, gamma1 * math.sqrt(0.5 - 0.5 / math.pi), atol=0, rtol=0.01)
    # the fc reads the residual sum s = ReLU(BN1) + BN2: means and variances add
    block = layer_block(gm, fc)
    s = layer_data(gm, block, stats, shapes, 4096, gen)
    beta2, gamma2 = model.bn2.bias.detach(), model.bn2.weight.detach()
    want_mean = gamma1 / math.sqrt(2 * math.pi) + beta2
    want_std = (gamma1 ** 2 * (0.5 - 0.5 / math.pi) + gamma2 ** 2).sqrt()
    std, mean = torch.std_mean(s, dim=(0, 2, 3))
    torch.testing.assert_close(mean, want_mean, atol=0.02, rtol=0)
    torch.testing.assert_close(std, want_std, atol=0, rtol=0.01)
    # the image: N(0, 1); and the block replays ReLU + pooling on the sampled sum (float mode)
    x0 = layer_data(gm, layer_block(gm, conv1), stats, shapes, 64, gen)
    assert x0.shape == (64, 3, 8, 8) and abs(float(x0.mean())) < 0.05
    with torch.no_grad(), float_mode(gm):
        out = block_module(gm, block)(s[:8])
        want = model.fc(torch.relu(s[:8]).mean(dim=(2, 3)))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_bn_model, _residual])
def test_layerwise_quantizes_a_tiny_net_end_to_end(make):
    method = LayerWise(num_samples=32, reconstruct={"iterations": 5, "batch_size": 8})
    qmodel = method.quantize(make(), ctx := _ctx(fold_bn=True))
    layers = ctx.info["layerwise_layers"]
    assert len(layers) == 3 and all(f["iterations"] == 5 and math.isfinite(f["error_after"]) for f in layers)
    assert [f["source"] for f in layers][0] in ("x", "input_1")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())  # folded by the preconditioning
    weights = [m.weight_quantizer for m in qmodel.modules() if hasattr(m, "weight_quantizer")]
    assert len(weights) == 3 and all(isinstance(w, HardenedWeightQuantizer) for w in weights)
    acts = [m for m in qmodel.modules() if isinstance(m, ActQuantizer) and m.enabled]
    assert acts and all(q.calibrated for q in acts)
    assert torch.isfinite(qmodel(torch.randn(2, 3, 8, 8))).all()


def test_layerwise_is_deterministic_per_seed():
    def run(seed):
        qmodel = LayerWise(num_samples=16, reconstruct={"iterations": 3, "batch_size": 8}).quantize(
            tiny_bn_model(), _ctx(fold_bn=True, seed=seed))
        return [m.weight_quantizer.int_weight.clone() for m in qmodel.modules() if hasattr(m, "weight_quantizer")]
    a, b = run(0), run(0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---- configs and errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gznq", "layerwise"])
def test_the_yamls_compose_as_reconstructions(name):
    cfg = compose_cfg(f"method={name}", "quant=gdfq")
    method = build_method(cfg)
    assert method.name == name and method.fidelity == "reconstruction" and method.stochastic
    assert method.source["code"] == "none" and len(method.source["inferred"]) >= 5
    convention = build_convention(cfg, method)
    assert convention.fold_bn == (name == "layerwise")  # the preconditioning folds BN under every convention


@pytest.mark.parametrize("make, message", [
    (lambda: GZNQ(stage="qat"), "method.stage='qat' is not valid; choose one of: calibrate, reconstruct"),
    (lambda: GZNQ(num_images=0), "method.num_images=0 must be an integer >= 1"),
    (lambda: GZNQ(synthesis={"steps": 3}), "method.synthesis has unknown setting(s) ['steps']"),
    (lambda: GZNQ(synthesis={"batch_size": 1}), "method.synthesis.batch_size=1 must be an integer >= 2"),
    (lambda: GZNQ(synthesis={"shape_weight": -1}), "method.synthesis.shape_weight=-1 must be a number >= 0"),
    (lambda: LayerWise(num_samples=1), "method.num_samples=1 must be an integer >= 2"),
    (lambda: LayerWise(equalize_range="l2"), "method.equalize_range='l2' is not valid; choose one of: absmax, minmax"),
    (lambda: LayerWise(reconstruct={"iters": 3}), "method.reconstruct has unknown setting(s) ['iters']"),
])
def test_bad_settings_are_one_line_errors(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def _run_preresnet(tmp_path, cache_dir, cifar10_root, method, *extra):
    from dfqbench.runner import run

    record = run(compose_cfg("model=pytorchcv", "model.arch=preresnet20_cifar10", "model.pretrained=false",
                             f"dataset.root={cifar10_root}", "dataset.max_samples=100", f"paths.cache_dir={cache_dir}",
                             f"method={method}", "quant=gdfq", "wbit=4", "abit=4", "threads=1", *extra),
                 tmp_path / method)
    assert record["status"] == "done" and record["fidelity"] == "reconstruction"
    return record


def test_both_run_through_the_runner_on_a_random_preresnet20(tmp_path, cache_dir, cifar10_root):
    record = _run_preresnet(tmp_path, cache_dir, cifar10_root, "gznq", "method.num_images=4",
                            "method.calib_batch_size=4", "method.synthesis.iterations=2",
                            "method.synthesis.batch_size=4", "method.synthesis.width=8")
    assert record["info"]["calib_data"] == "gznq"
    record = _run_preresnet(tmp_path, cache_dir, cifar10_root, "layerwise", "method.num_samples=8",
                            "method.reconstruct.iterations=2", "method.reconstruct.batch_size=4")
    assert len(record["info"]["layerwise_layers"]) == 22 and record["convention"]["fold_bn"]
