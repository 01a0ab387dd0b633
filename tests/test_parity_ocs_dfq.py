"""The fixes and official placements that parity with the official OCS code (cornell-zhang/dnn-quant-ocs) and the
unofficial DFQ code (jakc4103/DFQ) exposed (scripts/parity/ocs.py, dfq.py; results/parity.csv), each pinned by a
hand-computed value that the behaviour before the fix does not give."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import compose_cfg
from dfqbench.methods.base import QuantContext
from dfqbench.methods.ocs import (OCS, DynamicOutputQuant, OCSWeightQuantizer, expand_shifted, merge,
                                  split_channels_shifted)
from dfqbench.quant import Convention, WeightQuantizer, act_quantizers
from dfqbench.runner import build_convention
from test_wrap import tiny_model


# ---- OCS: the grid-aware split -------------------------------------------------------------------------------

def test_ocs_split_shifts_the_halves_by_a_quarter_step_by_hand():
    w = torch.tensor([[4.0, -1.0, 2.0]])
    index, factor, offset = split_channels_shifted(w, 1, 1.0)  # 4 -> 4/2 - 1/4 (in place), 4/2 + 1/4 (appended)
    assert index.tolist() == [0, 1, 2, 0]
    assert factor.tolist() == [0.5, 1.0, 1.0, 0.5] and offset.tolist() == [-0.25, 0.0, 0.0, 0.25]
    assert expand_shifted(w, index, factor, offset, 1.0).tolist() == [[1.75, -1.0, 2.0, 2.25]]
    assert torch.allclose(merge(expand_shifted(w, index, factor, offset, 1.0), index, 3), w)  # same function
    zero = torch.tensor([[4.0, 0.0], [0.0, 1.0]])  # zero entries stay zero in both copies (the code's np.where)
    i, f, o = split_channels_shifted(zero, 1, 1.0)
    assert expand_shifted(zero, i, f, o, 1.0).tolist() == [[1.75, 0.0, 2.25], [0.0, 1.0, 0.0]]


def test_ocs_quantizer_quarter_split_by_hand():
    base = WeightQuantizer(3, per_channel=False, symmetric=True)
    w = torch.tensor([[4.0, -0.9, 2.2]])
    # the plain split [2, -0.9, 1.1, 2, 1.1] sets the grid: max 2, signed 3-bit (qmax 3), step 2/3. Split again
    # with the shifts: 4 -> 11/6, 13/6; then 2.2 (now the largest) -> 1.1 -/+ 1/6. In steps: [2.75, -1.35, 1.4,
    # 3.25, 1.9] -> [3, -1, 1, 3, 2]; summed back: [6, -1, 3] steps = [4, -2/3, 2]. Plain halving rounds 2.2 to
    # 2 x round(1.65) = 4 steps = 8/3 (error 0.47 instead of 0.2).
    q = OCSWeightQuantizer(base, expand_ratio=0.5, clip="max", split="quarter")
    assert torch.allclose(q(w), torch.tensor([[4.0, -2 / 3, 2.0]]), atol=1e-6)
    assert q.index.tolist() == [0, 1, 2, 0, 2] and q.splits == 2
    assert torch.allclose(q.offset, torch.tensor([-0.25, 0.0, -0.25, 0.25, 0.25]))
    half = OCSWeightQuantizer(base, expand_ratio=0.5, clip="max", split="half")
    assert torch.allclose(half(w), torch.tensor([[4.0, -2 / 3, 8 / 3]]), atol=1e-6)


def test_ocs_quarter_split_channel_rounds_like_the_unsplit_weight():
    torch.manual_seed(0)
    w = torch.randn(8, 16, 3, 3)
    q = OCSWeightQuantizer(WeightQuantizer(4, per_channel=False, symmetric=True), 0.02, "max", "quarter")
    out = q(w)
    step = q.grid.scale
    plain = torch.round(w / step) * step  # the same grid, no split (the split channel's max: 2 x 7 steps)
    assert q.splits == 1 and torch.allclose(out, plain, atol=1e-6)  # the split channel loses nothing to rounding
    half = OCSWeightQuantizer(WeightQuantizer(4, per_channel=False, symmetric=True), 0.02, "max", "half")
    k = int(q.index[-1])
    err_half = (half(w) - w)[:, k].abs().max() / step
    err_quarter = (out - w)[:, k].abs().max() / step
    assert err_quarter <= 0.5 + 1e-5 and err_half > 0.5  # plain halving: up to a whole step


def test_ocs_method_defaults_to_the_quarter_split():
    assert OCS().split == "quarter"
    assert compose_cfg("method=ocs").method.split == "quarter"
    with pytest.raises(ValueError, match="split='third'"):
        OCS(split="third")


# ---- OCS: the official placement ------------------------------------------------------------------------------

def test_dynamic_output_quant_by_hand():
    layer = DynamicOutputQuant(nn.Identity(), 3)
    # signed 3-bit, max |y| 0.7: step 0.7 / 3; [0.1, -0.7, 0.4] / step = [0.43, -3, 1.71] -> [0, -3, 2]
    y = layer(torch.tensor([0.1, -0.7, 0.4]))
    assert torch.allclose(y, torch.tensor([0.0, -0.7, 2 * 0.7 / 3]), atol=1e-6)


def _official_ocs() -> Convention:
    return build_convention(compose_cfg("quant=official_ocs"), OCS())


def test_official_ocs_preset_leaves_first_conv_and_fc_float():
    conv = _official_ocs()
    assert conv.act.sites == "each_layer_input" and not conv.fold_bn
    assert conv.layers.first_wbit == 32 and conv.layers.last_wbit == 32 and conv.layers.last_abit == 32
    st = conv.method_settings["ocs"]
    assert (st["profile"], st["act_grid"], st["output_quant"], st["split"]) == ("float", "signed", "dynamic",
                                                                                  "quarter")
    assert (st["calib_data"], st["calib_images"], st["calib_batch_size"]) == ("real", 512, 512)


def test_official_ocs_settings_profile_in_float_on_a_signed_grid(one_thread):
    model = tiny_model()
    conv = _official_ocs().with_overrides({"method_settings": {"ocs": {
        **_official_ocs().method_settings["ocs"], "calib_data": "uniform_noise", "calib_images": 4,
        "calib_batch_size": 4}}})
    ctx = QuantContext(conv, 4, 4, 0, torch.device("cpu"), (3, 8, 8), 4, progress=False)
    # the inputs the float model feeds conv1 and conv2 (the images of seed 0, as the method draws them)
    from dfqbench.synth.calib_data import calibration_batches
    x = calibration_batches("uniform_noise", model, ctx, 4, 4)[0]
    with torch.no_grad():
        a = model.stem(x)
        b = model.relu1(model.bn1(model.conv1(a)))
    qmodel = OCS().quantize(model, ctx)
    qs = [q for q in act_quantizers(qmodel) if q.enabled]
    assert len(qs) == 2  # conv1 and conv2 inputs; not the image, not the FC input
    for q, t in zip(qs, (a, b)):
        assert float(q.hi) == pytest.approx(float(t.abs().max()), rel=1e-6)
        assert float(q.lo) == -float(q.hi)  # signed, though the tensor is >= 0 (after a ReLU)
        assert q.grid.qmin == -8 and q.grid.qmax == 7
    wrapped = [m for m in qmodel.modules() if isinstance(m, DynamicOutputQuant)]
    assert len(wrapped) == 2 and ctx.info["ocs_dynamic_outputs"] == 2  # conv1, conv2; not the stem conv, not fc


# ---- DFQ (the unofficial jakc4103/DFQ code) --------------------------------------------------------------------

def _pair(w1, w2):
    from dfqbench.quant.transforms.equalize import LayerPair
    first, second = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    first.weight.data, second.weight.data = torch.tensor(w1), torch.tensor(w2)
    return LayerPair(first, second, through_relu=True)


def test_equalization_with_the_codes_max_minus_min_range_by_hand():
    from dfqbench.quant.transforms.equalize import equalize
    # A rows (channels): [1, -3] (max-min 4, max|w| 3), [2, -2] (4, 2); B columns: [4, 0] (4, 4), [1, -1] (2, 1).
    # max - min: channel 0 r1 = r2 = 4 -> s = 1; channel 1 s = sqrt(4 / 2): A row / sqrt 2, B column * sqrt 2.
    pair = _pair([[1.0, -3.0], [2.0, -2.0]], [[4.0, 1.0], [0.0, -1.0]])
    equalize([pair], channel_range="minmax")
    r = 2 ** 0.5
    assert torch.allclose(pair.first.weight, torch.tensor([[1.0, -3.0], [2 / r, -2 / r]]), atol=1e-6)
    assert torch.allclose(pair.second.weight, torch.tensor([[4.0, r], [0.0, -r]]), atol=1e-6)
    # max |w| (the default) moves channel 0 too: s = sqrt(3 / 4)
    pair = _pair([[1.0, -3.0], [2.0, -2.0]], [[4.0, 1.0], [0.0, -1.0]])
    equalize([pair])
    s0 = (3 / 4) ** 0.5
    assert torch.allclose(pair.first.weight[0], torch.tensor([1.0, -3.0]) / s0, atol=1e-6)


def _official_dfq_convention():
    from dfqbench.methods.dfq import DFQ
    return build_convention(compose_cfg("method=dfq", "quant=official_dfq", "abit=4"), DFQ())


def test_official_dfq_preset():
    conv = _official_dfq_convention()
    assert conv.fold_bn and conv.act.sites == "each_layer_input" and conv.layers.input_abit == 4
    assert conv.weight.granularity == "per_tensor" and not conv.weight.symmetric
    assert conv.method_settings["dfq"] == {"equalize_range": "minmax", "input_range": "normalization"}
    assert conv.act.add_inputs  # the code's QuantMeasure on each operand of every residual addition


class _Measure(nn.Module):
    """Stands in for the DFQ code's QuantMeasure: running_min / running_max buffers."""

    def __init__(self, lo, hi):
        super().__init__()
        self.register_buffer("running_min", torch.tensor([lo]))
        self.register_buffer("running_max", torch.tensor([hi]))


def _dfq_driver():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "parity"))
    import dfq
    return dfq


def test_dfq_driver_ablations_map_the_codes_operand_quantizers_by_graph_order():
    """--clip-add-operands-at-zero and --ranges-from-dfqbench find operand j of the k-th tensor op as
    custom_tensor_op.<2k + j> (the order set_quant_minmax hands them out in), on a fake graph: two additions, the
    first reading (a BatchNorm, a ReLU), the second (a ReLU, a conv)."""
    import types
    dfq = _dfq_driver()
    uq = types.SimpleNamespace(QuantMeasure=_Measure)
    model = nn.Module()
    model.custom_tensor_op = nn.ModuleList([_Measure(-3.0, 3.0), _Measure(-2.0, 4.0), _Measure(-1.0, 2.0),
                                            _Measure(-5.0, 5.0)])
    model.conv = nn.Module()
    model.conv.quant = _Measure(0.0, 4.0)
    graph = {"bn": nn.BatchNorm2d(2), "relu": nn.ReLU(), "add_1": "TorchAdd_1", "relu2": nn.ReLU(),
             "conv": nn.Conv2d(2, 2, 1), "add_2": "TorchAdd_2"}
    bottoms = {"bn": ["Data"], "relu": ["bn"], "add_1": ["bn", "relu"], "relu2": ["add_1"], "conv": ["relu2"],
               "add_2": ["relu2", "conv"]}
    assert dfq.clip_add_operands(model, graph, bottoms, uq) == ["custom_tensor_op.1", "custom_tensor_op.2"]
    ranges = [(float(m.running_min), float(m.running_max)) for m in model.custom_tensor_op]
    assert ranges == [(-3.0, 3.0), (0.0, 4.0), (0.0, 2.0), (-5.0, 5.0)]  # only the operands reading a ReLU
    ours = {("add", 0, 0): (-1.5, 1.5), ("add", 0, 1): (0.0, 3.5), ("add", 1, 0): (0.0, 2.5),
            ("add", 1, 1): (-4.0, 4.5), "conv.quant": (0.0, 3.0)}
    dfq.set_ranges(model, ours, graph, bottoms, uq)
    assert [(float(m.running_min), float(m.running_max)) for m in model.custom_tensor_op] == [
        (-1.5, 1.5), (0.0, 3.5), (0.0, 2.5), (-4.0, 4.5)]
    assert (float(model.conv.quant.running_min), float(model.conv.quant.running_max)) == (0.0, 3.0)
    with pytest.raises(SystemExit, match="do not match"):  # every quantizer of the code must get a range
        dfq.set_ranges(model, {k: v for k, v in ours.items() if k != "conv.quant"}, graph, bottoms, uq)


def test_dfq_driver_zero_exact_grids_round_the_codes_minimum_to_the_step():
    """--zero-exact-grids: the code's grid over [-3.53, 3.55] at 4 bits puts 0 at -0.23 (min + k step); the
    ablation moves the grid by under half a step so that 0 is a point, as a rounded zero point does."""
    import types
    dfq = _dfq_driver()
    calls = []

    class Uniform:
        @staticmethod
        def forward(ctx, x, num_bits=8, min_value=None, max_value=None, inplace=False, symmetric=False,
                    num_chunks=None):
            calls.append((min_value, max_value))
            step = (max_value - min_value) / (2 ** num_bits - 1)
            return torch.clamp(torch.round((x - min_value) / step), 0, 2 ** num_bits - 1) * step + min_value

    uq = types.SimpleNamespace(UniformQuantize=Uniform)
    zero = torch.zeros(1)
    step = 7.08 / 15
    assert float(Uniform.forward(None, zero, 4, -3.53, 3.55)) == pytest.approx(-3.53 + 7 * step)  # -0.226
    dfq.zero_exact_grids(uq)
    assert float(uq.UniformQuantize.forward(None, zero, 4, -3.53, 3.55)) == pytest.approx(0.0, abs=1e-6)
    lo, hi = calls[-1]
    assert lo == pytest.approx(-7 * step) and hi - lo == pytest.approx(15 * step)  # -3.30: 0.23 up, same step


def test_dfq_quantized_image_takes_the_normalization_range(one_thread):
    from dfqbench.methods.dfq import DFQ
    conv = _official_dfq_convention()
    ctx = QuantContext(conv, 4, 4, 0, torch.device("cpu"), (3, 8, 8), 4, progress=False,
                       mean=torch.tensor([0.5, 0.4, 0.5]), std=torch.tensor([0.25, 0.2, 0.5]))
    method = DFQ()
    qmodel = method.quantize(tiny_model(), ctx)
    assert method.equalize_range == "minmax"
    # (0 - mean) / std = [-2, -2, -1] -> min -2; (1 - mean) / std = [2, 3, 1] -> max 3
    image_q = act_quantizers(qmodel)[0]
    assert (float(image_q.lo), float(image_q.hi)) == (-2.0, 3.0) and image_q.bits == 4
    assert ctx.info["dfq_input_range"] == [-2.0, 3.0]
    with pytest.raises(ValueError, match="input_range='data'"):
        DFQ(input_range="data")


def test_dfq_driver_compares_and_sets_weights_by_layer_name():
    """The code's layers (plain conv/linear) against dfqbench's quantized layers of the same names: the largest
    difference over dfqbench's largest magnitude, per layer; --weights-from-dfqbench copies dfqbench's in."""
    from dfqbench.quant import WeightQuantizer
    from dfqbench.quant.quantizers.layers import quant_class_for
    dfq = _dfq_driver()
    torch.manual_seed(0)
    code = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.Flatten(), nn.Linear(3, 2))
    ours = nn.Sequential(*[copy.deepcopy(m) for m in code])
    for i in (0, 3):
        ours[i] = quant_class_for(ours[i]).from_float(ours[i], WeightQuantizer(4))
    with torch.no_grad():
        ours[0].weight.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0, 0.25, 1.5]).reshape(3, 2, 1, 1))
        code[0].weight.copy_(ours[0].weight + 0.5)  # 0.5 / max |w| 2.0
        ours[0].bias.copy_(torch.tensor([0.5, -1.0, 0.25]))
        code[0].bias.copy_(torch.tensor([0.5, -1.0, 0.0]))  # 0.25 / 1.0
        code[3].weight.copy_(ours[3].weight)
        code[3].bias.copy_(ours[3].bias)
    check = dfq.compare_weights(code, ours)
    assert check["layers"]["0"] == {"weight": 0.25, "bias": 0.25}
    assert check["layers"]["3"] == {"weight": 0.0, "bias": 0.0}
    assert check["max_rel_diff"]["weight"] == {"value": 0.25, "layer": "0"}
    dfq.set_weights(code, ours)
    assert torch.equal(code[0].weight, ours[0].weight) and torch.equal(code[0].bias, ours[0].bias)
    assert dfq.compare_weights(code, ours)["max_rel_diff"]["bias"]["value"] == 0.0
    del code[3]  # a layer of dfqbench's the code does not have
    with pytest.raises(SystemExit, match="do not match"):
        dfq.compare_weights(code, ours)


def _module_from_source(path, source):
    import types
    path.write_text(source)
    module = types.ModuleType(path.stem)
    exec(compile(source, str(path), "exec"), module.__dict__)  # inspect.getsource reads it back from `path`
    return module


def test_dfq_driver_unpropagated_bias_correction_drops_only_the_codes_propagation_line(tmp_path):
    """--bias-correction-unpropagated recompiles the code's bias_correction without the line that adds each
    correction to the next BatchNorm's statistics; a source without that line exactly once is refused."""
    import types
    dfq = _dfq_driver()
    module = _module_from_source(tmp_path / "fake_dfq.py", (
        "def bias_correction(graph, out):\n"
        "    for idx_layer in graph:\n"
        "        bias_prev = graph[idx_layer].step\n"
        "        graph[idx_layer].fake_bias.add_(bias_prev)\n"
        "        out.append(idx_layer)\n"
        "    return out\n"))
    bn = types.SimpleNamespace(fake_bias=torch.zeros(2), step=torch.ones(2))
    assert module.bias_correction({"bn": bn}, []) == ["bn"] and bn.fake_bias.tolist() == [1.0, 1.0]
    bn.fake_bias.zero_()
    unpropagated = dfq.without_correction_propagation(module)
    assert unpropagated({"bn": bn}, []) == ["bn"] and bn.fake_bias.tolist() == [0.0, 0.0]
    changed = _module_from_source(tmp_path / "changed_dfq.py", "def bias_correction(graph, out):\n    return out\n")
    with pytest.raises(SystemExit, match="the code changed"):
        dfq.without_correction_propagation(changed)
