"""The generator-QAT trainer (GDFQ, Qimera, AIT): its parts on hand-made tensors, then smoke-schedule runs."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import compose_cfg, run_cli
from dfqbench.methods.qat import GeneratorQAT
from dfqbench.quant import ActQuantizer, WeightQuantizer
from dfqbench.runner import build_method, import_all_methods, run
from dfqbench.train.ema import EMARangeObserver
from dfqbench.train.generators import ConditionalGenerator, SuperposedGenerator, UnconditionalGenerator
from dfqbench.train.inundation import GradientInundation, integer_codes
from dfqbench.train.losses import BNStatLoss, DistillationKL, Step, StudentCE
from dfqbench.train.schedule import Schedule
from dfqbench.train.trainer import BNRecorder, TrainSettings

SMOKE = ["schedule=smoke", "threads=1", "progress=false"]


def _real(cache_dir, cifar10_root, teacher, *overrides):
    return compose_cfg(f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}", "dataset.max_samples=500",
                       f"paths.cache_dir={cache_dir}", *SMOKE, *overrides)


# ---------------------------------------------------------------------------------------------- losses
def test_kd_is_kl_of_tempered_softmaxes_times_t_squared():
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    q1 = math.e / (math.e + 1)  # softmax([2, 0] / 2)
    kl = q1 * math.log(q1 / 0.5) + (1 - q1) * math.log((1 - q1) / 0.5)  # student: [0.5, 0.5]
    step = Step(student, None, teacher_logits=teacher)
    step._student_logits = student
    assert DistillationKL(temperature=2, reduction="batchmean")(step).item() == pytest.approx(kl * 4, rel=1e-6)
    # GDFQ's KLDivLoss() default: also averaged over the 2 classes
    assert DistillationKL(temperature=2, reduction="mean")(step).item() == pytest.approx(kl * 4 / 2, rel=1e-6)
    with pytest.raises(ValueError, match="reduction='sum'.*mean, batchmean"):
        DistillationKL(reduction="sum")


def test_cross_entropy_takes_superposed_soft_labels():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    step = Step(logits, torch.tensor([[0.0, 1.0, 0.0], [0.25, 0.0, 0.75]]))
    step._student_logits = logits
    logp = F.log_softmax(logits, dim=1)
    expected = -(logp[0, 1] + 0.25 * logp[1, 0] + 0.75 * logp[1, 2]) / 2
    assert StudentCE()(step).item() == pytest.approx(expected.item(), rel=1e-6)


def _bn_net(x):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        h = net[0](x)
        net[1].running_mean.copy_(h.mean((0, 2, 3)))
        net[1].running_var.copy_(h.var((0, 2, 3), unbiased=False))
    return net


def test_bn_statistics_loss_is_zero_when_the_batch_matches_the_running_stats():
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    net = _bn_net(x)
    recorder = BNRecorder(net)
    step = Step(x, None, teacher=lambda images: recorder.run(net, images), bn_stats=lambda: recorder.stats)
    assert BNStatLoss()(step).item() == pytest.approx(0.0, abs=1e-10)
    net[1].running_mean.add_(1.0)  # every channel mean off by 1: MSE(mean) = 1, variance still exact
    step = Step(x, None, teacher=lambda images: recorder.run(net, images), bn_stats=lambda: recorder.stats)
    assert BNStatLoss()(step).item() == pytest.approx(1.0, rel=1e-5)


# ---------------------------------------------------------------------------------------------- EMA ranges
def test_ema_range_is_bias_corrected_and_quantizes_with_the_updated_range():
    q = ActQuantizer(4)
    observer = EMARangeObserver(nn.Sequential(q), beta=0.9)
    ramp = torch.linspace(0, 1, 16)
    for scale in (1.0, 2.0, 4.0):
        out = q(ramp * scale)
    # raw EMA of the max: 0.1, 0.29, 0.661; corrected by 1 - 0.9^t: 0.1, 0.19, 0.271
    assert q.hi.item() == pytest.approx(0.661 / 0.271, rel=1e-5)
    assert q.lo.item() == 0.0
    assert out.max().item() == pytest.approx(0.661 / 0.271, rel=1e-5)  # the last forward used the new range
    observer.close()
    q(ramp * 100)
    assert q.hi.item() == pytest.approx(0.661 / 0.271, rel=1e-5)  # frozen after close()


def test_ema_first_batch_range_is_used_as_is():
    q = ActQuantizer(8)
    EMARangeObserver(nn.Sequential(q), beta=0.9)
    q(torch.tensor([-0.5, 0.0, 3.0]))
    assert (q.lo.item(), q.hi.item()) == pytest.approx((-0.5, 3.0))


def test_ema_per_channel_quantizer_gets_a_range_per_channel():
    q = ActQuantizer(4, per_channel=True)
    EMARangeObserver(nn.Sequential(q), beta=0.5)
    x = torch.stack([torch.linspace(0, 1, 8), torch.linspace(-2, 3, 8)]).reshape(2, 2, 4).unsqueeze(0)
    q(x)
    q(2 * x)  # raw EMA: 0.5 r, then 0.25 r + 0.5 * 2r = 1.25 r; corrected by 1 - 0.25: r * 5/3
    assert q.lo.tolist() == pytest.approx([0.0, -2.0 * 5 / 3])
    assert q.hi.tolist() == pytest.approx([5 / 3, 3.0 * 5 / 3])


# ---------------------------------------------------------------------------------------------- generators
def test_gdfq_generator_output_shape_and_normalization():
    rng = torch.Generator().manual_seed(0)
    g = ConditionalGenerator(10, (3, 32, 32)).train()
    last_bn = g.trunk.body[-1]
    assert isinstance(last_bn, nn.BatchNorm2d) and not last_bn.affine
    seen = {}
    last_bn.register_forward_pre_hook(lambda m, inp: seen.setdefault("tanh", inp[0].detach()))
    sample = g.sample(32, rng)
    images = g(sample)
    assert images.shape == (32, 3, 32, 32)
    var, mean = torch.var_mean(images, dim=(0, 2, 3), unbiased=False)
    tanh_var = seen["tanh"].var(dim=(0, 2, 3), unbiased=False)
    assert seen["tanh"].abs().max() <= 1.0
    assert mean.abs().max() < 1e-5  # per channel: batch mean 0, variance v / (v + eps) of the tanh output's v
    assert torch.allclose(var, tanh_var / (tanh_var + last_bn.eps), rtol=1e-4)
    assert sample.targets.sum(1).eq(1).all() and sample.targets.max(1).values.eq(1).all()
    with pytest.raises(ValueError, match="divisible by 4"):
        ConditionalGenerator(10, (3, 30, 30))


def test_qimera_superposed_batch_has_mixed_soft_labels():
    rng = torch.Generator().manual_seed(1)
    g = SuperposedGenerator(10, (3, 32, 32), teacher_fc=torch.randn(10, 64), mix_prob=1.0, mix_classes=2)
    assert g.latent_dim == 64  # latent_dim null: the teacher's penultimate width
    sample = g.sample(16, rng)
    assert sample.labels.shape == (16, 2) and sample.z.shape == (16, 2, 64)
    assert torch.allclose(sample.targets.sum(1), torch.ones(16))
    assert (sample.targets > 0).sum(1).max() == 2
    assert g(sample).shape == (16, 3, 32, 32)
    plain = SuperposedGenerator(10, (3, 32, 32), teacher_fc=torch.randn(10, 64), mix_prob=0.0).sample(4, rng)
    assert plain.labels.shape == (4, 1)
    fc = torch.randn(10, 64)
    init = SuperposedGenerator(10, (3, 32, 32), teacher_fc=fc, embedding_init="teacher_fc")
    assert torch.equal(init.embedding.weight.data, fc)


def test_unconditional_generator_has_no_labels():
    g = UnconditionalGenerator(10, (3, 16, 16), latent_dim=32)
    sample = g.sample(4, torch.Generator().manual_seed(0))
    assert sample.labels is None and g(sample).shape == (4, 3, 16, 16)


# ---------------------------------------------------------------------------------------------- AIT
def test_gradient_inundation_scales_a_too_small_step_until_the_threshold():
    wq = WeightQuantizer(4, per_channel=True)
    w0 = torch.linspace(-1, 1, 64).reshape(2, 32)
    delta = torch.full_like(w0, 1e-4)
    delta[:, 0] = delta[:, -1] = 0.0  # keep each channel's range: the grid step stays 2/15
    gi = GradientInundation(nn.Module(), threshold=0.1)
    assert (integer_codes(w0 + delta, wq) != integer_codes(w0, wq)).float().mean() < 0.1  # plain step: too small
    scale = gi.scale_for(w0, delta, wq)

    def changed(a):
        return (integer_codes(w0 + a * delta, wq) != integer_codes(w0, wq)).float().mean()
    # the last bisection midpoint (AIT's code): inside [a/2, a] of the first doubling a that reaches 0.1
    assert scale > 1 and changed(2 * scale) >= 0.1 and changed(scale) >= 0.05
    big = 0.2 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(0))
    assert gi.scale_for(w0, big, wq) == 1.0  # a step that already moves many integer weights is left alone


# ---------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("override,needle", [
    ({"generator": {"name": "nope"}}, "method.generator.name: unknown name 'nope'; choose one of: acq, arc, dcgan3, "
                                      "fixed_set, gdfq, qimera, unconditional"),
    ({"student_losses": {"kld": {"weight": 1}}},
     "method.student_losses: unknown name 'kld'; choose one of: attention_mse, ce, "
                                                 "difference_entropy, feature_mse, kd, l1"),
    ({"generator_losses": {"bns": {"weight": 1, "scale": 2}}}, "unknown setting(s) ['scale']"),
    ({"schedule": {"iters_per_epoch": 0}}, "schedule.iters_per_epoch=0"),
    ({"schedule": {"epochs": 0}}, "schedule.epochs=0"),
    ({"schedule": {"warmup_epochs": 2}}, "leaves no epoch to train the student"),
    ({"inundation": {"enabled": True, "threshold": 0}}, "method.inundation.threshold=0"),
])
def test_bad_parts_and_schedules_are_value_errors(override, needle):
    import_all_methods()  # as a run does before it builds a method: the parts method modules register (ACQ's)
    settings = dict(schedule={"name": "smoke", "epochs": 2, "iters_per_epoch": 2, "batch_size": 4},
                    generator_losses={"ce": {"weight": 1}}, student_losses={"kd": {}})
    for key, value in override.items():
        settings[key] = {**settings[key], **value} if key == "schedule" else value
    with pytest.raises(ValueError) as err:
        GeneratorQAT(**settings)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_yamls_compose_the_papers_settings():
    gdfq, qimera, ait, qimera_ait = (build_method(compose_cfg(f"method={m}")) for m in ("gdfq", "qimera", "ait",
                                                                                   "qimera_ait"))
    assert gdfq.schedule.name == "cpu"  # the default schedule group
    assert [n for n, _ in gdfq.student_terms] == ["kd", "ce"] and gdfq.settings.inundation_threshold is None
    assert qimera.generator_spec["name"] == "qimera" and qimera.generator_spec["latent_dim"] is None
    assert [n for n, _ in ait.student_terms] == ["kd"] and ait.settings.weight_decay == 0.0
    assert ait.generator_spec["name"] == "gdfq" and ait.settings.inundation_threshold == 1e-3
    assert qimera_ait.generator_spec["name"] == "qimera" and [n for n, _ in qimera_ait.student_terms] == ["kd"]
    paper = Schedule.from_dict(dict(compose_cfg("schedule=paper").schedule))
    assert (paper.epochs, paper.iters_per_epoch, paper.batch_size, paper.milestones) == (400, 200, 200,
                                                                                          (100, 200, 300))
    assert paper.decay_factor(99, 0.1) == 1.0 and paper.decay_factor(300, 0.1) == pytest.approx(1e-3)


@pytest.mark.parametrize("args,needles", [
    (["schedule=nope"], ["schedule=nope", "cpu", "paper", "smoke"]),
    (["method=gdfq", "schedule.iters_per_epoch=0"], ["schedule.iters_per_epoch=0"]),
    (["method=qimera", "method.generator.name=nope"], ["nope", "acq, arc, dcgan3, fixed_set, gdfq, qimera, unconditional"]),
    (["method=ait", "+method.student_losses.nope.weight=1"], ["nope", "attention_mse, ce, difference_entropy, feature_mse, kd, l1"]),
])
def test_cli_refuses_bad_names_and_schedules(tmp_path, args, needles):
    proc = run_cli(*args, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dfqbench: error: "), proc.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    assert not (tmp_path / "record.json").exists()


# ---------------------------------------------------------------------------------------------- smoke runs
def test_smoke_run_on_the_shared_teacher(tmp_path, cache_dir, cifar10_root, teacher):
    record = run(_real(cache_dir, cifar10_root, teacher, "method=gdfq", "wbit=4", "abit=4"), tmp_path)
    assert record["status"] == "done" and record["stochastic"] and record["info"]["schedule"] == "smoke"
    assert record["method_config"]["schedule"]["name"] == "smoke"
    training = record["info"]["training"]
    assert (training["epochs"], training["iters_per_epoch"]) == (2, 2) and set(training["final_losses"]) == {"G", "S"}
    # measured on these 500 images after the 4 iterations: 74.0 at seed 0 (62.4 and 69.4 at seeds 1 and 2; RTN
    # W4A4 81.6, FP32 85.2). 5 points below the lowest: a quantizer that rounds with floor gives 10.4
    assert 57.0 <= record["top1"] <= record["fp32_top1"]
    assert not (tmp_path / "checkpoint.pt").exists()  # removed once training finished


@pytest.mark.parametrize("method,quant", [("gdfq", "brecq"), ("qimera", "dfq"), ("ait", "brecq"),
                                          ("qimera_ait", "gdfq"), ("adadfq", "gdfq"), ("arc_ait", "gdfq")])
def test_smoke_run_on_an_unseen_random_teacher(tmp_path, cache_dir, cifar10_root, method, quant):
    cfg = compose_cfg("model=pytorchcv", "model.arch=preresnet20_cifar10", "model.pretrained=false",
                      f"dataset.root={cifar10_root}", "dataset.max_samples=100", f"paths.cache_dir={cache_dir}", *SMOKE,
                      f"method={method}", f"quant={quant}", "wbit=4", "abit=4", "schedule.batch_size=8")
    record = run(cfg, tmp_path)
    assert record["status"] == "done" and record["weights"] == "random"
    assert record["info"]["schedule"] == "smoke" and record["quant"] == quant
    training = record["info"]["training"]  # a random teacher is at chance: check that the student trained
    assert (training["epochs"], training["iters_per_epoch"]) == (2, 2) and "S" in training["final_losses"]
    assert all(math.isfinite(v) for v in training["final_losses"].values())


def test_a_stopped_run_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_one(tmp_path, cache_dir,
                                                                                       cifar10_root, teacher):
    args = ["method=ait", "wbit=4", "abit=4", "dataset.max_samples=200"]
    with pytest.raises(KeyboardInterrupt, match="stopped after epoch 1"):  # a kill right after a checkpoint
        run(_real(cache_dir, cifar10_root, teacher, *args, "method.stop_after_epoch=1"), tmp_path / "a")
    assert (tmp_path / "a" / "checkpoint.pt").exists() and not (tmp_path / "a" / "record.json").exists()
    resumed = run(_real(cache_dir, cifar10_root, teacher, *args), tmp_path / "a")
    assert resumed["status"] == "done" and resumed["info"]["training"]["resumed_from_epoch"] == 1
    straight = run(_real(cache_dir, cifar10_root, teacher, *args), tmp_path / "b")
    assert "resumed_from_epoch" not in straight["info"]["training"]
    assert resumed["top1"] == straight["top1"]  # same RNG and optimizer state: the same final student
    assert resumed["info"]["training"]["final_losses"] == straight["info"]["training"]["final_losses"]


def test_a_checkpoint_of_another_configuration_is_not_resumed(tmp_path, cache_dir, cifar10_root, teacher):
    with pytest.raises(KeyboardInterrupt):
        run(_real(cache_dir, cifar10_root, teacher, "method=gdfq", "method.stop_after_epoch=1"), tmp_path)
    record = run(_real(cache_dir, cifar10_root, teacher, "method=gdfq", "wbit=5", "abit=5"), tmp_path)
    assert "resumed_from_epoch" not in record["info"]["training"]


def test_a_checkpoint_of_other_dfqbench_source_is_not_resumed(tmp_path, cache_dir, cifar10_root, teacher,
                                                               monkeypatch, capsys):
    """A sweep interrupted across a code change starts the run again: one record, one code."""
    import dfqbench.train.trainer as trainer_module
    with pytest.raises(KeyboardInterrupt):
        run(_real(cache_dir, cifar10_root, teacher, "method=gdfq", "method.stop_after_epoch=1"), tmp_path)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["code"] == trainer_module.code_digest()
    monkeypatch.setattr(trainer_module, "code_digest", lambda: "0123456789abcdef")
    record = run(_real(cache_dir, cifar10_root, teacher, "method=gdfq"), tmp_path)
    assert "resumed_from_epoch" not in record["info"]["training"]
    assert "was written by another dfqbench source; training from the start" in capsys.readouterr().err


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, cache_dir, cifar10_root, teacher):
    proc = run_cli("method=gdfq", f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}",
                   "dataset.max_samples=100", "schedule=smoke", "schedule.warmup_epochs=1",
                   "schedule.iters_per_epoch=3", "threads=1", "method.student_optim.lr=1e30",
                   f"hydra.run.dir={tmp_path}", cache=cache_dir)
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    # a NaN loss names its term; weights that overflowed in the step before are named as parameters
    assert line.startswith("dfqbench: error: training diverged: student "), line
    assert "at epoch 2/2, iteration" in line and str(tmp_path / "checkpoint.pt") in line
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["status"] == "failed" and "TrainingDiverged" in record["error"]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["student"].values()
                                       if v.is_floating_point())


def test_best_epoch_on_test_is_opt_in_and_labelled(tmp_path, cache_dir, cifar10_root, teacher):
    record = run(_real(cache_dir, cifar10_root, teacher, "method=gdfq", "method.best_epoch_on_test=true"), tmp_path)
    info = record["info"]
    assert info["best_epoch_on_test"] is True and info["training"]["best_epoch"] in (1, 2)
    assert record["top1"] == pytest.approx(info["training"]["best_epoch_top1"])


def test_compiled_trainer_keeps_checkpoint_keys_and_returns_an_eager_student(monkeypatch):
    """compile=...: nn.Module.compile in place (state_dict keys unchanged, so checkpoints and resumes are the
    eager run's), undone when training ends; an unknown mode is refused with the choices."""
    from dfqbench.train.trainer import COMPILE_MODES, Trainer

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, mode=None: (compiled.append((type(self).__name__, mode)),
                                                 setattr(self, "_compiled_call_impl", self._call_impl)))
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    teacher(torch.zeros(1, 3, 8, 8))
    student = copy.deepcopy(teacher)
    keys = list(student.state_dict())

    class Gen(torch.nn.Module):
        num_classes = 10

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    schedule = Schedule(name="t", epochs=1, iters_per_epoch=1, batch_size=2, warmup_epochs=0, calib_epochs=0,
                        milestones=[])
    with pytest.raises(ValueError, match="compile='fast' is not valid; choose one of: " + ", ".join(COMPILE_MODES)):
        Trainer(teacher, student, Gen(), [], [], schedule, TrainSettings(), torch.device("cpu"), 0,
                compile_mode="fast")
    trainer = Trainer(teacher, student, Gen(), [], [], schedule, TrainSettings(), torch.device("cpu"), 0,
                      compile_mode="reduce-overhead")
    assert [m for _, m in compiled] == ["reduce-overhead"] * 3
    assert list(student.state_dict()) == keys and student._compiled_call_impl is not None
    trainer._iteration = lambda epoch, it: None
    trainer.fit()
    assert all(m._compiled_call_impl is None for m in (teacher, student, trainer.generator))


def test_qimera_mix_norm_component_standardizes_each_component_over_features_and_batch():
    """mix_norm=component: the official BatchNorm1d on the 3-D `.T` ([D, K, B]); plain batches as `vector`."""
    gen = SuperposedGenerator(10, (3, 32, 32), latent_dim=8, mix_norm="component")
    vec = SuperposedGenerator(10, (3, 32, 32), latent_dim=8, mix_norm="vector")
    vec.load_state_dict(gen.state_dict())
    seen = {}
    for g in (gen, vec):
        g.trunk.forward = lambda h, g=g: seen.__setitem__(g.mix_norm, h) or torch.zeros(1)
    z = torch.randn(6, 2, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [1, 2]])
    weights = torch.tensor([[0.25, 0.75]]).expand(6, 2)
    sample = type("S", (), {"z": z, "labels": labels, "weights": weights})()
    gen(sample), vec(sample)
    h = gen.embedding(labels) + z  # [B, K, D]
    mean = h.mean(dim=(0, 2), keepdim=True)
    var = h.var(dim=(0, 2), unbiased=False, keepdim=True)
    expected = ((h - mean) / torch.sqrt(var + 1e-5) * weights.unsqueeze(2)).sum(1)
    torch.testing.assert_close(seen["component"], expected)
    assert not torch.allclose(seen["vector"], expected, atol=1e-3)
    plain = type("S", (), {"z": z[:, :1], "labels": labels[:, :1], "weights": torch.ones(6, 1)})()
    gen(plain), vec(plain)
    torch.testing.assert_close(seen["component"], seen["vector"])
    with pytest.raises(ValueError, match="mix_norm='batch' is not valid; choose one of: vector, component"):
        SuperposedGenerator(10, (3, 32, 32), latent_dim=8, mix_norm="batch")


def test_bf16_precision_runs_teacher_and_generator_in_bf16_and_the_student_in_float32():
    """precision=bf16: the teacher's and generator's convolutions under bf16 autocast, their outputs handed on as
    float32 (the BN statistics the loss reads too); the student and its quantizers never see a bf16 tensor."""
    from dfqbench import precision
    from dfqbench.train.trainer import Trainer

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 10)).eval()
    student = nn.Sequential(copy.deepcopy(teacher[0]), ActQuantizer(4), *copy.deepcopy(teacher[1:]))
    generator = ConditionalGenerator(10, (3, 8, 8))
    seen = {"teacher": set(), "student": set(), "generator": set(), "student_in": set()}
    teacher[0].register_forward_hook(lambda m, i, o: seen["teacher"].add(o.dtype))
    student[0].register_forward_hook(lambda m, i, o: seen["student"].add(o.dtype))
    student[0].register_forward_pre_hook(lambda m, i: seen["student_in"].add(i[0].dtype))
    generator.register_forward_hook(lambda m, i, o: seen["generator"].add(o.dtype))
    schedule = Schedule(name="t", epochs=2, iters_per_epoch=2, batch_size=4, warmup_epochs=0, calib_epochs=1,
                        milestones=[])
    terms = [("bns", BNStatLoss()), ("ce", StudentCE())]
    with precision.scope("bf16") as scope:
        trainer = Trainer(teacher, student, generator, terms, [("kd", DistillationKL())], schedule,
                          TrainSettings(), torch.device("cpu"), 0)
        info = trainer.fit()
    assert scope.uses == 1 and info["precision"] == "bf16"
    assert seen["teacher"] == {torch.bfloat16} and seen["generator"] == {torch.bfloat16}
    assert seen["student"] == {torch.float32} and seen["student_in"] == {torch.float32}
    assert all(math.isfinite(v) for v in info["final_losses"].values())
    assert all(p.dtype == torch.float32 for p in (*student.parameters(), *generator.parameters()))
