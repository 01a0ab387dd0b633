"""ClusterQ (method=clusterq): the class-wise BN-statistics term against a literal re-statement of the official
loop (DiamondSheep/ClusterQ trainer.py compute_class_BNS_loss), D_BNS, the epoch gating, the generator's
augmentation, bad settings, and the yaml."""


import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from dfqbench.__main__ import CONF_DIR
from dfqbench.errors import UnsupportedModel
from dfqbench.method_overrides import apply_per_setting
from dfqbench.runner import build_method
from dfqbench.train.generators import GENERATORS
from dfqbench.train.generators.base import apply_theta, batch_crop_flip_theta, check_augment
from dfqbench.train.losses import ClassBNS, Step, official_start_layer, recurrent_weights
from dfqbench.train.schedule import Schedule


def _stats(num_bn=7, channels=(3, 4, 5, 4, 6, 3, 5), seed=0, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for l in range(num_bn):
        c = channels[l]
        mean = torch.randn(c, generator=g, dtype=dtype).requires_grad_(grad)
        var = (torch.rand(c, generator=g, dtype=dtype) + 0.5).requires_grad_(grad)
        rm, rv = torch.randn(c, generator=g, dtype=dtype), torch.rand(c, generator=g, dtype=dtype) + 0.5
        out.append((mean, var, rm, rv))
    return out


def _official_loop(mean_list, var_list, soft_mean, soft_var, labels, start_layer):
    """The official compute_class_BNS_loss without its D_BNS part, written out as the code runs it: C starts at
    zeros(1); for every sample, for every layer from start_layer, C += MSE + MSE, then C = C / (n - start)."""
    mse = torch.nn.MSELoss()
    c_bns = torch.zeros(1, dtype=mean_list[0].dtype)
    for i in range(len(labels)):
        c = int(labels[i])
        for layer in range(start_layer, len(mean_list)):
            c_bns += mse(mean_list[layer], soft_mean[c][layer]) + mse(var_list[layer], soft_var[c][layer])
            c_bns = c_bns / (len(mean_list) - start_layer)
    return c_bns[0]


def _step(stats, labels, classes=3, epoch=None):
    return Step(torch.zeros(len(labels), 1), F.one_hot(labels, classes).double(),
                teacher_logits=torch.zeros(len(labels), classes), bn_stats=lambda: stats, epoch=epoch)


def test_official_start_layer():
    assert official_start_layer(21) == 9  # pytorchcv ResNet-20: 21 BatchNorm2d layers (2 in the shortcuts)
    assert official_start_layer(19) == 8
    assert official_start_layer(7) == 2 and official_start_layer(8) == 2 and official_start_layer(3) == 0


def test_recurrent_weights_match_the_loop():
    d = torch.rand(4, 3, dtype=torch.float64)
    c = 0.0
    for i in range(4):
        for j in range(3):
            c = (c + float(d[i, j])) / 3
    assert float((d * recurrent_weights(4, 3, dtype=torch.float64)).sum()) == pytest.approx(c, rel=1e-12)
    w = recurrent_weights(4, 3, dtype=torch.float64)
    assert float(w[-1, -1]) == pytest.approx(1 / 3) and float(w[-1, 0]) == pytest.approx(1 / 27)


def test_class_bns_running_stats_equals_the_official_loop_value_and_gradient():
    stats = _stats(grad=True)
    labels = torch.tensor([0, 2, 1, 1, 0])
    term = ClassBNS(dbns_weight=0.0)  # running_stats centroids (the code): the teacher's running statistics
    ours = term(_step(stats, labels))
    # the code's centroids: soft_mean[c][l] = running_mean_l for every class c
    soft_mean = {c: [s[2] for s in stats] for c in range(3)}
    soft_var = {c: [s[3] for s in stats] for c in range(3)}
    theirs = _official_loop([s[0] for s in stats], [s[1] for s in stats], soft_mean, soft_var, labels,
                            official_start_layer(len(stats)))
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-10)
    params = [t for s in stats for t in s[:2]]
    g_ours = torch.autograd.grad(ours, params, allow_unused=True, retain_graph=True)
    g_theirs = torch.autograd.grad(theirs, params, allow_unused=True)
    start = official_start_layer(len(stats))
    # layers before the start layer are not in either graph
    assert all(g is None for g in (*g_ours[:2 * start], *g_theirs[:2 * start]))
    for a, b in zip(g_ours[2 * start:], g_theirs[2 * start:]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)
    # the last layer dominates: weight 1/K on the last sample, 1/K^2 on the layer before, ...
    d_last = F.mse_loss(stats[-1][0], stats[-1][2]) + F.mse_loss(stats[-1][1], stats[-1][3])
    assert float(ours.detach()) >= float(d_last.detach()) / (len(stats) - start)


def test_class_bns_class_ema_centroids_equal_the_official_loop_with_per_class_centroids():
    stats = _stats(seed=1)
    labels = torch.tensor([1, 0, 2, 2])
    g = torch.Generator().manual_seed(5)
    term = ClassBNS(centroids="class_ema", dbns_weight=0.0)
    term.cent_mean = [torch.randn(3, s[0].shape[0], generator=g, dtype=torch.float64) for s in stats]
    term.cent_var = [torch.rand(3, s[0].shape[0], generator=g, dtype=torch.float64) for s in stats]
    soft_mean = {c: [m[c] for m in term.cent_mean] for c in range(3)}
    soft_var = {c: [v[c] for v in term.cent_var] for c in range(3)}
    theirs = _official_loop([s[0] for s in stats], [s[1] for s in stats], soft_mean, soft_var, labels, 2)
    assert float(term(_step(stats, labels))) == pytest.approx(float(theirs), rel=1e-10)
    assert float(term(_step(stats, labels))) != pytest.approx(float(ClassBNS(dbns_weight=0.0)(_step(stats, labels))))
    # the labels matter with class centroids: another labelling gives another value
    assert float(term(_step(stats, torch.tensor([1, 0, 2, 0])))) != pytest.approx(float(theirs), rel=1e-6)


def test_class_bns_float32_and_mean_reduction():
    stats = _stats(dtype=torch.float32)
    labels = torch.tensor([0, 1, 2])
    theirs = _official_loop([s[0] for s in stats], [s[1] for s in stats], {c: [s[2] for s in stats] for c in range(3)},
                            {c: [s[3] for s in stats] for c in range(3)}, labels, 2)
    assert float(ClassBNS(dbns_weight=0.0)(_step(stats, labels))) == pytest.approx(float(theirs), rel=1e-5)
    d = [F.mse_loss(m, rm) + F.mse_loss(v, rv) for m, v, rm, rv in stats[2:]]
    plain = ClassBNS(dbns_weight=0.0, reduction="mean")(_step(stats, labels))
    assert float(plain) == pytest.approx(float(sum(d) / len(d)), rel=1e-5)


def test_dbns_has_a_value_but_zero_gradient():
    stats = _stats(grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    term = ClassBNS(dbns_weight=1.0)
    plain = ClassBNS(dbns_weight=0.0)(_step(stats, labels))
    value = term(_step(stats, labels))
    dbns = float((value - plain).detach())
    k = len(stats) - 2
    expected = len(labels) * k * (0.03 ** 2 / 3 + 0.05 ** 2 / 3)  # E[u^2] = a^2 / 3 per element, a mean per layer
    assert 0.5 * expected < dbns < 1.5 * expected
    params = [t for s in stats[2:] for t in s[:2]]  # the layers from the start layer
    only_dbns = term.dbns(stats, len(labels))
    assert float(only_dbns.detach()) > 0
    assert all(float(g.abs().max()) == 0.0 for g in torch.autograd.grad(only_dbns, params))


def test_epoch_gating_after_the_warmup():
    term = ClassBNS()
    term.bind_schedule(Schedule("cpu", epochs=10, iters_per_epoch=2, batch_size=4, warmup_epochs=4))
    assert term.after_epoch == 4
    assert [term.active(e) for e in range(10)] == [False] * 5 + [True] * 5
    stats = _stats(grad=True)
    labels = torch.tensor([0, 1])
    off = term(_step(stats, labels, epoch=4))
    assert float(off) == 0.0 and not off.requires_grad
    assert float(term(_step(stats, labels, epoch=5)).detach()) > 0
    fixed = ClassBNS(after_epoch=0)
    fixed.bind_schedule(Schedule("x", epochs=3, iters_per_epoch=1, batch_size=2, warmup_epochs=2))
    assert fixed.after_epoch == 0 and fixed.active(1)


def test_class_ema_centroid_updates_follow_the_code():
    term = ClassBNS(centroids="class_ema", after_epoch=1, decay=0.2)
    calls = []

    def probe(c, augment):
        calls.append((c, augment))
        stat = torch.full((2,), float(c + 1))
        logits = torch.zeros(1, 2)
        logits[0, 0 if c == 0 else 1 - c % 2] = 1.0  # class 0 right, class 1 wrong
        return logits, [(stat, stat * 2, None, None)]

    term.start_epoch(0, probe, 2)
    assert term.cent_mean is None and not calls  # before after_epoch: nothing
    term.start_epoch(1, probe, 2)  # init: every class, no augmentation
    assert calls == [(0, False), (1, False)]
    torch.testing.assert_close(term.cent_mean[0], torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    term.cent_mean[0][0] = torch.zeros(2)
    term.start_epoch(2, probe, 2)  # update: augmented probes; class 0 classified right, class 1 not
    assert calls[2:] == [(0, True), (1, True)]
    torch.testing.assert_close(term.cent_mean[0], torch.tensor([[0.2, 0.2], [2.0, 2.0]]))
    assert term.probes == {"init": 1, "updates": 1, "skipped": 1}


def test_augmentation_probability_and_shapes():
    rng = torch.Generator().manual_seed(0)
    assert all(batch_crop_flip_theta(4, rng, 0.0, (0.8, 1.0), 0.5, (0.75, 4 / 3)) is None for _ in range(20))
    draws = [batch_crop_flip_theta(64, rng, 0.5, (0.8, 1.0), 0.5, (0.75, 4 / 3)) for _ in range(400)]
    augmented = [t for t in draws if t is not None]
    assert 160 < len(augmented) < 240  # per batch, probability 0.5
    theta = torch.cat(augmented)
    assert theta.shape[1:] == (2, 3)
    area = theta[:, 0, 0].abs() * theta[:, 1, 1]
    assert float(area.min()) >= 0.8 - 1e-6 and float(area.max()) <= 1.0 + 1e-6  # the crop's area fraction
    assert float(theta[:, 0, 0].abs().max()) <= 1.0 and float(theta[:, 1, 1].max()) <= 1.0  # inside the image
    flipped = float((theta[:, 0, 0] < 0).float().mean())
    assert 0.45 < flipped < 0.55  # per image, probability 0.5
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    torch.testing.assert_close(apply_theta(x, torch.eye(2, 3).expand(3, 2, 3)), x, rtol=1e-5, atol=1e-5)
    assert apply_theta(x, None) is x
    y = apply_theta(x, batch_crop_flip_theta(3, rng, 1.0, (0.8, 0.8), 1.0, (1.0, 1.0)))
    assert y.shape == x.shape
    y.sum().backward()
    assert float(x.grad.abs().sum()) > 0


def test_generator_augment_option():
    rng = torch.Generator().manual_seed(0)
    gen = GENERATORS["gdfq"](10, (3, 32, 32), latent_dim=10, augment={"prob": 1.0})
    s = gen.sample(5, rng)
    assert s.theta is not None and s.theta.shape == (5, 2, 3)
    assert gen(s).shape == (5, 3, 32, 32)
    plain = GENERATORS["gdfq"](10, (3, 32, 32), latent_dim=10)
    assert plain.sample(5, torch.Generator().manual_seed(0)).theta is None
    # without `augment`, the draws (noise, then labels) are those of the generator before the option existed
    r = torch.Generator().manual_seed(3)
    z = torch.randn(5, 1, 10, generator=r)
    labels = torch.randint(0, 10, (5, 1), generator=r)
    s = plain.sample(5, torch.Generator().manual_seed(3))
    assert torch.equal(s.z, z) and torch.equal(s.labels, labels)
    probe = plain.sample_for(torch.tensor([7]), rng)
    assert probe.labels.tolist() == [[7]] and probe.targets[0, 7] == 1


@pytest.mark.parametrize("kwargs,match", [
    ({"centroids": "batch"}, "centroids='batch' is not valid"),
    ({"reduction": "sum"}, "reduction='sum' is not valid"),
    ({"after_epoch": -1}, "after_epoch=-1"),
    ({"after_epoch": "later"}, "after_epoch='later'"),
    ({"start_layer": -2}, "start_layer=-2"),
    ({"decay": 1.5}, "decay=1.5"),
    ({"dbns_noise": [0.1]}, "dbns_noise"),
    ({"weight": -1}, "weight=-1"),
])
def test_class_bns_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        ClassBNS(**kwargs)
    assert "\n" not in str(err.value)


def test_class_bns_bad_models():
    with pytest.raises(UnsupportedModel, match="outside the teacher's 2 BatchNorm2d"):
        ClassBNS()(_step(_stats(num_bn=2), torch.tensor([0, 1])))
    with pytest.raises(UnsupportedModel, match="start layer 9"):
        ClassBNS(start_layer=9)(_step(_stats(), torch.tensor([0, 1])))
    with pytest.raises(RuntimeError, match="not initialised"):
        ClassBNS(centroids="class_ema")(_step(_stats(), torch.tensor([0, 1])))


@pytest.mark.parametrize("augment,match", [
    ({"prob": 2}, "augment.prob=2"),
    ({"crop_scale": [0.9, 0.8]}, "augment.crop_scale"),
    ({"crop_scale": [0.5, 1.2]}, "augment.crop_scale"),
    ({"size": 3}, "unknown setting"),
    ("yes", "must be null or a mapping"),
])
def test_bad_augment(augment, match):
    with pytest.raises(ValueError, match=match) as err:
        check_augment(augment)
    assert "\n" not in str(err.value)


def _compose(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="config", overrides=["method=clusterq", *overrides])
    apply_per_setting(cfg, list(overrides))
    return cfg


def test_yaml_composes_and_builds():
    method = build_method(_compose())
    assert method.name == "clusterq" and method.fidelity == "reproduction"
    assert method.source["code"] == "DiamondSheep/ClusterQ@9938d50f6f686315ac23329b5af7d6ae2a0c9fcd"
    assert any("crop_ratio" in s for s in method.source["inferred"])
    terms = dict(method.generator_terms)
    assert [n for n, _ in method.generator_terms] == ["ce", "bns", "class_bns"]
    assert terms["bns"].weight == 0.1 and terms["class_bns"].weight == 0.9
    assert terms["class_bns"].centroids == "running_stats" and terms["class_bns"].reduction == "official_recurrent"
    kd = dict(method.student_terms)["kd"]
    assert (kd.temperature, kd.reduction) == (20.0, "batchmean")
    assert method.generator_spec["latent_dim"] == 10 and method.generator_spec["augment"]["prob"] == 0.5
    s = method.schedule
    assert (s.name, s.epochs, s.iters_per_epoch, s.batch_size, s.warmup_epochs) == ("cpu", 10, 60, 64, 4)
    assert method.settings.student_lr == 1e-4 and method.settings.generator_betas == (0.5, 0.999)


def test_paper_schedule_is_the_papers():
    s = build_method(_compose("schedule=paper")).schedule
    assert (s.epochs, s.iters_per_epoch, s.batch_size, s.warmup_epochs, s.calib_epochs, s.milestones) == (
        400, 200, 512, 10, 4, (100, 200, 300))
    gdfq = build_method(_compose("schedule=paper", "method=gdfq")).schedule
    assert (gdfq.batch_size, gdfq.warmup_epochs) == (200, 4)  # other methods' paper schedule is unchanged


def test_class_ema_option_composes():
    method = build_method(_compose("method.generator_losses.class_bns.centroids=class_ema"))
    assert dict(method.generator_terms)["class_bns"].needs_class_probes


def test_cifar100_settings():
    cfg = _compose("model=resnet20_cifar100", "dataset=cifar100", "schedule=paper")
    method = build_method(cfg)
    assert method.generator_spec["latent_dim"] == 100 and method.schedule.batch_size == 200
    assert method.schedule.warmup_epochs == 10


def test_class_ema_run_resumes_with_its_centroids(tmp_path, cache_dir, cifar10_root, teacher):
    """A stopped class_ema run resumes with its centroids and D_BNS noise state: it ends like a straight run."""
    from conftest import compose_cfg
    from dfqbench.runner import run

    args = [f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}", "dataset.max_samples=200",
            f"paths.cache_dir={cache_dir}", "schedule=smoke", "schedule.epochs=3", "threads=1", "progress=false",
            "method=clusterq", "method.generator_losses.class_bns.centroids=class_ema"]
    with pytest.raises(KeyboardInterrupt, match="stopped after epoch 2"):
        run(compose_cfg(*args, "method.stop_after_epoch=2"), tmp_path / "a")
    resumed = run(compose_cfg(*args), tmp_path / "a")
    straight = run(compose_cfg(*args), tmp_path / "b")
    assert resumed["info"]["training"]["resumed_from_epoch"] == 2
    assert resumed["info"]["generator_terms"]["class_bns"]["init"] == 1
    assert resumed["info"]["generator_terms"] == straight["info"]["generator_terms"]
    assert resumed["top1"] == straight["top1"]
    assert resumed["info"]["training"]["final_losses"] == straight["info"]["training"]["final_losses"]
