"""The training family's deviations from its official code (issue 14), each pinned by a hand-computed value:
GDFQ's identity straight-through estimator, HAST's channel-attention feature loss on the residual branches and
its unaugmented CIFAR synthesis, IntraQ's crop of every fine-tuning image, ZAQ's learning rates and betas,
Qimera+AIT's classifier embeddings, AIT's capped first student epoch, DFQF's DCGAN initialization, and the
per-data-set settings (method.per_setting)."""

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import compose_cfg
from dfqbench.feature_taps import FeatureTap, residual_branch_points
from dfqbench.method_overrides import apply_per_setting
from dfqbench.errors import ConfigError
from dfqbench.quant import Convention, act_quantizers, quantize_model
from dfqbench.quant.quantizers import ActQuantizer, QuantConv2d, WeightQuantizer
from dfqbench.runner import build_convention, build_method
from dfqbench.synth.augment import crop_flip
from dfqbench.train.generators import FixedSet
from dfqbench.train.generators.base import UnconditionalGenerator
from dfqbench.train.inundation import FIRST_EPOCH_CAP, GradientInundation, integer_codes, sgd_step
from dfqbench.train.losses import ChannelAttentionMSE, Step, channel_attention
from dfqbench.train.schedule import Schedule
from dfqbench.train.trainer import Trainer
from test_wrap import tiny_model


# ---------------------------------------------------------------------------------------------- STE
@pytest.mark.parametrize("ste,grad", [("clipped", [0.0, 1.0, 0.0]), ("identity", [1.0, 1.0, 1.0])])
def test_activation_ste_clipped_zeroes_gradients_outside_the_range_identity_passes_them(ste, grad):
    q = ActQuantizer(4, ste=ste)
    q.set_range(0.0, 1.5)  # 4-bit asymmetric: step 0.1
    x = torch.tensor([-0.5, 0.42, 2.0], requires_grad=True)
    y = q(x)
    assert y.detach().tolist() == pytest.approx([0.0, 0.4, 1.5])  # the same forward either way
    y.sum().backward()
    assert x.grad.tolist() == grad


@pytest.mark.parametrize("method", ["gdfq", "qimera", "ait", "qimera_ait", "adasg", "intraq", "hast", "zaq"])
def test_the_gdfq_lineage_trains_with_the_identity_ste_and_the_presets_keep_the_clipped_one(method):
    cfg = compose_cfg(f"method={method}", "quant=gdfq")
    conv = build_convention(cfg, build_method(cfg))
    assert conv.act.ste == "identity"
    assert {q.ste for q in act_quantizers(quantize_model(tiny_model(), conv, 4, 4))} == {"identity"}
    for quant in ("gdfq", "brecq"):  # post-training methods: the presets' default
        cfg = compose_cfg("method=zeroq", f"quant={quant}")
        assert build_convention(cfg, build_method(cfg)).act.ste == "clipped"
    with pytest.raises(ValueError, match="quant.act.ste='nope'.*clipped, identity"):
        Convention.from_dict({"name": "x", "act": {"ste": "nope"}})


# ---------------------------------------------------------------------------------------------- HAST
def test_channel_attention_is_the_normalized_mean_square_per_channel():
    f = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]]])  # [1, 2, 1, 2]: mean squares 5 and 2
    assert channel_attention(f).tolist()[0] == pytest.approx([5 / 29 ** 0.5, 2 / 29 ** 0.5])


def test_hast_feature_loss_sums_the_attention_mse_over_the_residual_branches():
    t1, s1 = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]]]), torch.tensor([[[[1.0]], [[1.0]]]])
    t2, s2 = torch.ones(1, 2, 1, 1), torch.ones(1, 2, 1, 1)
    a = torch.tensor([5 / 29 ** 0.5, 2 / 29 ** 0.5])
    b = torch.tensor([2 ** -0.5, 2 ** -0.5])
    expected = float(((a - b) ** 2).mean())  # + 0 for the equal second branch
    step = Step(torch.zeros(1), None, teacher_logits=torch.zeros(1, 3), student=lambda x: torch.zeros(1, 3),
                teacher_features={"residual_branches": [t1, t2]})
    step._taps = (None, SimpleNamespace(value={"residual_branches": [s1, s2]}))
    assert float(ChannelAttentionMSE()(step)) == pytest.approx(expected)


def _pytorchcv_resnet20():
    from pytorchcv.model_provider import get_model
    torch.manual_seed(0)
    return get_model("resnet20_cifar10", pretrained=False).eval()


def test_residual_branches_are_the_nine_unit_bodies_on_the_teacher_and_the_traced_student():
    teacher = _pytorchcv_resnet20()
    points = residual_branch_points(teacher)
    units = [m for m in teacher.modules() if type(m).__name__ == "ResUnit"]
    assert len(points) == len(units) == 9 and all(p is u.body for p, u in zip(points, units))
    conv = Convention.from_dict(OmegaConf.to_container(compose_cfg("quant=gdfq").quant, resolve=True))
    student = quantize_model(teacher, conv, 32, 32)  # a float "student": its branches equal the teacher's
    taps = FeatureTap(teacher, {"residual_branches"}), FeatureTap(student, {"residual_branches"})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        teacher(x), student(x)
    t, s = taps[0].value["residual_branches"], taps[1].value["residual_branches"]
    assert len(t) == len(s) == 9 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(t, s))
    assert t[0].shape == (2, 16, 32, 32) and t[-1].shape == (2, 64, 8, 8)  # before the final ReLU: negatives
    assert float(t[0].min()) < 0


def test_hast_yaml_aligns_attention_and_synthesizes_without_augmentation_on_cifar():
    hast = build_method(compose_cfg("method=hast"))
    assert [n for n, _ in hast.student_terms] == ["kd", "attention_mse"]
    assert dict(hast.student_terms)["attention_mse"].weight == 1000.0
    assert hast.generator_spec["source_settings"]["augment_prob"] == 0.0


def _linear(w):
    m = nn.Linear(2, 2, bias=False)
    m.weight.data = torch.tensor(w)
    return m


@pytest.mark.parametrize("through_teacher", [True, False])
def test_hast_perturbation_direction_goes_through_the_teacher_only_when_asked(through_teacher):
    # teacher T(x) = A x, student S(x) = B x, the `l1` term mean|S(x) - T(x)| over 2 logits of 1 sample:
    # grad_x = (B - A)^T sign(Bx - Ax) / 2 through both networks (HAST's code), B^T sign(Bx - Ax) / 2 through the
    # student only
    from dfqbench.train.losses import LogitL1
    a, b = [[1.0, 2.0], [0.0, 1.0]], [[3.0, 0.0], [1.0, 1.0]]
    teacher, student = _linear(a), _linear(b)
    for p in teacher.parameters():
        p.requires_grad_(False)
    x = torch.tensor([[1.0, -1.0]], requires_grad=True)  # Bx - Ax = [3, 0] - [-1, -1] = [4, 1]: signs [1, 1]
    step = Step(x, None, teacher=teacher, student=student, teacher_grad=through_teacher)
    grad, = torch.autograd.grad(LogitL1()(step), x)
    expected = [(3 - 1 + 1 - 0) / 2, (0 - 2 + 1 - 1) / 2] if through_teacher else [(3 + 1) / 2, (0 + 1) / 2]
    assert grad[0].tolist() == pytest.approx(expected)
    # the student's parameter gradient is the same either way: the teacher's outputs do not depend on it
    student.zero_grad()
    LogitL1()(Step(x, None, teacher=teacher, student=student, teacher_grad=through_teacher)).backward()
    assert student.weight.grad.flatten().tolist() == pytest.approx([0.5, -0.5, 0.5, -0.5])


def test_hast_yaml_takes_the_perturbation_through_the_teacher_and_a_bad_value_is_refused():
    assert build_method(compose_cfg("method=hast")).settings.perturb_through_teacher is True
    assert build_method(compose_cfg("method=intraq")).settings.perturb_through_teacher is False
    with pytest.raises(ValueError, match=r"method.perturb_through_teacher='yes' is not valid; valid: \[True, False\]"):
        build_method(compose_cfg("method=hast", "method.perturb_through_teacher=yes"))


# ---------------------------------------------------------------------------------------------- IntraQ
def test_fixed_set_crops_every_image_and_flips_half_by_default():
    fixed = FixedSet(3, (1, 8, 8), source="uniform_noise")
    assert (fixed.crop_prob, fixed.flip_prob) == (1.0, 0.5)
    x = torch.arange(64.0).reshape(1, 1, 8, 8).repeat(200, 1, 1, 1)
    rng = torch.Generator().manual_seed(0)
    # a crop of exactly half the area never returns the image or its mirror
    out = crop_flip(x, rng, scale=(0.5, 0.5), ratio=(1.0, 1.0), prob=1.0, flip_prob=0.0)
    assert all(not torch.allclose(o, x[0], atol=1e-3) and not torch.allclose(o, x[0].flip(-1), atol=1e-3) for o in out)
    mirrored = crop_flip(x, rng, scale=(1.0, 1.0), ratio=(1.0, 1.0), prob=1.0, flip_prob=0.5)
    flips = sum(bool(torch.allclose(o, x[0].flip(-1), atol=1e-4)) for o in mirrored)
    assert 70 <= flips <= 130  # Binomial(200, 0.5): 100 +- 30 is > 4 sigma


def test_crop_boxes_are_redrawn_as_torchvisions_not_clamped():
    """crop_boxes draws torchvision's RandomResizedCrop box (up to 10 draws, the first that fits); clamping each
    side to the image instead (dfqbench before 2026-12-06) favours larger crops. Mean area fraction at IntraQ's
    scale (0.5, 1), default ratios: torchvision's get_params on a large image against the continuous boxes."""
    import math

    from torchvision.transforms import RandomResizedCrop

    from dfqbench.synth.augment import crop_boxes

    w, h = crop_boxes(200_000, torch.Generator().manual_seed(0), (0.5, 1.0), (3 / 4, 4 / 3))
    assert bool(((w <= 1) & (h <= 1)).all())
    torch.manual_seed(0)
    img = torch.empty(1, 1000, 1000)
    tv = [RandomResizedCrop.get_params(img, [0.5, 1.0], [3 / 4, 4 / 3]) for _ in range(20_000)]
    tv_area = sum(hh * ww for _, _, hh, ww in tv) / len(tv) / 1e6
    g = torch.Generator().manual_seed(1)
    area = torch.empty(200_000).uniform_(0.5, 1.0, generator=g)
    aspect = torch.exp(torch.empty(200_000).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g))
    clamped = float((torch.sqrt(area * aspect).clamp(max=1) * torch.sqrt(area / aspect).clamp(max=1)).mean())
    assert abs(float((w * h).mean()) - tv_area) < 0.01 and clamped - tv_area > 0.03


def test_labelled_synthesis_crops_and_flips_every_image_on_an_augmented_step():
    """IntraQ's distill_data.py: on an augmented step (a coin per step) every image is RandomResizedCrop'd, then
    flipped with p 0.5 (before 2026-12-06 dfqbench cropped each image with p 0.5 only)."""
    from dfqbench.synth.labelled import LabelledSettings, _LabelledBatch

    x = torch.arange(64.0).reshape(1, 1, 8, 8).repeat(200, 1, 1, 1)
    settings = LabelledSettings(augment_prob=1.0, crop_scale=(0.5, 0.5)).validate()
    batch = _LabelledBatch(x.clone(), torch.zeros(200, dtype=torch.long), torch.ones(200), None, settings,
                           torch.Generator().manual_seed(0))
    out = batch.images()
    assert all(not torch.allclose(o, x[0], atol=1e-3) and not torch.allclose(o, x[0].flip(-1), atol=1e-3)
               for o in out)
    settings = LabelledSettings(augment_prob=1.0, crop_scale=(1.0, 1.0)).validate()
    batch = _LabelledBatch(x.clone(), torch.zeros(200, dtype=torch.long), torch.ones(200), None, settings,
                           torch.Generator().manual_seed(0))
    flips = sum(bool(torch.allclose(o, x[0].flip(-1), atol=1e-4)) for o in batch.images())
    assert 70 <= flips <= 130
    with pytest.raises(ValueError, match=r"crop_scale=\[0.0, 1.0\] must be \[low, high\] with 0 < low <= high <= 1"):
        LabelledSettings(crop_scale=[0.0, 1.0]).validate()


def test_intraq_yaml_crops_every_fine_tuning_image():
    intraq = build_method(compose_cfg("method=intraq"))
    assert (intraq.generator_spec["crop_prob"], intraq.generator_spec["flip_prob"]) == (1.0, 0.5)


# ---------------------------------------------------------------------------------------------- ZAQ, Qimera+AIT
def test_zaq_trains_at_its_codes_learning_rates_and_default_adam_betas():
    zaq = build_method(compose_cfg("method=zaq"))
    assert zaq.settings.student_lr == 0.1 and zaq.settings.generator_lr == 1e-3
    assert tuple(zaq.settings.generator_betas) == (0.9, 0.999) and not zaq.settings.nesterov


def test_qimera_ait_starts_its_embeddings_from_the_classifier_and_plain_qimera_at_random():
    assert build_method(compose_cfg("method=qimera_ait")).generator_spec["embedding_init"] == "teacher_fc"
    assert build_method(compose_cfg("method=qimera")).generator_spec["embedding_init"] == "random"


# ---------------------------------------------------------------------------------------------- AIT
def _one_code_needs(a_needed: float):
    """A 1 x 16 weight 0..15 (4-bit per-channel min/max: step 1) whose element 7 must move by 0.5 to change code:
    a step of 0.5 / a_needed there changes exactly 1/16 of the codes at a >= a_needed."""
    w0 = torch.arange(16.0).reshape(1, 16)
    delta = torch.zeros_like(w0)
    delta[0, 7] = 0.5 / a_needed
    return w0, delta


def test_inundation_bisects_to_the_last_midpoint_as_aits_sgd_adalr():
    wq, (w0, delta) = WeightQuantizer(4, per_channel=True), _one_code_needs(500.0)
    gi = GradientInundation(nn.Module(), threshold=1 / 16, bisection_steps=5)
    # doubling: 512 reaches it; bisection of [256, 512]: 384, 448, 480, 496 fall short, 504 reaches it (stop)
    assert gi.scale_for(w0, delta, wq) == 504.0
    # two steps end on a midpoint that falls short (448), which AIT's code returns (not the bracket's 512)
    assert GradientInundation(nn.Module(), threshold=1 / 16, bisection_steps=2).scale_for(w0, delta, wq) == 448.0


def test_inundation_is_capped_at_128_in_the_first_student_epoch():
    wq, (w0, delta) = WeightQuantizer(4, per_channel=True), _one_code_needs(500.0)
    gi = GradientInundation(nn.Module(), threshold=1 / 16, bisection_steps=5)
    gi.cap = FIRST_EPOCH_CAP
    # doubling stops at 128 (> 100) without reaching it; bisection of [64, 128] climbs to the last midpoint, 126
    assert gi.scale_for(w0, delta, wq) == 126.0


@pytest.mark.parametrize("nesterov,weight_decay", [(True, 0.0), (False, 1e-2), (True, 1e-2)])
def test_inundation_rebuilds_sgds_step_by_hand(nesterov, weight_decay):
    lr, m = 0.5, 0.9
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([p], lr=lr, momentum=m, nesterov=nesterov, weight_decay=weight_decay)
    buf = None
    for g in (torch.tensor([0.25, 1.0]), torch.tensor([-0.5, 0.75])):
        w0 = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        d = g + weight_decay * w0
        buf = d if buf is None else m * buf + d
        want = -lr * (d + m * buf if nesterov else buf)
        assert torch.allclose(sgd_step(opt, p, w0), want, rtol=0, atol=1e-7)
        assert torch.allclose(p.detach(), w0 + want, rtol=0, atol=1e-6)


def test_inundation_scales_a_step_below_float32_resolution():
    """A weight near 0.19 moves in float32 steps of 1.5e-8: SGD's step of 1e-9 leaves the stored weights
    unchanged, so w_new - w_old is 0 and no scale could help. The rebuilt step (AIT's lr * g_t) is scaled instead
    until 1/16 of the codes move: element 7 of 0.4 * [0, 1/15, ..., 1] (4 bits, grid step 0.4/15) must move by
    half a step, a >= 0.4 / 30 / 1e-9 = 1.33e7; doubling reaches 2^24, bisection stops at its first midpoint that
    moves it."""
    layer = QuantConv2d.from_float(nn.Conv2d(1, 1, (1, 16), bias=False), WeightQuantizer(4, per_channel=True))
    with torch.no_grad():
        layer.weight.copy_((torch.arange(16.0) / 15 * 0.4).reshape(1, 1, 1, 16))
    w0 = layer.weight.detach().clone()
    opt = torch.optim.SGD([layer.weight], lr=1e-9, momentum=0.0)
    layer.weight.grad = torch.zeros_like(w0)
    layer.weight.grad[..., 7] = -1.0
    gi = GradientInundation(layer, threshold=1 / 16, bisection_steps=5)
    before = gi.snapshot()
    opt.step()
    assert torch.equal(layer.weight.detach(), w0)  # the plain step is lost in the stored weights
    gi.apply(before, opt)
    (scale,) = gi.last_scales
    codes = integer_codes(layer.weight.detach(), layer.weight_quantizer)
    assert (codes != integer_codes(w0, layer.weight_quantizer)).sum() == 1
    assert 0.4 / 30 / 1e-9 <= scale <= 2 ** 24
    assert layer.weight[..., 7].item() == pytest.approx(w0[..., 7].item() + scale * 1e-9, abs=1e-7)


def test_the_trainer_caps_inundation_up_to_the_first_student_epoch_only():
    sched = Schedule.from_dict({"name": "t", "epochs": 6, "iters_per_epoch": 1, "batch_size": 2,
                                "warmup_epochs": 2, "calib_epochs": 2, "milestones": [5]})
    gi = SimpleNamespace(threshold=None, cap=None)
    fake = SimpleNamespace(schedule=sched, settings=SimpleNamespace(lr_decay=0.1, student_lr=1e-4,
                                                                    decay_generator=True, generator_lr=1e-3,
                                                                    inundation_threshold=1e-3),
                           opt_s=SimpleNamespace(param_groups=[]), opt_g=None, opt_wg=None, gi=gi)
    caps = []
    for epoch in range(6):
        Trainer._set_rates(fake, epoch)
        caps.append(gi.cap)
    assert caps == [100.0] * 3 + [None] * 3 and gi.threshold == pytest.approx(1e-4)


# ---------------------------------------------------------------------------------------------- DFQF
def test_dcgan_init_draws_bn_weights_around_one_and_zeroes_their_biases():
    torch.manual_seed(0)
    g = UnconditionalGenerator(10, (3, 32, 32), latent_dim=16, init="dcgan")
    bns = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d) and m.weight is not None]
    w = torch.cat([m.weight.detach() for m in bns])
    assert abs(float(w.mean()) - 1.0) < 0.01 and 0.015 < float(w.std()) < 0.025
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in bns)
    convs = torch.cat([m.weight.detach().flatten() for m in g.modules() if isinstance(m, nn.Conv2d)])
    assert 0.019 < float(convs.std()) < 0.021
    plain = UnconditionalGenerator(10, (3, 32, 32), latent_dim=16)
    assert all(bool((m.weight == 1).all()) for m in plain.modules() if isinstance(m, nn.BatchNorm2d)
               and m.weight is not None)
    assert build_method(compose_cfg("method=dfqf")).generator_spec["init"] == "dcgan"


# ---------------------------------------------------------------------------------------------- per_setting
def _applied(*overrides):
    cfg = compose_cfg(*overrides)
    names = apply_per_setting(cfg, list(overrides))
    return cfg.method, names


def test_per_setting_applies_the_cifar100_settings_and_the_command_line_wins():
    c100 = ("model=resnet20_cifar100", "dataset=cifar100")
    m, names = _applied("method=qimera", *c100, "wbit=4", "abit=4")
    assert names == ["cifar100"] and m.generator.mix_classes == 10 and m.generator.embedding_init == "teacher_fc"
    assert "per_setting" not in m
    m, names = _applied("method=qimera", *c100, "wbit=5", "abit=5")
    assert names == ["cifar100", "cifar100_w5"] and m.generator.mix_classes == 50
    m, _ = _applied("method=qimera", *c100, "method.generator.mix_classes=3")
    assert m.generator.mix_classes == 3 and m.generator.embedding_init == "teacher_fc"
    m, names = _applied("method=qimera")  # CIFAR-10: the yaml's own K = 2
    assert names == [] and m.generator.mix_classes == 2
    m, _ = _applied("method=hast", *c100)
    assert m.student_losses.attention_mse.weight == 2000.0 and m.perturb_epsilon == 0.02
    m, _ = _applied("method=gdfq", "model=resnet18", "dataset=imagenet")
    assert m.student_optim.lr == 1e-6
    m, _ = _applied("method=ait", "model=resnet18", "dataset=imagenet")
    assert m.student_optim.lr == 1e-4  # AIT's --lrs 0.0001 replaces GDFQ's ImageNet entry
    assert _applied("method=zeroq", "model=resnet18", "dataset=imagenet")[0].batch_size == 64  # ZeroQ's run.sh
    assert _applied("method=zeroq")[0].batch_size == 32  # uniform_test.py's default (the CIFAR parity runs)


IMAGENET = ("dataset=imagenet", "schedule=paper_imagenet")


@pytest.mark.parametrize("method,model,wbit,milestones,warmup,temperature,lr,lower,disagree", [
    ("adasg", "resnet18", 4, [350, 400], 50, 5, 1e-5, 0.3, 0.1),       # imagenet_res18.hocon, trainer.py T = 5
    ("adasg", "resnet50", 3, [200, 300, 400], 100, 5, 1e-4, 0.3, 0.1),  # imagenet_res50.hocon (W3 warm-up 100)
    ("adasg", "resnet50", 4, [200, 300, 400], 50, 5, 1e-4, 0.3, 0.1),   # "50 for 4/5 bit"
    ("adadfq", "resnet50", 3, [150, 300, 400], 100, 5, 1e-4, 0.4, 0.2),  # AdaDFQ's shipped res50 hocon
    ("adadfq", "resnet50", 4, [200, 300, 400], 50, 5, 1e-4, 0.3, 0.1),   # its comments' 4-bit values
    ("adadfq", "resnet50", 5, [350, 400], 50, 5, 1e-4, 0.3, 0.2),
    ("adadfq", "resnet18", 5, [350, 400], 50, 5, 1e-5, 0.3, 0.3),
    ("adadfq", "mobilenetv2_w1", 4, [350, 400], 50, 5, 1e-5, 0.1, 0.3),
])
def test_adasg_and_adadfq_take_their_codes_imagenet_settings(method, model, wbit, milestones, warmup, temperature,
                                                              lr, lower, disagree):
    m, _ = _applied(f"method={method}", f"model={model}", *IMAGENET, f"wbit={wbit}", f"abit={wbit}")
    q = build_method(compose_cfg(f"method={method}", f"model={model}", *IMAGENET, f"wbit={wbit}", f"abit={wbit}"))
    assert list(q.schedule.milestones) == milestones and q.schedule.warmup_epochs == warmup
    assert m.student_losses.difference_entropy.temperature == temperature and m.student_optim.lr == lr
    losses = m.generator_losses
    assert losses.adaptability_margin.lower == lower and losses.disagreement_ce.weight == disagree
    for schedule in ("paper_adasg", "paper"):  # the CIFAR hocons' batch 16 under either name
        cifar = build_method(compose_cfg(f"method={method}", f"schedule={schedule}"))
        assert list(cifar.schedule.milestones) == [100, 200, 300] and cifar.schedule.batch_size == 16


@pytest.mark.parametrize("method,batch", [("intraq", 16), ("hast", 4)])
def test_intraq_and_hast_run_their_codes_imagenet_schedule(method, batch):
    q = build_method(compose_cfg(f"method={method}", "model=resnet18", *IMAGENET))
    s = q.schedule
    assert (s.epochs, s.batch_size, s.warmup_epochs, s.calib_epochs, list(s.milestones)) == (
        151, batch, 4, 4, [100, 200, 350])
    m, _ = _applied("method=hast", "model=resnet18", "dataset=imagenet")
    assert list(m.generator.source_settings.crop_scale) == [0.4, 1.0]  # HAST's augMargin default (never passed)


def test_ait_and_qimera_ait_inundate_at_their_codes_imagenet_threshold_and_qimera_mixes_100_at_5_bits():
    for method in ("ait", "qimera_ait"):
        assert _applied(f"method={method}", "model=resnet18", "dataset=imagenet")[0].inundation.threshold == 1e-4
        assert _applied(f"method={method}")[0].inundation.threshold == 1e-3
    assert _applied("method=arc_ait", "model=resnet18", "dataset=imagenet")[0].inundation.threshold == 1e-3
    for model, k4, k5 in (("resnet18", 500, 100), ("resnet50", 500, 100), ("mobilenetv2_w1", 100, 100)):
        for wbit, k in ((4, k4), (5, k5)):
            m, _ = _applied("method=qimera", f"model={model}", "dataset=imagenet", f"wbit={wbit}", f"abit={wbit}")
            assert m.generator.mix_classes == k, (model, wbit)
    m, _ = _applied("method=qimera_ait", "model=resnet18", "dataset=imagenet", "wbit=5", "abit=5")
    assert m.generator.mix_classes == 250  # Qimera_AIT's only (4-bit) script


def test_a_1x1_conv_classifier_gives_the_generators_latent_width_and_embeddings():
    from pytorchcv.model_provider import get_model

    from dfqbench.methods.qat import _classifier_weight
    from dfqbench.train.generators.base import SuperposedGenerator

    mbv2 = get_model("mobilenetv2_w1", pretrained=False)  # ends in a 1x1 conv (1280 -> 1000), no nn.Linear
    w = _classifier_weight(mbv2)
    assert tuple(w.shape) == (1000, 1280) and torch.equal(w, mbv2.output.weight.flatten(1))
    g = SuperposedGenerator(1000, (3, 32, 32), teacher_fc=w, latent_dim=None, embedding_init="teacher_fc")
    assert g.latent_dim == 1280 and torch.equal(g.embedding.weight, w)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Flatten(), nn.Linear(8, 4))
    assert torch.equal(_classifier_weight(net), net[2].weight)  # a Linear after the last conv is the classifier


def test_zaq_and_dfqf_run_their_codes_own_budgets_under_schedule_paper():
    zaq = build_method(compose_cfg("method=zaq", "schedule=paper")).schedule  # main.py's defaults
    assert (zaq.epochs, zaq.iters_per_epoch, zaq.batch_size, list(zaq.milestones), zaq.warmup_epochs,
            zaq.calib_epochs) == (300, 60, 256, [100, 200], 0, 300)
    dfqf = build_method(compose_cfg("method=dfqf", "schedule=paper"))
    s1, s2 = dfqf.stage1_schedule, dfqf.stage2_schedule  # dfkd.py, then dfqf.py over the 391-batch train loader
    assert (s1.epochs, s1.iters_per_epoch, s1.batch_size, list(s1.milestones)) == (200, 120, 512, [80, 160])
    assert (s2.epochs, s2.iters_per_epoch, s2.batch_size, list(s2.milestones)) == (40, 391, 128, [])
    cpu = build_method(compose_cfg("method=dfqf"))  # the cpu schedule: one budget for both stages, as before
    assert cpu.stage1_schedule.epochs == cpu.stage2_schedule.epochs == 10 and list(cpu.stage1_schedule.milestones) == [
        4, 8]
    with pytest.raises(ValueError, match=r"method.stage1_schedule_overrides has unknown setting\(s\) \['epoch'\]"):
        build_method(compose_cfg("method=dfqf", "+method.stage1_schedule_overrides.epoch=3"))


@pytest.mark.parametrize("method", ["psaqvit", "psaqvit2"])
def test_psaqvit_takes_the_codes_224_px_settings_on_imagenet_and_swins_lr(method):
    m, _ = _applied(f"method={method}", "model=swin_tiny", "dataset=imagenet")
    assert (m.lr, list(m.jitter), list(m.tv_target)) == (0.25, [15, 30], [2500.0, 3000.0])
    m, _ = _applied(f"method={method}", "model=deit_small", "dataset=imagenet")
    assert (m.lr, list(m.jitter), list(m.tv_target)) == (0.2, [15, 30], [2500.0, 3000.0])
    m, _ = _applied(f"method={method}", "model=vit_cifar10")  # 32 px: the scaled values
    assert (m.lr, list(m.jitter), list(m.tv_target)) == (0.2, [2, 4], [357.0, 429.0])
    assert m.source.fidelity == ("reproduction" if method == "psaqvit" else "reconstruction")


def test_per_setting_refuses_an_unknown_condition_in_one_line():
    cfg = compose_cfg("method=gdfq")
    cfg.method.per_setting = {"x": {"when": {"datset": "cifar100"}, "set": {"lr_decay": 0.5}}}
    with pytest.raises(ConfigError, match=r"method.per_setting.x.when: unknown key\(s\) \['datset'\]; valid:"):
        apply_per_setting(cfg)
