"""ZAQ's own training frame: running min/max activation ranges, a train-mode student, the method's schedule fields."""

import pytest
import torch
from torch import nn

from conftest import compose_cfg
from dfqbench.methods.qat import GeneratorQAT
from dfqbench.quant import ActQuantizer
from dfqbench.runner import build_method, run
from dfqbench.train.ema import EMARangeObserver


def test_running_minmax_keeps_the_widest_range_seen_and_freezes_on_close():
    q = ActQuantizer(4)
    observer = EMARangeObserver(nn.Sequential(q), mode="running_minmax")
    for lo, hi in ((-1.0, 2.0), (-0.5, 5.0), (-3.0, 1.0)):
        q(torch.tensor([lo, 0.0, hi]))
    assert (q.lo.item(), q.hi.item()) == (-3.0, 5.0)
    observer.close()
    q(torch.tensor([-10.0, 10.0]))
    assert (q.lo.item(), q.hi.item()) == (-3.0, 5.0)


def test_running_minmax_per_channel():
    q = ActQuantizer(4, per_channel=True)
    EMARangeObserver(nn.Sequential(q), mode="running_minmax")
    q(torch.tensor([[[0.0, 1.0]], [[-2.0, 0.5]]]).reshape(1, 2, 2))  # channel 0: [0, 1], channel 1: [-2, 0.5]
    q(torch.tensor([[[0.5, 3.0]], [[-1.0, 0.0]]]).reshape(1, 2, 2))
    assert q.lo.tolist() == [0.0, -2.0] and q.hi.tolist() == [3.0, 0.5]


@pytest.mark.parametrize("override,needle", [
    ({"student_mode": "training"}, "method.student_mode='training' is not valid; valid: ['eval', 'train']"),
    ({"range_tracking": "minmax"}, "method.range_tracking='minmax' is not valid; valid: ['ema', 'running_minmax']"),
    ({"schedule_overrides": {"warmup": 0}}, "method.schedule_overrides has unknown setting(s) ['warmup']"),
    ({"schedule_overrides": {"calib_epochs": 9}}, "schedule.calib_epochs=9 exceeds schedule.epochs=2"),
])
def test_bad_frame_settings_are_one_line_value_errors(override, needle):
    settings = dict(schedule={"name": "smoke", "epochs": 2, "iters_per_epoch": 2, "batch_size": 4},
                    generator_losses={"ce": {"weight": 1}}, student_losses={"kd": {}}, **override)
    with pytest.raises(ValueError) as err:
        GeneratorQAT(**settings)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_zaq_yaml_runs_in_zaqs_frame_and_gdfq_keeps_its_own():
    zaq = build_method(compose_cfg("method=zaq", "schedule=cpu"))
    assert (zaq.settings.student_mode, zaq.settings.range_tracking) == ("train", "running_minmax")
    assert (zaq.schedule.warmup_epochs, zaq.schedule.calib_epochs) == (0, zaq.schedule.epochs) == (0, 10)
    assert zaq.generator_spec["bn_eps"] == 1e-5 and zaq.settings.student_steps == 5
    gdfq = build_method(compose_cfg("method=gdfq", "schedule=cpu"))
    assert (gdfq.settings.student_mode, gdfq.settings.range_tracking) == ("eval", "ema")
    assert (gdfq.schedule.warmup_epochs, gdfq.schedule.calib_epochs) == (4, 4)


def _bn_running_means(model):
    return {n: m.running_mean.clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_train_mode_student_updates_its_bn_statistics_and_ends_in_eval_mode(tmp_path, cache_dir, cifar10_root,
                                                                             teacher, mode, monkeypatch):
    seen = {}
    original = GeneratorQAT.quantize

    def spy(self, model, ctx):
        before = _bn_running_means(model)
        student = original(self, model, ctx)
        seen.update(before=before, after=_bn_running_means(student), training=student.training)
        return student

    monkeypatch.setattr(GeneratorQAT, "quantize", spy)
    cfg = compose_cfg(f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}", "dataset.max_samples=100",
                      f"paths.cache_dir={cache_dir}", "schedule=smoke", "threads=1", "method=zaq", "wbit=4", "abit=4",
                      f"method.student_mode={mode}", "method.student_optim.lr=1e-3")  # 0.1 diverges in eval mode
    record = run(cfg, tmp_path)
    assert record["status"] == "done" and record["info"]["schedule_overrides"] == {"warmup_epochs": 0,
                                                                                 "calib_epochs": 2}
    assert seen["before"].keys() == seen["after"].keys()
    moved = any(not torch.equal(seen["before"][n], seen["after"][n]) for n in seen["before"])
    assert moved == (mode == "train") and seen["training"] is False
