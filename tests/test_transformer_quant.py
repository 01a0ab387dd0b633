"""Transformer quantization: PSAQ-ViT's placement found by torch.fx on a timm ViT, a hand-checked quantized
matmul, the half-levels weight grid, float-pass calibration, the patch-similarity entropy, and the refusals."""

import copy
import math
import re

import pytest
import torch
from omegaconf import OmegaConf
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dfqbench.methods.base import Method
from dfqbench.methods.psaqvit import PSAQViT
from dfqbench.methods.psaqvit2 import PSAQViT2
from dfqbench.quant import Convention, act_quantizers, quantize_model, weight_quantizers
from dfqbench.quant.calibration.calibrate import calibrate_on_batches
from dfqbench.quant.kernels.grid import grid_from_range
from dfqbench.quant.quantizers.ranges import fake_quant
from dfqbench.synth.patch_similarity import PSAQSettings, kde_entropy, patch_similarity, psaq_images

CONF = "conf/quant/psaqvit.yaml"


def psaqvit_convention(abit=8) -> Convention:
    data = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(CONF), {"abit": abit}), resolve=True)
    data.pop("abit")
    return Convention.from_dict(data)


def tiny_vit(depth=2, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=depth, num_heads=2,
                             mlp_ratio=2.0).eval()


@pytest.mark.parametrize("depth", [1, 3])
def test_psaqvit_placement_counts_and_sites(depth):
    """PSAQ-ViT's official model has 5 + 10 per block + 2 activation quantizers (vit_quant.py: qact_input,
    patch QuantAct, qact_embed, qact_pos, qact1; per block qact1..4, attn qact1..3, qact_attn1, mlp QuantAct1/2;
    qact2, act_out) and 4 per block + 2 weight quantizers (patch conv, qkv, proj, fc1, fc2, head)."""
    gm = quantize_model(tiny_vit(depth), psaqvit_convention(), 4, 8)
    assert len(act_quantizers(gm)) == 10 * depth + 7
    assert len(weight_quantizers(gm)) == 4 * depth + 2
    readers = {}
    for node in gm.graph.nodes:
        for arg in node.all_input_nodes:
            readers.setdefault(arg, []).append(node)
    softmaxes = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "softmax"]
    assert len(softmaxes) == depth
    for sm in softmaxes:  # the softmax output is read in float (through dropout) by attn @ v
        chain = readers[sm]
        assert all("act_quant" not in str(n.target) for n in chain)
    gelus = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.GELU)]
    for g in gelus:  # fc1 is fused with GELU: the GELU's input is fc1's raw output
        assert "act_quant" not in str(g.args[0].target)
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and "matmul" in str(n.target)]
    assert len(matmuls) == 2 * depth
    for mm in matmuls:  # every matmul output is quantized (q @ k^T before softmax; attn @ v via proj's input)
        node, seen = mm, 0
        while "act_quant" not in str(node.target) and seen < 6:
            node, seen = next(iter(node.users)), seen + 1
        assert "act_quant" in str(node.target)


def test_fused_attention_is_made_explicit_and_output_unchanged():
    model = tiny_vit(1)
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    gm = quantize_model(model, psaqvit_convention(), 32, 32)  # 32 bits = float: the wrapped graph is the model
    assert model.blocks[0].attn.fused_attn is False
    torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-5)


class TwoHeads(nn.Module):
    """a = A x, b = B x, out = a @ b^T: a matmul of two activations, no module for it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.eye(2))
            self.b.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))

    def forward(self, x):
        return self.a(x) @ self.b(x).transpose(-2, -1)


def _hand_quant(v: float, lo: float, hi: float, bits: int) -> float:
    scale = (hi - lo) / (2 ** bits - 1)
    zp = min(max(round(-lo / scale), 0), 2 ** bits - 1)
    q = min(max(round(v / scale) + zp, 0), 2 ** bits - 1)
    return (q - zp) * scale


def test_quantized_matmul_matches_hand_computation():
    conv = Convention.from_dict({"name": "t", "act": {"sites": "op_outputs", "ops": ["layer", "matmul"]}})
    gm = quantize_model(TwoHeads(), conv, 32, 4)
    qs = act_quantizers(gm)
    assert len(qs) == 3  # a, b^T, the product
    ranges = [(-1.0, 1.0), (-1.0, 1.0), (-2.0, 2.0)]
    for q, (lo, hi) in zip(qs, ranges):
        q.set_range(lo, hi)
    x = torch.tensor([[[0.3, -0.7], [0.55, 0.1]]])  # [1, 2 tokens, 2 features]
    a = [[_hand_quant(v, -1, 1, 4) for v in row] for row in x[0].tolist()]
    b = [[_hand_quant(v, -1, 1, 4) for v in row[::-1]] for row in x[0].tolist()]  # B swaps the features
    prod = [[sum(a[i][k] * b[j][k] for k in range(2)) for j in range(2)] for i in range(2)]
    want = torch.tensor([[[_hand_quant(v, -2, 2, 4) for v in row] for row in prod]])
    torch.testing.assert_close(gm(x), want, rtol=0, atol=1e-6)
    assert _hand_quant(0.3, -1, 1, 4) == pytest.approx(4 / 15)  # 0.3 / (2/15) = 2.25 -> 2 steps


def test_half_levels_weight_grid_by_hand():
    """PSAQ-ViT weights: scale amax / 7.5 at 4 bits, integers [-8, 7]: amax itself clips to 7 steps, -amax
    rounds to -8 steps (round half to even)."""
    w = torch.tensor([1.5, -1.5, 0.31, -0.29])
    grid = grid_from_range(w.min(), w.max(), 4, symmetric=True, symmetric_grid="half_levels")
    assert float(grid.scale) == pytest.approx(0.2)
    torch.testing.assert_close(fake_quant(w, grid), torch.tensor([1.4, -1.6, 0.4, -0.2]))


def test_float_observation_sees_float_activations():
    model = tiny_vit(1)
    x = torch.randn(4, 3, 16, 16)
    gm = quantize_model(model, psaqvit_convention(abit=2), 2, 2)
    calibrate_on_batches(gm, [x], observe="float")
    first_ln = next(n for n in gm.graph.nodes if "layer_norm" in n.name)
    q = next(gm.get_submodule(u.target) for u in first_ln.users if "act_quant" in str(u.target))
    with torch.no_grad():
        ln = model.blocks[0].norm1(model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x)))))
    assert float(q.lo) == pytest.approx(float(ln.min()), abs=1e-5)
    assert float(q.hi) == pytest.approx(float(ln.max()), abs=1e-5)
    gm2 = quantize_model(tiny_vit(1), psaqvit_convention(abit=2), 2, 2)
    calibrate_on_batches(gm2, [x], observe="quantized")
    ranges = lambda m: [(float(q.lo), float(q.hi)) for q in act_quantizers(m)]
    assert ranges(gm2) != ranges(gm)  # at 2 bits the quantized pass sees other values downstream


def test_kde_entropy_hand_values():
    # all similarities equal: a zero-width grid, entropy 0
    assert float(kde_entropy(torch.ones(2, 50), 0.01, 10)) == 0.0
    # samples uniform on [-1, 1], narrow kernel: density 1/2 inside (1/4 at the two ends, where
    # -p log p is the same, 0.3466), so the entropy is log 2
    samples = torch.linspace(-1, 1, 4001).repeat(3, 1)
    assert float(kde_entropy(samples, 0.01, 10)) == pytest.approx(math.log(2), abs=2e-3)


def test_windowed_blocks_pool_an_images_windows_into_one_density():
    """Swin's window attention gives rows = images x windows; PSAQ-ViT's code takes one density per image over
    all its windows' similarities (sims.view(batch_size, -1)), not one per window averaged."""
    from dfqbench.synth.patch_similarity import PatchFeatures

    torch.manual_seed(0)
    # image 0: its two windows' patch features are far apart; image 1: both windows alike
    feats = torch.cat([torch.randn(1, 5, 4), torch.randn(1, 5, 4) * 0.01 + 3, torch.randn(2, 5, 4)])  # [2 x 2, 5, 4]
    patches = PatchFeatures.__new__(PatchFeatures)
    patches.features = [feats]
    pooled = float(patches.entropy(0.01, 10, images=2))
    sims = patch_similarity(feats)
    assert pooled == pytest.approx(float(kde_entropy(sims.reshape(2, -1), 0.01, 10)))
    assert pooled != pytest.approx(float(kde_entropy(sims, 0.01, 10)), abs=1e-3)  # per-window densities differ
    assert patches.features == []
    patches.features = [feats]  # one row per image (a ViT): the same as before
    assert float(patches.entropy(0.01, 10, images=4)) == pytest.approx(float(kde_entropy(sims, 0.01, 10)))


def test_patch_similarity_is_cosine():
    f = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])
    sims = patch_similarity(f).view(3, 3)
    c = 1 / math.sqrt(2)
    torch.testing.assert_close(sims, torch.tensor([[1.0, 0.0, c], [0.0, 1.0, c], [c, c, 1.0]]))


def test_psaq_synthesis_raises_entropy_and_stays_in_pixel_range():
    model = tiny_vit(2)
    lo, hi = torch.full((3,), -2.0), torch.full((3,), 2.0)
    s = PSAQSettings(batch_size=4, rounds=1, iterations=1, jitter=[1], tv_target=[50.0, 60.0])
    g = torch.Generator().manual_seed(0)
    x0 = psaq_images(model, (3, 16, 16), 5, lo, hi, s, g, "cpu")
    assert x0.shape == (4, 3, 16, 16) and float(x0.min()) >= -2 and float(x0.max()) <= 2
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_bn_methods_refuse_a_transformer_and_psaqvit_refuses_a_cnn():
    with pytest.raises(ValueError, match="needs BatchNorm statistics.*psaqvit"):
        Method("zeroq").check_model(tiny_vit(1))
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(ValueError, match="needs a vision transformer"):
        PSAQViT().check_model(cnn)
    PSAQViT().check_model(tiny_vit(1))
    Method("zeroq").check_model(cnn)


@pytest.mark.parametrize("act, message", [
    ({"sites": "op_outputs"}, "needs quant.act.ops"),
    ({"sites": "op_outputs", "ops": ["layer", "attention"]}, "quant.act.ops='attention' is not valid; choose one of"),
    ({"sites": "after_relu", "ops": ["layer"]}, "only read with quant.act.sites=op_outputs"),
])
def test_op_outputs_bad_input(act, message):
    with pytest.raises(ValueError, match=message):
        Convention.from_dict({"name": "t", "act": act})


def test_psaqvit_bad_settings():
    with pytest.raises(ValueError, match=re.escape("method.bandwidth=0 must be a number > 0")):
        PSAQViT(bandwidth=0)
    with pytest.raises(ValueError, match=re.escape("method.student_lr=True must be a number > 0")):
        PSAQViT2(student_lr=True)
    with pytest.raises(ValueError, match="unknown setting"):
        PSAQViT(temperature=1)
    with pytest.raises(ValueError, match="method.observe='x' is not valid; choose one of: quantized, float"):
        PSAQViT(observe="x")


def _ctx(abit=4):
    from dfqbench.methods.base import QuantContext

    return QuantContext(psaqvit_convention(abit), 4, abit, 0, torch.device("cpu"), (3, 16, 16), 5, progress=False)


V1_TINY = dict(batch_size=8, rounds=1, iterations=2, jitter=[0], flip=False, tv_weight=0.0)


def test_psaqvit2_image_steps_raise_the_teacher_student_gap():
    """With the student (almost) frozen, the images' steps must increase KL(teacher || student): the sign of the
    adversarial objective."""

    ctx = _ctx()
    PSAQViT2(cycles=4, sample_lr=0.2, student_lr=1e-12, entropy_weight=0.0, **V1_TINY).quantize(tiny_vit(2), ctx)
    gaps = [h["gap"] for h in ctx.info["adversarial"]]
    assert gaps[-1] > gaps[0]


def test_psaqvit2_trains_the_student_weights():

    teacher = tiny_vit(2)
    student = PSAQViT2(cycles=3, student_lr=1e-3, **V1_TINY).quantize(copy.deepcopy(teacher), _ctx())
    before, after = teacher.state_dict(), student.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in ("blocks.0.attn.qkv.weight", "head.weight")
               if k in after)
