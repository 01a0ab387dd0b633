"""Quantizer placement by convention, BN folding, equalization and BN-statistics propagation."""

import copy

import pytest
import torch
from torch import nn

from dfqbench.quant import Convention, act_quantizers, quantize_model, weight_quantizers
from dfqbench.quant.calibration.calibrate import calibrate_on_batches
from dfqbench.quant.quantizers import ActQuantizer
from dfqbench.quant.transforms.bn_fold import fold_batchnorm
from dfqbench.quant.transforms.graph import module_of
from dfqbench.quant.transforms.bn_stats import Gaussian, relu_moments
from dfqbench.quant.transforms.equalize import absorb_high_bias, equalize, find_pairs

GDFQ = {"name": "gdfq"}
BRECQ = {"name": "brecq", "act": {"sites": "layer_inputs", "symmetric": True},
         "layers": {"first_wbit": 8, "last_wbit": 8, "second_abit": 8, "last_abit": 8}}


class TinyResNet(nn.Module):
    """conv-bn-relu, one residual block (conv-bn-relu-conv-bn + identity, relu), pool, fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        x = self.relu2(x + y)
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = TinyResNet()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def test_gdfq_puts_activation_quantizers_after_each_relu_only():
    q = quantize_model(tiny_model(), Convention.from_dict(GDFQ), wbit=4, abit=4)
    assert len(act_quantizers(q)) == 3  # stem ReLU, block ReLU, output ReLU
    assert [w.bits for w in weight_quantizers(q)] == [4, 4, 4, 4]  # first and last layer at 4 bits too
    assert all(a.bits == 4 for a in act_quantizers(q))


def test_brecq_quantizes_every_layer_input_with_8_bit_exceptions():
    q = quantize_model(tiny_model(), Convention.from_dict(BRECQ), wbit=4, abit=4)
    # inputs of conv1 (shared with the identity), conv2 and fc; the image stays float
    assert [a.bits for a in act_quantizers(q)] == [8, 4, 8]
    assert [w.bits for w in weight_quantizers(q)] == [8, 4, 4, 8]
    code = q.code
    assert "act_quant_0" in code and "add" in code


@pytest.mark.parametrize("sites,added", [("after_relu", 1), ("layer_inputs", 1), ("each_layer_input", 2)])
def test_add_inputs_quantizes_each_residual_operand_the_sites_left_float(sites, added):
    """act.add_inputs puts a quantizer on each operand of the residual sum that is not already a quantizer's output:
    the branch (bn2's output) always; the identity (the stem ReLU's output) only where no shared quantizer reads it
    first (each_layer_input: conv1 reads its own copy, so the sum gets one of its own). The sum then adds two
    grid values: its output equals the by-hand fake-quant of each operand, added."""
    base = {"name": "x", "act": {"sites": sites}}
    plain = quantize_model(tiny_model(), Convention.from_dict(base), wbit=4, abit=4)
    q = quantize_model(tiny_model(), Convention.from_dict({"name": "x", "act": {"sites": sites, "add_inputs": True}}),
                       wbit=4, abit=4)
    assert len(act_quantizers(q)) == len(act_quantizers(plain)) + added
    add = next(n for n in q.graph.nodes if n.op == "call_function" and "add" in str(n.target))
    operands = [module_of(q, a) for a in add.args[:2]]
    assert all(isinstance(m, ActQuantizer) and m.bits == 4 for m in operands)
    if sites == "each_layer_input":  # conv1's input quantizer is not the sum's identity quantizer
        conv1 = next(n for n in q.graph.nodes if n.target == "conv1")
        assert module_of(q, conv1.args[0]) is not operands[1]

    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    calibrate_on_batches(q, [x])
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, (inp[0], out)))
             for i, m in enumerate(operands)]
    with torch.no_grad():
        q(x)
    for h in hooks:
        h.remove()
    for i, m in enumerate(operands):
        raw, out = seen[i]
        lo, hi = float(raw.min()), float(raw.max())  # observed on the same batch: min/max of what it reads
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = (hi - lo) / 15
        zp = round(-lo / scale)
        by_hand = (torch.clamp(torch.round(raw / scale) + zp, 0, 15) - zp) * scale
        assert torch.allclose(out, by_hand, atol=1e-5), f"operand {i}"


def test_add_inputs_must_be_a_boolean():
    with pytest.raises(ValueError, match="quant.act.add_inputs='yes' is not valid; choose one of: true, false"):
        Convention.from_dict({"name": "x", "act": {"add_inputs": "yes"}})


def test_32_bit_quantizers_leave_the_model_unchanged():
    model = tiny_model()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    q = quantize_model(copy.deepcopy(model), Convention.from_dict(GDFQ), wbit=32, abit=32)
    assert torch.allclose(q(x), ref)


def test_bn_folding_preserves_the_function_and_records_statistics():
    model = tiny_model()
    x = torch.randn(4, 3, 8, 8)
    ref = model(x)
    folded = fold_batchnorm(copy.deepcopy(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(folded(x), ref, atol=1e-5)
    assert torch.allclose(folded.conv1.out_mean, model.bn1.bias)


class PreActBlock(nn.Module):
    """stem conv, then a pre-activation unit: (bn-relu-conv) twice + identity; a conv-bn pair inside `proj`."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.pre1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False))
        self.pre2 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False))
        self.proj = nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x):
        x = self.stem(x)
        return self.proj(x + self.pre2(self.pre1(x)))


def _preact(seed=0):
    torch.manual_seed(seed)
    model = PreActBlock()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def test_module_fold_scope_folds_only_a_conv_with_the_batchnorm_registered_after_it():
    model, x = _preact(), torch.randn(2, 3, 8, 8)
    ref = model(x)
    graph = fold_batchnorm(copy.deepcopy(model), "graph")  # pre1's conv -> pre2's BN is a graph pair too
    module = fold_batchnorm(copy.deepcopy(model), "module")
    bns = lambda gm: sorted(n for n, m in gm.named_modules() if isinstance(m, nn.BatchNorm2d))  # noqa: E731
    assert bns(graph) == ["pre1.0"]  # its input (the stem) is also read by the identity
    assert bns(module) == ["pre1.0", "pre2.0"]
    assert torch.allclose(graph(x), ref, atol=1e-5) and torch.allclose(module(x), ref, atol=1e-5)
    bn = model.proj[1]
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # the folded sibling pair, by hand
    assert torch.allclose(module.get_submodule("proj.0").weight, model.proj[0].weight * factor.view(-1, 1, 1, 1))
    assert torch.allclose(module.get_submodule("proj.0").bias, bn.bias - bn.running_mean * factor)
    with pytest.raises(ValueError, match="fold scope 'all' is not valid; choose one of: graph, module"):
        fold_batchnorm(copy.deepcopy(model), "all")


def test_norm_abit_quantizes_each_unfolded_batchnorm_output():
    spec = {"name": "aciq_like", "fold_bn": True, "fold_scope": "module",
            "act": {"sites": "layer_outputs", "granularity": "per_channel"}, "layers": {"norm_abit": 8}}
    gm = quantize_model(_preact(), Convention.from_dict(spec), wbit=4, abit=4)
    readers = {n.args[0].target: module_of(gm, n).bits for n in gm.graph.nodes
               if isinstance(module_of(gm, n), ActQuantizer)}
    # every conv output at abit, the two pre-activation BatchNorms at 8; the folded proj BN is gone
    assert readers == {"stem": 4, "pre1.0": 8, "pre1.2": 4, "pre2.0": 8, "pre2.2": 4, "proj.0": 4}
    without = quantize_model(_preact(), Convention.from_dict({**spec, "layers": {}}), wbit=4, abit=4)
    assert len(act_quantizers(without)) == 4
    with pytest.raises(ValueError, match=r"quant.layers.norm_abit=8 is only read with quant.act.sites=layer_outputs"):
        Convention.from_dict({**spec, "act": {"sites": "after_relu"}})
    with pytest.raises(ValueError, match="quant.fold_scope='sibling' is not valid; choose one of: graph, module"):
        Convention.from_dict({**spec, "fold_scope": "sibling"})


def test_cross_layer_equalization_is_exact_and_equalizes_ranges():
    model = tiny_model()
    x = torch.randn(4, 3, 8, 8)
    folded = fold_batchnorm(copy.deepcopy(model))
    ref = folded(x)
    pairs = find_pairs(folded)
    assert len(pairs) == 1 and pairs[0].through_relu  # conv1 -> relu -> conv2 (stem feeds the identity too)
    equalize(pairs)
    assert torch.allclose(folded(x), ref, atol=1e-5)
    r1 = folded.conv1.weight.abs().reshape(8, -1).amax(1)
    r2 = folded.conv2.weight.abs().transpose(0, 1).reshape(8, -1).amax(1)
    assert torch.allclose(r1, r2, rtol=1e-4)


def test_bias_absorption_is_exact_when_activations_stay_above_the_absorbed_shift():
    # unpadded second conv: with zero padding the shift is not constant at the borders (a known DFQ approximation)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    gm = fold_batchnorm(model)
    first = gm.get_submodule("0")
    first.bias.data.fill_(5.0)
    first.register_buffer("out_mean", torch.full((8,), 5.0))
    first.register_buffer("out_std", torch.full((8,), 0.1))
    x = torch.randn(2, 3, 6, 6) * 0.01  # first conv's output stays near 5, far above the shift 5 - 3 * 0.1
    ref = gm(x)
    absorb_high_bias(find_pairs(gm), k_std=3.0)
    assert torch.allclose(first.bias, torch.full((8,), 0.3))
    assert torch.allclose(gm(x), ref, atol=1e-4)


def test_relu_moments_match_monte_carlo():
    torch.manual_seed(0)
    mean, std = torch.tensor([0.5, -1.0]), torch.tensor([1.0, 2.0])
    samples = torch.relu(mean + std * torch.randn(400000, 2))
    g = relu_moments(Gaussian(mean, std))
    assert torch.allclose(g.mean, samples.mean(0), atol=0.01)
    assert torch.allclose(g.std, samples.std(0), atol=0.01)


def test_convention_rejects_bad_fields():
    with pytest.raises(ValueError, match="sites"):
        Convention.from_dict({"name": "x", "act": {"sites": "everywhere"}})
    with pytest.raises(ValueError, match="bit-width"):
        Convention.from_dict({"name": "x", "layers": {"first_wbit": 1}})
    with pytest.raises(ValueError, match=r"quant has unknown setting\(s\)"):
        Convention.from_dict({"name": "x", "bogus": 1})


def test_image_quantizer_takes_the_pixel_range_and_calibration_leaves_it():
    """input_range=pixels: the image quantizer holds [(0 - mean) / std, (1 - mean) / std] (per tensor: the envelope
    over channels) from the start, and neither observation nor a method's set_range moves it."""
    from dfqbench.quant.calibration.calibrate import calibrate_on_batches

    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.25, 0.2, 0.1])
    conv = Convention.from_dict({**GDFQ, "layers": {"input_abit": 8, "input_range": "pixels"}})
    conv.pixel_range = (((0 - mean) / std).tolist(), ((1 - mean) / std).tolist())
    q = quantize_model(tiny_model(), conv, wbit=4, abit=4)
    image_q = act_quantizers(q)[0]
    assert image_q.bits == 8 and image_q.fixed
    assert float(image_q.lo) == pytest.approx(-3.0) and float(image_q.hi) == pytest.approx(7.0)  # (1-.3)/.1
    calibrate_on_batches(q, [torch.randn(4, 3, 8, 8) * 50])  # far outside: observed ranges would grow
    image_q.set_range(-1.0, 1.0)
    assert float(image_q.lo) == pytest.approx(-3.0) and float(image_q.hi) == pytest.approx(7.0)
    assert not act_quantizers(q)[1].fixed and float(act_quantizers(q)[1].hi) > 0  # the others calibrated
    # calibrated (the default): the image quantizer is observed like the others
    q2 = quantize_model(tiny_model(), Convention.from_dict({**GDFQ, "layers": {"input_abit": 8}}), wbit=4, abit=4)
    calibrate_on_batches(q2, [torch.randn(4, 3, 8, 8) * 50])
    assert not act_quantizers(q2)[0].fixed and float(act_quantizers(q2)[0].hi) > 50


def test_input_range_is_checked_and_its_default_keeps_old_hashes():
    from dfqbench import records

    with pytest.raises(ValueError, match="quant.layers.input_range='raw' is not valid; choose one of: calibrated, "
                                         "pixels"):
        Convention.from_dict({**GDFQ, "layers": {"input_range": "raw"}})
    base = {"method": {"name": "rtn"}, "quant": {"name": "onnxruntime", "layers": {"input_abit": 8}}}
    calibrated = {**base, "quant": {**base["quant"], "layers": {"input_abit": 8, "input_range": "calibrated"}}}
    pixels = {**base, "quant": {**base["quant"], "layers": {"input_abit": 8, "input_range": "pixels"}}}
    assert records.config_hash(calibrated) == records.config_hash(base) != records.config_hash(pixels)
    assert calibrated["quant"]["layers"]["input_range"] == "calibrated"  # the caller's dict is left as it was


def test_bn_statistics_live_on_the_models_device():
    """The input's N(0, 1) is made where the model's weights are: on a CUDA model a CPU tensor broke the first conv
    (OCS on a GPU). The meta device stands in for CUDA here (a CPU/meta conv does not fail, so each node's
    statistics are checked for their device)."""
    from torch import fx

    from dfqbench.quant.transforms.bn_stats import BNStatistics

    gm = fx.symbolic_trace(tiny_model()).to("meta")
    stats = BNStatistics(gm)
    assert all(g.mean.device.type == "meta" and g.std.device.type == "meta" for g in stats.stats.values() if g)
    fc = next(n for n in gm.graph.nodes if n.target == "fc")
    assert stats.of(fc).mean.shape == (4,)


def test_a_batchnorm_site_of_another_placement_takes_abit_not_norm_abit():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)).eval()  # conv reads a BN
    gm = quantize_model(model, Convention.from_dict({"name": "in", "act": {"sites": "layer_inputs"}}), 4, 4)
    assert [q.bits for q in act_quantizers(gm)] == [4]  # norm_abit is null: the BN output site takes abit
