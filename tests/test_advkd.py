"""AdvKD (unofficial-code settings): its BN Gaussian KL against the closed form, its generator, the warm-up on
the same generator, its CPU-budget schedule entry, and the bad-input errors."""

import math

import pytest
import torch
from torch import nn

from conftest import compose_cfg
from dfqbench.method_overrides import apply_per_setting
from dfqbench.methods.qat import GeneratorQAT
from dfqbench.runner import build_method
from dfqbench.train.generators import GENERATORS
from dfqbench.train.losses import GENERATOR_LOSSES, STUDENT_LOSSES, Step
from dfqbench.train.schedule import Schedule
from dfqbench.train.trainer import Trainer, TrainSettings


def _step_with_stats(stats):
    return Step(torch.zeros(1), None, teacher_logits=torch.zeros(1, 2), bn_stats=lambda: stats)


def test_bn_gauss_kl_hand_values():
    # one layer, two channels: batch N(1, 4) and N(0, 1) against running N(0, 1) and N(0, 1)
    stats = [(torch.tensor([1.0, 0.0]), torch.tensor([4.0, 1.0]), torch.zeros(2), torch.ones(2))]
    term = GENERATOR_LOSSES["bn_gauss_kl"]()  # batch -> running, summed over channels (R5)
    # KL(N(1, 4) || N(0, 1)) = ((1 - 0)^2 + 4) / 2 - log(2 / 1) - 1/2; the second channel 0
    assert float(term(_step_with_stats(stats))) == pytest.approx(2.5 - math.log(2) - 0.5, abs=1e-6)
    mean = GENERATOR_LOSSES["bn_gauss_kl"](reduction="mean")(_step_with_stats(stats))
    assert float(mean) == pytest.approx((2.0 - math.log(2)) / 2, abs=1e-6)
    reverse = GENERATOR_LOSSES["bn_gauss_kl"](direction="running_to_batch")(_step_with_stats(stats))
    # KL(N(0, 1) || N(1, 4)) = log 2 + (1 + 1) / 8 - 1/2
    assert float(reverse) == pytest.approx(math.log(2) + 0.25 - 0.5, abs=1e-6)
    with pytest.raises(ValueError, match="direction='up' is not valid; choose one of: batch_to_running, "
                                         "running_to_batch"):
        GENERATOR_LOSSES["bn_gauss_kl"](direction="up")
    with pytest.raises(ValueError, match="reduction='max' is not valid; choose one of: sum, mean"):
        GENERATOR_LOSSES["bn_gauss_kl"](reduction="max")


def test_dcgan3_generator_shapes_and_its_errors():
    g = GENERATORS["dcgan3"](10, (3, 32, 32), latent_dim=16, ngf=4)
    out = g(g.sample(3, torch.Generator().manual_seed(0)))
    assert out.shape == (3, 3, 32, 32)
    assert [m.out_channels for m in g.modules() if isinstance(m, nn.Conv2d)] == [16, 8, 4, 3]
    with pytest.raises(ValueError, match="divisible by 8, not 28"):
        GENERATORS["dcgan3"](10, (3, 28, 28))


def test_warmup_losses_train_the_same_generator_during_the_warmup_only():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 3)).eval()
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 3)).eval()
    gen = GENERATORS["dcgan3"](3, (3, 8, 8), latent_dim=4, ngf=2)
    calls = []

    class Spy:
        needs_bn_stats, features, weight = False, frozenset(), 1.0

        def __init__(self, name):
            self.name = name

        def __call__(self, step):
            calls.append(self.name)
            return step.teacher_logits.pow(2).mean()

    schedule = Schedule(name="t", epochs=2, iters_per_epoch=1, batch_size=4, warmup_epochs=1, calib_epochs=1,
                        milestones=[])
    trainer = Trainer(teacher, student, gen, [("main", Spy("main"))], [("kd", STUDENT_LOSSES["kd"]())],
                      schedule, TrainSettings(), torch.device("cpu"), 0, warmup_terms=[("warm", Spy("warm"))])
    trainer.fit()
    assert calls == ["warm", "main"]  # epoch 0 (warm-up): the warm-up terms; epoch 1: the main ones


def test_advkd_yaml_builds_with_its_cpu_budget_entry():
    cfg = compose_cfg("method=advkd", "schedule=cpu")
    apply_per_setting(cfg)
    method = build_method(cfg)
    assert isinstance(method, GeneratorQAT) and method.fidelity == "unofficial-code"
    assert method.schedule.iters_per_epoch == 6 and method.settings.student_steps == 10
    assert [n for n, _ in method.warmup_terms] == ["bn_gauss_kl", "class_balance"]
    paper = compose_cfg("method=advkd", "schedule=paper")
    apply_per_setting(paper)
    assert build_method(paper).schedule.iters_per_epoch == 200  # the entry applies to the cpu schedule only


@pytest.mark.parametrize("batches,eval_in_g,expect", [
    # (generator forward modes, student mode seen by the generator loss, student batches drawn after the update)
    ("reuse", False, (["train", "train", "train"], "train", 2)),
    ("fresh_eval", True, (["train", "eval", "eval", "eval"], "eval", 3)),
])
def test_student_batches_and_student_mode_in_the_generator_step(batches, eval_in_g, expect):
    """R5's dfqad.py (AdvKD): student.eval() in the generator step; every student step on a fresh batch drawn
    after the generator's update with the generator in eval mode. GDFQ's default: the first student step reuses
    the generator step's batch (drawn in train mode), the others are fresh."""
    torch.manual_seed(0)

    def net():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 3))
    gen = GENERATORS["dcgan3"](3, (3, 8, 8), latent_dim=4, ngf=2)
    modes, student_modes = [], []
    gen.register_forward_pre_hook(lambda m, i: modes.append("train" if m.training else "eval"))

    class Spy:
        needs_bn_stats, features, weight = False, frozenset(), 1.0

        def __call__(self, step):
            return step.teacher_logits.pow(2).mean() + step.student_logits.pow(2).mean()

    schedule = Schedule(name="t", epochs=1, iters_per_epoch=1, batch_size=4, warmup_epochs=0, calib_epochs=0,
                        milestones=[])
    settings = TrainSettings(student_steps=3, student_mode="train", student_batches=batches,
                             student_eval_in_generator_step=eval_in_g)
    student = net()
    student.register_forward_pre_hook(lambda m, i: student_modes.append("train" if m.training else "eval"))
    trainer = Trainer(net().eval(), student, gen, [("main", Spy())], [("kd", STUDENT_LOSSES["kd"]())], schedule,
                      settings, torch.device("cpu"), 0)
    trainer.fit()
    assert (modes, student_modes[0], len(modes) - 1) == expect  # student_modes[0]: the generator step's forward
    assert student_modes[1:] == ["train"] * 3  # the student steps
    assert gen.training  # the generator is back in train mode after each fresh batch


def test_student_batches_bad_value_is_refused_with_the_choices():
    cfg = compose_cfg("method=advkd", "method.student_batches=again")
    with pytest.raises(ValueError, match=r"method.student_batches='again' is not valid; valid: \['reuse', 'fresh', "
                                         r"'fresh_eval'\]"):
        build_method(cfg)
    assert build_method(compose_cfg("method=dfed")).settings.student_batches == "fresh"
