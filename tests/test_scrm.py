"""ZAQ's SCRM term (stage-wise spatial and channel relations) and the stage taps it reads."""

import copy

import pytest
import torch
import torch.nn.functional as F
from pytorchcv.model_provider import get_model
from torch import nn

from dfqbench.errors import UnsupportedModel
from dfqbench.quant import Convention, WeightQuantizer, quantize_model
from dfqbench.train.ema import EMARangeObserver
from dfqbench.feature_taps import FeatureTap, StageTap
from dfqbench.train.losses import GENERATOR_LOSSES, STUDENT_LOSSES, Step, build_terms, scrm_distance


def _relations_by_hand(x, gamma):
    """Per sample, with explicit matrices: spatial A[i, j] = softmax_j <x_i, x_j> over positions, out = x + g x A^T;
    channel E = x x^T, B = softmax(max_row E - E), out = x + g B x."""
    outs_s, outs_c = [], []
    for f in F.normalize(x.flatten(2), dim=1):  # [C, N]
        a = torch.softmax(f.T @ f, dim=1)
        outs_s.append(f + gamma * f @ a.T)
        e = f @ f.T
        b = torch.softmax(e.max(dim=1, keepdim=True).values - e, dim=1)
        outs_c.append(f + gamma * b @ f)
    return torch.stack(outs_s), torch.stack(outs_c)


def test_scrm_distance_matches_the_relations_computed_by_hand():
    torch.manual_seed(0)
    s = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    t = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    expected = 0.0
    for a, b in zip(s, t):
        (sa, ca), (sb, cb) = _relations_by_hand(a, 0.1), _relations_by_hand(b, 0.1)
        expected += (sa - sb).abs().mean() + (ca - cb).abs().mean()
    assert float(scrm_distance(s, t, 0.1)) == pytest.approx(float(expected), rel=1e-5)
    assert float(scrm_distance(s, s, 0.1)) == 0.0
    # gamma 0: no relation mixing, twice the L1 distance of the channel-normalized maps
    plain = sum(2 * (F.normalize(a, dim=1) - F.normalize(b, dim=1)).abs().mean() for a, b in zip(s, t))
    assert float(scrm_distance(s, t, 0.0)) == pytest.approx(float(plain), rel=1e-6)


def test_scrm_terms_pull_the_student_and_push_the_generator():
    assert [n for n, _ in build_terms({"scrm": {"weight": 1.0}}, STUDENT_LOSSES, "s")] == ["scrm"]
    assert [n for n, _ in build_terms({"scrm": {"gamma": 0.2}}, GENERATOR_LOSSES, "g")] == ["scrm"]
    with pytest.raises(ValueError, match=r"method.student_losses.scrm: gamma=-1 must be a finite number >= 0"):
        build_terms({"scrm": {"gamma": -1}}, STUDENT_LOSSES, "method.student_losses")
    torch.manual_seed(0)
    teacher, student = get_model("resnet20_cifar10").eval(), get_model("resnet20_cifar10").eval()
    taps = (FeatureTap(teacher, {"stages"}), FeatureTap(student, {"stages"}))
    x = torch.randn(2, 3, 32, 32)
    s_loss = dict(build_terms({"scrm": {}}, STUDENT_LOSSES, "s"))["scrm"]
    g_loss = dict(build_terms({"scrm": {}}, GENERATOR_LOSSES, "g"))["scrm"]
    a = s_loss(Step(x, None, teacher=teacher, student=student, taps=taps))
    b = g_loss(Step(x, None, teacher=teacher, student=student, taps=taps))
    assert float(a.detach()) > 0 and float(b.detach()) == pytest.approx(-float(a.detach()), rel=1e-6)


@pytest.mark.parametrize("arch,on_grid", [("resnet20_cifar10", True), ("preresnet20_cifar10", False)])
def test_stage_taps_read_the_students_stage_outputs(arch, on_grid):
    """The quantized student is traced (fx), so stage containers never run as modules: its taps must still give
    the teacher's stage outputs with the quantizers off; with them on, ResNet-20's stage outputs are read after
    their activation quantizer (on the 4-bit grid), a pre-activation ResNet's are its unquantized residual sums."""
    torch.manual_seed(0)
    teacher = get_model(arch).eval()
    student = quantize_model(copy.deepcopy(teacher), Convention.from_dict({"name": "gdfq"}), 4, 4).eval()
    t_tap, s_tap = StageTap(teacher), StageTap(student)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        teacher(x)
        for m in student.modules():  # quantizers off: uncalibrated activation quantizers pass values through
            if isinstance(m, WeightQuantizer):
                m.bits = 32
        student(x)
    shapes = [tuple(v.shape) for v in t_tap.value]
    assert shapes == [(4, 16, 32, 32), (4, 32, 16, 16), (4, 64, 8, 8)]
    for s, t in zip(s_tap.value, t_tap.value):
        torch.testing.assert_close(s, t)
    observer = EMARangeObserver(student, mode="running_minmax")
    with torch.no_grad():
        student(x)
    observer.close()
    with torch.no_grad():
        student(x)
    for v in s_tap.value:  # on a 4-bit grid: at most 16 distinct values per stage output
        assert (1 < v.unique().numel() <= 16) == on_grid


def test_a_model_without_stages_is_a_one_line_error():
    with pytest.raises(UnsupportedModel, match="needs a staged model"):
        StageTap(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
