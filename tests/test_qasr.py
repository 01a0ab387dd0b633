"""Q-ASR (method=qasr, quant=qasr) and the Conv1d / BatchNorm1d path: the BN KL loss against its closed form,
Conv1d per-channel fake quantization by hand, the synthesis on a tiny Conv1d net, bad settings, and the stand-in
teacher's wrapping."""

import pytest
import torch
from torch import nn

from dfqbench.methods.qasr import QASR, calibrate_ema
from dfqbench.archs import ARCHS, ColumnsAsSequence
from dfqbench.quant import Convention, QuantConv1d, act_quantizers, quantize_model
from dfqbench.quant.quantizers import WeightQuantizer
from dfqbench.synth.bn_kl import QASRSettings, QASRSynthesis, bn_kl_loss, gaussian_kl, qasr_synthetic_data
from dfqbench.synth.bn_loop import BNTaps, bn_layers

QASR_CONV = {"name": "qasr", "fold_bn": True,
             "weight": {"granularity": "per_channel", "symmetric": True, "symmetric_grid": "qasr"},
             "act": {"sites": "layer_inputs", "symmetric": True, "symmetric_grid": "qasr", "estimator": "minmax"}}


def test_gaussian_kl_matches_the_closed_form():
    # KL(N(1, 2^2) || N(0, 1)) = log(1 / 2) + (4 + 1) / 2 - 1/2 = 1.3068528...
    value = gaussian_kl(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.0), torch.tensor(1.0))
    assert float(value) == pytest.approx(1.3068528194, abs=1e-6)


def test_bn_kl_loss_uses_batch_statistics_over_batch_and_time():
    # channel 0: values -1, 1 in each of 2 samples -> mean 0, unbiased var 4/3 (over batch and time);
    # target N(1, 2^2): log(sqrt(4/3) / 2) + (4 + 1) / (2 * 4/3) - 1/2 = 0.8256938...
    # channel 1: constant 3 -> mean 3, std sqrt(1e-6) = 1e-3; target N(3, 1e-3^2): KL 0
    x = torch.tensor([[[-1.0, 1.0], [3.0, 3.0]], [[-1.0, 1.0], [3.0, 3.0]]])
    targets = (torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1e-3]))
    loss = bn_kl_loss([(x, targets)])
    assert float(loss) == pytest.approx((0.8256937 + 0.0) / 2, abs=1e-5)
    assert float(bn_kl_loss([(x, targets), (x, targets)])) == pytest.approx(2 * float(loss))  # summed over layers


def _conv1d():
    conv = nn.Conv1d(1, 2, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[0.1, -0.35]], [[1.0, 0.26]]]))
    return conv


def test_conv1d_per_channel_weights_on_the_qasr_grid_by_hand():
    # 4 bits: n = 7, scale = max|w| / 7 per output channel, integers clamped to [-7, 6]
    # channel 0: scale 0.05: 0.1 -> 2, -0.35 -> -7; channel 1: scale 1/7: 1.0 -> 7 -> clamped 6, 0.26 -> 1.82 -> 2
    conv = _conv1d()
    q = QuantConv1d.from_float(conv, WeightQuantizer(4, per_channel=True, symmetric=True, symmetric_grid="qasr"))
    expected = torch.tensor([[[0.1, -0.35]], [[6 / 7, 2 / 7]]])
    assert torch.allclose(q.quantized_weight(), expected, atol=1e-6)
    x = torch.tensor([[[1.0, 2.0, -1.0]]])
    assert torch.allclose(q(x), nn.functional.conv1d(x, expected), atol=1e-6)
    # dfqbench's own signed grid keeps the top level: 1.0 -> 7 -> 1.0
    auto = QuantConv1d.from_float(_conv1d(), WeightQuantizer(4, per_channel=True, symmetric=True))
    assert torch.allclose(auto.quantized_weight()[1], torch.tensor([[1.0, 2 / 7]]), atol=1e-6)


def _tiny_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
                        nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU())
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.copy_(torch.randn(8) * 0.5)
            bn.running_var.copy_(torch.rand(8) + 0.5)
    return net.eval()


def test_bn1d_synthesis_reduces_the_kl_loss():
    net = _tiny_net()
    settings = QASRSettings(batch_size=4, num_batches=1, iterations=60, lr=0.05)

    def loss_of(x):
        with BNTaps(bn_layers(net, "test")) as taps, torch.no_grad():
            net(x)
            return float(bn_kl_loss(taps.pairs()))

    start = QASRSynthesis((4, 16), settings, torch.Generator().manual_seed(0), torch.device("cpu")).new_batch(0)
    before = loss_of(start.result())
    (after_x,) = qasr_synthetic_data(net, (4, 16), settings, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert after_x.shape == (4, 4, 16) and float(after_x.abs().max()) > 0
    assert loss_of(after_x) < 0.5 * before
    assert all(p.requires_grad for p in net.parameters())  # the loop froze the teacher, then restored it


def test_bn_layers_keeps_2d_nets_as_they_were():
    net2d = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5), nn.BatchNorm1d(5))
    assert [type(m) for m in bn_layers(net2d, "x")] == [nn.BatchNorm2d]
    assert [type(m) for m in bn_layers(_tiny_net(), "x")] == [nn.BatchNorm1d, nn.BatchNorm1d]


@pytest.mark.parametrize("change,needle", [
    ({"act": {"symmetric": True, "symmetric_grid": "int"}}, "quant.act.symmetric_grid='int'"),
    ({"weight": {"symmetric_grid": "qasr"}}, "needs quant.weight.symmetric=true"),
    ({"act": {"estimator": "percentile", "percentile": 120}}, "quant.act.percentile=120"),
])
def test_bad_convention_values_are_one_line_errors(change, needle):
    with pytest.raises(ValueError) as err:
        Convention.from_dict({"name": "x", **change})
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert "choose one of" in str(err.value) or "use" in str(err.value)


@pytest.mark.parametrize("kwargs,needle", [
    ({"momentum": 1.5}, "method.momentum=1.5"),
    ({"num_batches": 0}, "method.num_batches=0"),
    ({"lr": -1}, "method.lr=-1 must be a number > 0"),
    ({"init_range": float("inf")}, "method.init_range=inf must be a number > 0"),
    ({"calib_data": "imagenet"}, "choose one of: synthetic, distill"),
])
def test_bad_method_settings_are_one_line_errors(kwargs, needle):
    with pytest.raises(ValueError) as err:
        QASR(**kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_stand_in_reads_columns_and_every_conv1d_is_wrapped():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    seq = ColumnsAsSequence()(x)
    assert seq.shape == (2, 96, 32) and float(seq[1, 2 * 32 + 5, 7]) == float(x[1, 2, 5, 7])
    model = ARCHS["seq_conv1d_cifar10"]().eval()
    convs = sum(isinstance(m, nn.Conv1d) for m in model.modules())
    qmodel = quantize_model(model, Convention.from_dict({**QASR_CONV, "layers": {"input_abit": 4}}), 4, 4)
    assert sum(isinstance(m, QuantConv1d) for m in qmodel.modules()) == convs == 5
    assert not any(type(m) in (nn.Conv1d, nn.BatchNorm1d) for m in qmodel.modules())  # wrapped, BN folded
    quantizers = act_quantizers(qmodel)
    assert len(quantizers) == 6  # the input and each of 4 conv inputs + the head's input
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    calibrate_ema(qmodel, batches, momentum=0.5)
    assert all(q.calibrated for q in quantizers) and bool(torch.isfinite(qmodel(batches[0])).all())
    # EMA of the per-batch ranges (min/max here): with momentum 0.5, the input's range is the mean of the two
    # batches' ranges
    assert float(quantizers[0].hi) == pytest.approx(0.5 * float(batches[0].max() + batches[1].max()), rel=1e-5)
    assert float(quantizers[0].lo) == pytest.approx(0.5 * float(batches[0].min() + batches[1].min()), rel=1e-5)


def test_the_qasr_preset_quantizes_the_model_input_at_abit():
    from hydra import compose, initialize_config_dir

    from dfqbench.__main__ import CONF_DIR
    from dfqbench.runner import build_convention, build_method

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="config", overrides=["method=qasr", "quant=qasr", "model=seq_conv1d_cifar10",
                                                       "wbit=6", "abit=5"])
    method = build_method(cfg)
    conv = build_convention(cfg, method)
    assert conv.layers.input_abit == 5 and conv.fold_bn and conv.act.symmetric_grid == conv.weight.symmetric_grid
    assert method.source["code"].startswith("kssteven418/Q-ASR@aa1ec2e") and method.fidelity == "reproduction"
