"""DFED (unofficial-code settings): the ensemble's mean logits, its BN-moments loss against a hand sum, the
generator trainer running with an ensemble teacher built from the pool, and the bad-input errors."""

import pytest
import torch
from torch import nn

from dfqbench.archs import ARCHS
from dfqbench.methods.base import QuantContext
from dfqbench.quant import Convention
from dfqbench.runner import build_method
from dfqbench.train.ensemble import Ensemble, EnsembleBNMoments
from dfqbench.train.losses import Step

from conftest import compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed, width=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3)).eval()


def test_ensemble_averages_logits_and_counts_bn_layers():
    a, b = _net(0), _net(1, width=2)
    ens = Ensemble([a, b]).eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ens(x), (a(x) + b(x)) / 2)
    assert ens.bn_counts == [2, 2]


def test_ensemble_bn_moments_against_a_hand_sum():
    # two members: member 0 with 2 BN layers, member 1 with 1; stats (mean, var, running mean, running var)
    s = [(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0]), torch.zeros(2), torch.ones(2)),   # first of m0
         (torch.tensor([0.0, 3.0]), torch.tensor([1.0, 1.0]), torch.zeros(2), torch.ones(2)),   # second of m0
         (torch.tensor([0.0, 0.0]), torch.tensor([1.0, 5.0]), torch.zeros(2), torch.ones(2))]   # first of m1
    term = EnsembleBNMoments(weight=0.1, first_weight=5.0)
    term.bn_counts = [2, 1]
    step = Step(torch.zeros(1), None, teacher_logits=torch.zeros(1, 3), bn_stats=lambda: s)
    # m0: 5 * (||[1, 0]|| + ||[1, 0]||) + 1 * (||[0, 0]|| + ||[0, 3]||) = 10 + 3; m1: 5 * (||[0, 4]|| + 0) = 20
    assert float(term(step)) == pytest.approx((13 + 20) / 2)
    term.bn_counts = [1, 1]
    with pytest.raises(ValueError, match="3 BN layers recorded, the ensemble has 2"):
        term(step)


def _member(tmp_path, arch, seed):
    torch.manual_seed(seed)
    path = tmp_path / f"{arch}.pt"
    torch.save(ARCHS[arch]().state_dict(), path)
    return f"+method.pool.{arch}={{source: dfqbench, arch: {arch}, checkpoint: {path}, sha256: null, " \
           f"pretrained: false, num_classes: 10}}"


def test_dfed_trains_against_the_ensemble_of_teacher_and_pool(tmp_path):
    cfg = compose_cfg("method=dfed", "schedule=smoke", "~method.pool.resnet20", "~method.pool.vgg8_bn",
                      "~method.pool.mobilenetv2", _member(tmp_path, "vgg8_bn_cifar10", 0))
    method = build_method(cfg)
    assert [t.__class__.__name__ for _, t in method.generator_terms if t.weight > 0] == [
        "AdversarialL1", "EnsembleBNMoments"]
    teacher = ARCHS["mobilenetv2_cifar10"]().eval()
    ctx = QuantContext(Convention.from_dict({"name": "gdfq"}), 4, 4, 0, torch.device("cpu"), (3, 32, 32), 10,
                       progress=False, model_sha256="teacher")
    ensemble = method.build_teacher(teacher, ctx)
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 2 and ctx.info["pool"][0].startswith("vgg8")
    term = next(t for _, t in method.generator_terms if isinstance(t, EnsembleBNMoments))
    assert term.bn_counts == ensemble.bn_counts and ensemble.bn_counts[1] == 6
    student = method.quantize(teacher, ctx)
    info = ctx.info["training"]
    # G = -L1(student, ensemble) + 0.1 ensemble_bns: positive only because the BN-moments term is there
    assert info["epochs"] * info["iters_per_epoch"] == 4 and info["final_losses"]["G"] > 0
    assert torch.isfinite(student(torch.randn(2, 3, 32, 32))).all()


def test_dfed_needs_a_pool_beyond_the_runs_teacher(tmp_path):
    cfg = compose_cfg("method=dfed", "schedule=smoke", "~method.pool.resnet20", "~method.pool.vgg8_bn",
                      "~method.pool.mobilenetv2", _member(tmp_path, "vgg8_bn_cifar10", 0))
    method = build_method(cfg)
    from dfqbench.models import file_sha256

    sha = file_sha256(tmp_path / "vgg8_bn_cifar10.pt")
    ctx = QuantContext(Convention.from_dict({"name": "gdfq"}), 4, 4, 0, torch.device("cpu"), (3, 32, 32), 10,
                       progress=False, model_sha256=sha)
    with pytest.raises(ValueError, match="holds no model besides the run's teacher"):
        method.build_teacher(ARCHS["vgg8_bn_cifar10"](), ctx)
