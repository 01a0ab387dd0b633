"""DFQF: learned clipping quantizers, its stage-1 generator losses, the two-stage method on the real teacher."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from pytorchcv.model_provider import get_model

from test_qat import SMOKE, _real
from dfqbench.quant import ActQuantizer, Convention, WeightQuantizer, quantize_model
from dfqbench.quant.quantizers.clipped import (ClippedActQuantizer, ClippedWeightQuantizer, attach_learned_clips,
                                    clip_quantize, init_clip)
from dfqbench.errors import ConfigError
from dfqbench.runner import build_method, run
from dfqbench.train.losses import AdversarialKD, BNStatKL, ClassBalance, Step
from dfqbench.train.trainer import TrainSettings, _student_optimizer
from conftest import compose_cfg, run_cli


def test_clip_quantize_by_hand_and_its_clip_gradient():
    x = torch.tensor([-2.0, -0.31, 0.05, 0.5, 3.0])
    # 4-bit signed, clip 1.4: step 0.2, levels -8..7
    out = clip_quantize(x, torch.tensor(1.4), 4, signed=True)
    torch.testing.assert_close(out, torch.tensor([-1.6, -0.4, 0.0, 0.4, 1.4]))
    # 2-bit unsigned, clip 3: step 1, levels 0..3; d out / d clip summed = (1/3) * sum over elements of
    # (round(t) - t) inside the range and the clamped level outside: (-0.4 + 0.4 + 3 + 0) / 3 = 1
    clip = torch.tensor(3.0, requires_grad=True)
    y = clip_quantize(torch.tensor([-1.0, 0.4, 1.6, 5.0]), clip, 2, signed=False)
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 2.0, 3.0]))
    y.sum().backward()
    assert float(clip.grad) == pytest.approx(1.0)


def test_init_clip_is_the_mse_optimum_or_half_the_maximum():
    v = torch.linspace(-1.0, 1.0, 2001)
    errors = {c: float((clip_quantize(v.double(), torch.tensor(c / 100, dtype=torch.float64), 3, True)
                        - v.double()).pow(2).mean()) for c in range(1, 100)}
    best = min(errors, key=errors.get) / 100
    assert best > 0.5 and init_clip(v, 3, signed=True) == pytest.approx(best)
    outlier = torch.cat([torch.full((100000,), 0.1), torch.tensor([10.0])])  # optimum far below max / 2
    assert init_clip(outlier, 4, signed=True) == pytest.approx(5.0)
    assert init_clip(torch.tensor([-3.0, -1.0]), 4, signed=False) == 1e-8  # nothing above 0 after a ReLU


def test_attach_learned_clips_replaces_every_quantizer_with_dfqfs_initialization():
    torch.manual_seed(0)
    model = get_model("resnet20_cifar10").eval()
    conv = Convention.from_dict({"name": "dfqf", "weight": {"granularity": "per_tensor", "symmetric": True},
                                 "layers": {"first_wbit": 8, "last_wbit": 8}})
    student = quantize_model(model, conv, 4, 4).eval()
    first_weight = student.features.init_block.conv.weight.detach().clone()
    sites = [n for n, m in student.named_modules() if isinstance(m, ActQuantizer)]
    layers = sum(isinstance(m, WeightQuantizer) for m in student.modules())
    seen = {}
    handle = student.get_submodule(sites[0]).register_forward_hook(
        lambda m, i, o: seen.setdefault("x", []).append(i[0].detach().clone()))
    batches = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    attach_learned_clips(student, batches)
    handle.remove()
    assert not any(isinstance(m, (ActQuantizer, WeightQuantizer)) for m in student.modules())
    clips = [n for n, _ in student.named_parameters() if n.endswith(".clip")]
    assert len(clips) == len(sites) + layers == 19 + 22  # 19 ReLUs; 21 convs (2 shortcut 1x1) and the FC
    first = student.features.init_block.conv.weight_quantizer
    assert isinstance(first, ClippedWeightQuantizer) and first.bits == 8 and student.output.weight_quantizer.bits == 8
    assert float(first.clip.detach()) == pytest.approx(init_clip(first_weight, 8, True))
    act = student.get_submodule(sites[0])
    assert isinstance(act, ClippedActQuantizer) and act.bits == 4
    expected = sum(init_clip(x, 4, False) for x in seen["x"]) / 2  # measured with float weights
    assert float(act.clip.detach()) == pytest.approx(expected, rel=1e-6)


def test_clips_get_their_own_optimizer_group():
    student = torch.nn.Sequential(torch.nn.Linear(3, 3), ClippedActQuantizer(4, 1.0))
    opt = _student_optimizer(student, TrainSettings(student_lr=1e-3, weight_decay=5e-4, nesterov=False,
                                                    clip_lr_ratio=0.1))
    base, clips = opt.param_groups
    assert len(base["params"]) == 2 and base["base_lr"] == 1e-3 and base["weight_decay"] == 5e-4
    assert clips["params"] == [student[1].clip] and clips["base_lr"] == pytest.approx(1e-4)
    assert clips["momentum"] == 0.0 and clips["weight_decay"] == 0.0


def test_stage1_generator_losses_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    p = F.softmax(logits, dim=1)
    h = lambda q: -(q * q.log()).sum(-1)  # noqa: E731
    step = Step(torch.zeros(3, 1), None, teacher_logits=logits, student=lambda x: torch.zeros(3, 2))
    assert float(ClassBalance(marginal=40.0)(step)) == pytest.approx(float(h(p).mean() - 40 * h(p.mean(0))))
    kl = float((p * (p.log() - math.log(0.5))).sum(1).mean())  # KL(teacher || uniform student), batch mean
    assert float(AdversarialKD()(step)) == pytest.approx(-kl, rel=1e-6)
    mean, var, rm, rv = torch.tensor([0.5, 0.0]), torch.tensor([2.0, 1.0]), torch.zeros(2), torch.ones(2)
    step = Step(torch.zeros(1), None, teacher_logits=logits, bn_stats=lambda: [(mean, var, rm, rv)])
    expected = ((2.0 - math.log(2.0) + 0.25) + (1.0 - 0.0 + 0.0)) / 2
    assert float(BNStatKL()(step)) == pytest.approx(expected)


def test_stage1_student_starts_from_the_codes_kaiming_normal_or_pytorchs_defaults():
    from dfqbench.methods.dfqf import _fresh_copy
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 900, 10))
    for init, conv_std in (("kaiming_normal", (2 / 27) ** 0.5), ("pytorch", (1 / 81) ** 0.5)):
        torch.manual_seed(1)
        student = _fresh_copy(teacher, init)
        # kaiming_normal_: std sqrt(2 / fan_in); PyTorch's kaiming_uniform_(a=sqrt 5): bound 1/sqrt(fan_in), std
        # bound/sqrt(3); fan_in = 3 * 3 * 3
        assert float(student[0].weight.detach().std()) == pytest.approx(conv_std, rel=0.1)
        assert student.training and all(p.requires_grad for p in student.parameters())
        assert not torch.equal(student[0].weight, teacher[0].weight)
    with pytest.raises(ConfigError, match="method.stage1_student_init='xavier' is not valid; choose one of: "
                                          "kaiming_normal, pytorch"):
        build_method(compose_cfg("method=dfqf", "method.stage1_student_init=xavier"))


def test_dfqf_yaml_composes_two_stages():
    dfqf = build_method(compose_cfg("method=dfqf", "schedule=cpu"))
    assert [n for n, _ in dfqf.generator_terms] == ["class_balance", "bn_kl", "adversarial_kd"]
    assert dfqf.stage1_schedule.milestones == (4, 8) and dfqf.stage2_schedule.milestones == ()
    assert (dfqf.stage1_settings.student_lr, dfqf.stage1_settings.decay_generator) == (0.1, False)
    assert (dfqf.settings.student_lr, dfqf.settings.clip_lr_ratio, dfqf.settings.student_mode) == (1e-3, 0.1, "train")
    assert dfqf.convention_overrides == {"weight": {"symmetric": True}}


def test_dfqf_runs_both_stages_on_the_shared_teacher_and_reuses_stage1_across_bit_widths(tmp_path, cache_dir,
                                                                                       cifar10_root, teacher):
    args = ["method=dfqf", "quant=dfqf", "dataset.max_samples=200"]
    first = run(_real(cache_dir, cifar10_root, teacher, *args, "wbit=4", "abit=4"), tmp_path / "a")
    # measured on these 200 images (FP32 82.5) after the smoke schedule: W4A4 77.0, 77.5, 79.0 and W5A5 80.5, 81.0,
    # 80.5 at seeds 0, 1, 2; 5 points below the lowest (a clipped quantizer rounding with floor gives 9.5)
    assert first["status"] == "done" and 72.0 <= first["top1"] <= first["fp32_top1"]
    assert set(first["info"]["stage1"]["final_losses"]) == {"G", "S"}
    assert first["convention"]["weight"]["symmetric"] and first["convention"]["layers"]["first_wbit"] == 8
    second = run(_real(cache_dir, cifar10_root, teacher, *args, "wbit=5", "abit=5"), tmp_path / "b")
    assert second["info"]["stage1"] == {"cached": True} and 75.5 <= second["top1"] <= second["fp32_top1"]


def test_dfqf_under_a_convention_it_cannot_run_is_a_one_line_error(tmp_path, cifar10_root, teacher):
    proc = run_cli("method=dfqf", "quant=brecq", "schedule=smoke", f"model.checkpoint={teacher}",
                   f"dataset.root={cifar10_root}", f"paths.output_dir={tmp_path}")
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()[-1]
    assert "method=dfqf" in err and "quant.act.sites=after_relu, not 'layer_inputs'" in err
    assert not list(tmp_path.rglob("record.json"))


def test_dfqf_on_an_unseen_random_teacher(tmp_path, cache_dir, cifar10_root):
    cfg = compose_cfg("model=pytorchcv", "model.arch=preresnet20_cifar10", "model.pretrained=false",
                      f"dataset.root={cifar10_root}", "dataset.max_samples=100", f"paths.cache_dir={cache_dir}", *SMOKE,
                      "method=dfqf", "wbit=4", "abit=4", "schedule.batch_size=8")
    record = run(cfg, tmp_path)
    assert record["status"] == "done" and record["weights"] == "random"
    training = record["info"]["training"]  # a random teacher is at chance: check that the student trained
    assert (training["epochs"], training["iters_per_epoch"]) == (2, 2) and "S" in training["final_losses"]
    assert all(math.isfinite(v) for v in training["final_losses"].values())
    assert set(record["info"]["stage1"]["final_losses"]) == {"G", "S"}  # stage 1 trained its generator


def test_a_dfqf_run_killed_in_stage2_resumes_there_without_redoing_stage1(tmp_path, cache_dir, cifar10_root,
                                                                          teacher):
    args = ["method=dfqf", "quant=dfqf", "dataset.max_samples=200", "wbit=4", "abit=4", "seed=3"]
    with pytest.raises(KeyboardInterrupt, match="stopped after epoch 1"):
        run(_real(cache_dir, cifar10_root, teacher, *args, "method.stop_after_epoch=1"), tmp_path)
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "record.json").exists()
    record = run(_real(cache_dir, cifar10_root, teacher, *args), tmp_path)
    assert record["info"]["stage1"] == {"cached": True} and record["info"]["training"]["resumed_from_epoch"] == 1
