"""Block reconstruction (AdaRound + LSQ + QDrop), Genie's distilled data, and the genie method end to end."""

import json

import pytest
import torch
from torch import nn

from conftest import run_cli
from dfqbench.methods.base import QuantContext
from dfqbench.quant import ActQuantizer, Convention, WeightQuantizer, quantize_model
from dfqbench.quant.kernels.backend import get_backend
from dfqbench.quant.calibration.blocks import find_blocks
from dfqbench.quant.quantizers.learned import (AdaRoundWeight, HardenedWeightQuantizer, LsqAct, bernoulli_mask, float_mode,
                                    lsq_fake_quant)
from dfqbench.quant.calibration.reconstruct import ReconstructSettings, qdrop_mix, reconstruct
from dfqbench.synth import calib_data
from dfqbench.synth.genie import GenieSettings, genie_source

pytestmark = pytest.mark.usefixtures("one_thread")


BRECQ = Convention.from_dict({"name": "brecq", "weight": {"estimator": "mse", "lp": 2.4},
                              "act": {"sites": "layer_inputs", "symmetric": True, "estimator": "mse", "lp": 2.4},
                              "layers": {"first_wbit": 8, "last_wbit": 8, "second_abit": 8, "last_abit": 8}})


# ---- AdaRound ------------------------------------------------------------------------------------------------

def test_adaround_hand_computed_grid_and_hardening():
    # 2-bit asymmetric min/max over [-1, 2]: step 1, zero point 1, levels -1, 0, 1, 2
    w = torch.tensor([[-1.0, -0.45, 0.1, 0.65, 2.0]])
    wq = WeightQuantizer(2, per_channel=False)
    rounder = AdaRoundWeight(wq, w, learn_scale=False)
    assert rounder.floor.tolist() == [[-1.0, -1.0, 0.0, 0.0, 2.0]]
    hard = rounder.harden()
    assert isinstance(hard, HardenedWeightQuantizer)
    assert hard(w).tolist() == [[-1.0, 0.0, 0.0, 1.0, 2.0]]  # initial logits: round to nearest
    assert hard.int_weight.tolist() == [[0, 1, 1, 2, 3]]
    with torch.no_grad():
        rounder.logits.fill_(5.0)  # every weight rounds up; the top level clamps
    assert rounder.harden()(w).tolist() == [[0.0, 0.0, 1.0, 1.0, 2.0]]
    with torch.no_grad():
        rounder.logits.zero_()  # h = 0.5 everywhere: the regularizer is 1 per weight
    assert rounder.regularizer(20.0).item() == pytest.approx(5.0)


def test_adaround_with_initial_logits_equals_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * 0.1
    for estimator in ("minmax", "mse"):
        rtn = WeightQuantizer(4, estimator=estimator, lp=2.4)
        expected = rtn(w)
        rounder = AdaRoundWeight(rtn, w)
        rounder.soft = False
        assert torch.equal(rounder(w), expected)
        assert torch.equal(rounder.harden()(w), expected)


def test_any_hardened_rounding_is_within_one_step():
    torch.manual_seed(1)
    w = torch.randn(8, 4, 3, 3)
    wq = WeightQuantizer(4)  # min/max: no weight outside the grid
    rounder = AdaRoundWeight(wq, w)
    with torch.no_grad():
        rounder.logits.copy_(torch.randn_like(rounder.logits) * 5)
    q = rounder.harden()(w)
    step = wq.grid.scale.view(-1, 1, 1, 1)
    assert ((q - w).abs() <= step * (1 + 1e-5)).all()
    assert ((q - w).abs() > step / 2 + 1e-6).any()  # some weights were rounded the far way


# ---- LSQ and QDrop -------------------------------------------------------------------------------------------

def _calibrated_act(symmetric=True, lo=0.0, hi=3.0, bits=4):
    q = ActQuantizer(bits, symmetric=symmetric)
    q.set_range(lo, hi)
    return q


def test_lsq_step_gets_the_backend_learnable_gradient():
    torch.manual_seed(2)
    x = (torch.randn(4, 3, 5, 5) * 2).requires_grad_()
    for symmetric, lo in ((True, 0.0), (True, -3.0), (False, -1.0)):
        q = _calibrated_act(symmetric, lo)
        lsq = LsqAct(q)
        y = lsq(x)
        assert torch.equal(y, q(x))  # before any step: the ActQuantizer's own fake quant
        grad = torch.randn_like(y)
        y.backward(grad)
        assert lsq.scale.grad is not None and float(lsq.scale.grad.abs()) > 0
        scale = q.grid.scale.reshape(1).clone().requires_grad_()
        ref = get_backend().learnable_per_tensor(x, scale, q.grid.zero_point.float().reshape(1), q.grid.qmin,
                                                 q.grid.qmax, 1.0)
        ref.backward(grad)
        assert float(lsq.scale.grad) == pytest.approx(float(scale.grad), rel=1e-5)
        x.grad = None


def test_lsq_detach_leaves_a_frozen_range_with_the_learned_step():
    q = _calibrated_act(True, 0.0, 3.0)  # unsigned 4-bit: step 0.2
    lsq = LsqAct(q).attach()
    with torch.no_grad():
        lsq.scale.fill_(0.25)
    assert q(torch.tensor([1.1])).item() == pytest.approx(1.0)  # the graph calls q: now on the 0.25 grid
    lsq.detach()
    assert "forward" not in q.__dict__
    assert float(q.grid.scale) == pytest.approx(0.25) and float(q.hi) == pytest.approx(3.75)
    assert q(torch.tensor([1.1, 9.0])).tolist() == pytest.approx([1.0, 3.75])


def test_qdrop_with_p_zero_is_the_plain_quantized_forward():
    torch.manual_seed(3)
    x = torch.randn(8, 4, 6, 6)
    q = _calibrated_act(True, -3.0, 3.0)
    lsq = LsqAct(q, torch.Generator().manual_seed(0))
    lsq.drop_p = 0.0
    assert torch.equal(lsq(x), q(x))
    x_fp = torch.randn_like(x)
    assert qdrop_mix(x, x_fp, 0.0) is x
    assert torch.equal(qdrop_mix(x, x_fp, 1.0), x_fp)
    mixed = qdrop_mix(x, x_fp, 0.5, torch.Generator().manual_seed(0))
    from_fp = mixed == x_fp
    assert torch.equal(mixed[~from_fp], x[~from_fp])
    assert 0.4 < from_fp.float().mean() < 0.6
    lsq.drop_p = 0.5  # dropped elements pass unquantized, the rest equal the quantized forward
    out = lsq(x)
    kept = out == x
    assert torch.equal(out[~kept], q(x)[~kept]) and 0.4 < kept.float().mean() < 0.6


def test_lsq_drop_gradient_flows_only_through_quantized_elements():
    x = torch.tensor([0.5, 0.5, 10.0, 10.0]).requires_grad_()
    scale = torch.tensor([1.0], requires_grad=True)
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0])
    y = lsq_fake_quant(x, scale, torch.zeros(1), 0, 7, keep)
    assert y.tolist() == [0.5, 0.0, 10.0, 7.0]  # 0.5 rounds half to even; 10 clamps at level 7
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert float(scale.grad) == pytest.approx((0.0 - 0.5) + 7.0)  # LSQ: round(v) - v inside, the level outside


def test_bernoulli_mask_follows_the_layout():
    x = torch.zeros(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    for p in (0.5, 0.25):
        m = bernoulli_mask(x, p, torch.Generator().manual_seed(0))
        assert m.shape == x.shape and m.stride() == x.stride()
        assert set(m.unique().tolist()) == {0.0, 1.0} and abs(float(m.mean()) - p) < 0.06


# ---- blocks and reconstruction -------------------------------------------------------------------------------

class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.relu(self.body(x) + x))


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = TinyResNet()
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_blocks_of_a_residual_network():
    gm = quantize_model(_tiny(), BRECQ, 4, 4)
    names = [[n.name for n in b.nodes] for b in find_blocks(gm)]
    assert names == [
        ["stem_0", "stem_1", "stem_2"],
        ["act_quant_0", "body_0", "body_1", "body_2", "act_quant_1", "body_3", "body_4", "add", "relu"],
        ["act_quant_2", "head_0", "head_1", "head_2"],
    ]


def test_blocks_of_pytorchcv_resnet20_and_preresnet20():
    from pytorchcv.model_provider import get_model

    blocks = find_blocks(quantize_model(get_model("resnet20_cifar10", pretrained=False).eval(), BRECQ, 4, 4))
    assert len(blocks) == 11  # first conv, nine residual blocks, FC
    assert [b.name for b in blocks][1:4] == [f"features_stage1_unit{i}_activ" for i in (1, 2, 3)]
    assert blocks[-1].nodes[0].name == "act_quant_18" and blocks[-1].name == "output"
    pre = find_blocks(quantize_model(get_model("preresnet20_cifar10", pretrained=False).eval(), BRECQ, 4, 4))
    assert len(pre) == 11 and [b.name for b in pre][1:3] == ["add", "add_1"]


GENIE_UNITS = ["BasicBlock", "Bottleneck", "ResBottleneckBlock", "DwsConvBlock", "InvertedResidual",
               "LinearBottleneck"]


class _Unit(nn.Module):  # a MobileNetV2-like unit without a residual: the graph rule cuts it after each layer
    def __init__(self, c_in, c_out):
        super().__init__()
        self.expand, self.act, self.project = nn.Conv2d(c_in, 8, 1), nn.ReLU(), nn.Conv2d(8, c_out, 1)

    def forward(self, x):
        return self.project(self.act(self.expand(x)))


def test_block_units_merge_the_graph_blocks_inside_one_unit_and_never_across_units():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _Unit(4, 4), _Unit(4, 6), nn.Conv2d(6, 2, 1)).eval()
    gm = quantize_model(model, BRECQ, 4, 4)
    assert len(find_blocks(gm)) == 6  # stem, 2 + 2 unit layers, head
    blocks = find_blocks(gm, ["_Unit"])
    layers = [[n.target for n in b.nodes if n.op == "call_module" and "act_quant" not in n.target] for b in blocks]
    assert layers == [["0"], ["1.expand", "1.act", "1.project"], ["2.expand", "2.act", "2.project"], ["3"]]
    assert blocks[2].input is blocks[1].output and blocks[1].input is blocks[0].output
    assert len(find_blocks(gm, ["Conv2d"])) == 6  # single-layer units: nothing to merge


def test_genie_block_units_give_the_codes_blocks_on_mobilenetv2_and_keep_resnets():
    from pytorchcv.model_provider import get_model
    from torchvision.models import mobilenet_v2

    mnv2 = quantize_model(get_model("mobilenetv2_w1", pretrained=False).eval(), BRECQ, 4, 4)
    assert (len(find_blocks(mnv2)), len(find_blocks(mnv2, GENIE_UNITS))) == (34, 20)  # stem, 17 units, 2 layers
    tv = quantize_model(mobilenet_v2().eval(), BRECQ, 4, 4)
    assert len(find_blocks(tv, GENIE_UNITS)) == 20 < len(find_blocks(tv))
    r20 = quantize_model(get_model("resnet20_cifar10", pretrained=False).eval(), BRECQ, 4, 4)
    assert [b.name for b in find_blocks(r20, GENIE_UNITS)] == [b.name for b in find_blocks(r20)]
    from conftest import compose_cfg
    for method in ("genie", "zeroq_recon"):
        assert list(compose_cfg(f"method={method}").method.reconstruct.block_units) == GENIE_UNITS
    with pytest.raises(ValueError, match=r"method.reconstruct.block_units='BasicBlock' must be a list"):
        ReconstructSettings.from_dict({"block_units": "BasicBlock"})


def test_float_mode_is_the_fp32_teacher():
    model = _tiny()
    x = torch.randn(4, 3, 8, 8)
    gm = quantize_model(model, BRECQ, 4, 4)
    for q in gm.modules():
        if isinstance(q, ActQuantizer):
            q.set_range(-1.0, 1.0)
    with float_mode(gm):
        assert torch.allclose(gm(x), model(x), atol=1e-6)
    assert not torch.allclose(gm(x), model(x), atol=1e-3)  # and quantized again afterwards


def test_reconstruction_beats_round_to_nearest_on_the_calibration_data():
    model = _tiny()
    torch.manual_seed(4)
    batches = [torch.randn(32, 3, 8, 8) for _ in range(2)]
    x = torch.cat(batches)
    with torch.no_grad():
        target = model(x)
    settings = ReconstructSettings(iterations=150, lr_round=1e-2, reg_weight=0.01, qdrop_p=0.0)
    gm = quantize_model(model, BRECQ, 4, 4)
    report = reconstruct(gm, batches, settings, seed=0)
    assert [r["block"] for r in report] == ["stem_2", "relu", "head_2"]
    stem, block, head = report  # same quantized input, FP32 target: learned rounding and steps lower the error
    assert stem["error_after"] <= 1.05 * stem["error_before"]  # an 8-bit conv on the float image: little to gain
    assert block["error_after"] < 0.97 * block["error_before"] and head["error_after"] < 0.9 * head["error_before"]
    rtn = quantize_model(_tiny(), BRECQ, 4, 4)
    rtn_report = reconstruct(rtn, batches, ReconstructSettings(iterations=0), seed=0)
    assert rtn_report[0]["error_after"] == report[0]["error_before"]  # same input: "before" is round-to-nearest
    with torch.no_grad():
        err_recon, err_rtn = (gm(x) - target).pow(2).mean(), (rtn(x) - target).pow(2).mean()
    assert err_recon < 0.8 * err_rtn
    # frozen plain fake-quant afterwards: integer weights, ranges set, nothing attached, deterministic
    for name in ("stem.0", "body.0", "body.3", "head.2"):
        assert isinstance(gm.get_submodule(name).weight_quantizer, HardenedWeightQuantizer)
    for q in gm.modules():
        if isinstance(q, ActQuantizer):
            assert q.calibrated and "forward" not in q.__dict__
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(gm(x), gm(x))


def test_reconstruct_settings_are_validated():
    with pytest.raises(ValueError, match=r"method.reconstruct.qdrop_p=1.5"):
        ReconstructSettings.from_dict({"qdrop_p": 1.5})
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['iters'\]"):
        ReconstructSettings.from_dict({"iters": 3})
    with pytest.raises(ValueError, match=r"beta_start=1.0"):
        ReconstructSettings.from_dict({"beta_start": 1.0})
    assert ReconstructSettings.from_dict({"iterations": 0}).iterations == 0


# ---- Genie's data ----------------------------------------------------------------------------------------------

def _ctx(tmp_path, seed=0):
    conv = Convention.from_dict({"name": "c2"})
    return QuantContext(conv, 4, 4, seed, torch.device("cpu"), (3, 32, 32), 10, progress=False,
                        model_sha256="test-teacher", cache_dir=str(tmp_path))


def test_genie_source_shapes_normalization_and_cache(tmp_path):
    from pytorchcv.model_provider import get_model

    model = get_model("resnet20_cifar10", pretrained=False).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = GenieSettings(iterations=3)
    ctx = _ctx(tmp_path)
    batches = genie_source(model, ctx, 10, 4, settings)
    assert [tuple(b.shape) for b in batches] == [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    for b in batches:  # the generator's last BN (no affine): each channel of a batch at mean 0, std 1
        assert b.mean(dim=(0, 2, 3)).abs().max() < 1e-4
        assert (b.var(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert len(list((tmp_path / "calib").glob("genie-*.pt"))) == 1
    ctx2 = _ctx(tmp_path)
    again = genie_source(model, ctx2, 10, 4, settings)
    assert ctx2.info.get("calib_cached") and all(torch.equal(a, b) for a, b in zip(batches, again))
    other_seed = genie_source(model, _ctx(tmp_path, seed=1), 10, 4, settings)
    assert not torch.equal(other_seed[0], batches[0])


def test_genie_is_a_registered_calibration_source():
    assert calib_data.check_source("genie") == "genie"
    assert calib_data.SOURCES["genie"] == "dfqbench.synth.genie:genie_source"


# ---- the method from the CLI ----------------------------------------------------------------------------------

TINY = ["method.num_images=16", "method.calib_batch_size=8", "method.distill.iterations=2",
        "method.reconstruct.iterations=3"]


@pytest.mark.parametrize("quant", ["brecq", "gdfq", "dfq"])
def test_genie_cli_on_the_teacher(tmp_path, cache_dir, cifar10_root, teacher, quant):
    proc = run_cli("method=genie", f"quant={quant}", "wbit=4", "abit=4", f"model.checkpoint={teacher}",
                   f"dataset.root={cifar10_root}", "dataset.max_samples=1000", "threads=1", *TINY,
                   f"hydra.run.dir={tmp_path}", cache=cache_dir)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["status"] == "done" and record["method"] == "genie" and record["quant"] == quant
    info = record["info"]
    assert info["calib_data"] == "genie" and info["calib_images"] == 16
    assert len(info["reconstruct_blocks"]) == 11
    assert record["top1"] > 60.0  # W4A4 after 3 iterations per block on 16 images: far above chance


def _run_preresnet(tmp_path, cache_dir, cifar10_root, method, *extra):
    from dfqbench.runner import run
    from conftest import compose_cfg as _cfg

    record = run(_cfg("model=pytorchcv", "model.arch=preresnet20_cifar10", "model.pretrained=false",
                      f"dataset.root={cifar10_root}", "dataset.max_samples=100", f"paths.cache_dir={cache_dir}",
                      f"method={method}", "quant=brecq", "wbit=4", "abit=4", "threads=1", *extra), tmp_path / method)
    assert record["status"] == "done" and record["weights"] == "random"
    assert len(record["info"]["reconstruct_blocks"]) == 11
    return record


def test_genie_and_zeroq_recon_on_a_random_preresnet20(tmp_path, cache_dir, cifar10_root):
    _run_preresnet(tmp_path, cache_dir, cifar10_root, "genie", *TINY)
    record = _run_preresnet(tmp_path, cache_dir, cifar10_root, "zeroq_recon", "method.calib_data=uniform_noise",
                            "method.num_images=8", "method.reconstruct.iterations=2")
    assert record["info"]["calib_data"] == "uniform_noise"


@pytest.mark.slow
def test_zeroq_recon_with_zeroq_data(tmp_path, cache_dir, cifar10_root):
    record = _run_preresnet(tmp_path, cache_dir, cifar10_root, "zeroq_recon", "method.num_images=2",
                            "method.calib_batch_size=2", "method.reconstruct.iterations=2")
    assert record["info"]["calib_data"] == "distill"


@pytest.mark.parametrize("arg,needles", [
    ("method.calib_data=nope", ["calib_data='nope'", "genie", "distill"]),
    ("method.reconstruct.qdrop_p=1.5", ["qdrop_p=1.5", "[0, 1]"]),
    ("method.distill.iterations=0", ["distill.iterations=0", ">= 1"]),
    ("method.distill.lr_g=-1", ["method.distill.lr_g=-1 must be a number >= 0"]),
    ("method.reconstruct.beta_end=0", ["method.reconstruct.beta_end=0 must be a number > 0"]),
    ("method.reconstruct.batch_size=0", ["method.reconstruct.batch_size=0 must be an integer >= 1"]),
    ("+method.reconstruct.iters=5", ["iters", "iterations"]),
])
def test_bad_genie_settings_are_refused(tmp_path, arg, needles):
    proc = run_cli("method=genie", arg, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dfqbench: error: ")
    for needle in needles:
        assert needle in lines[0]
    assert not (tmp_path / "record.json").exists()
