"""MixMix (reconstruction): CutMix against hand values, the pool synthesis lowering its loss, the pool loading
(the run's own teacher left out, untrained members refused) and the bad-input errors."""

import re

import pytest
import torch
from torch import nn

from dfqbench.archs import ARCHS
from dfqbench.methods.base import QuantContext
from dfqbench.methods.mixmix import MixMix
from dfqbench.pool import load_pool
from dfqbench.quant import Convention
from dfqbench.synth.bn_loop import BNTaps, bn_layers, synthesize_batches
from dfqbench.synth.labelled import bns_loss
from dfqbench.synth.mixmix import MixMixSettings, MixMixSynthesis, cutmix

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cutmix_pastes_a_box_and_mixes_labels_by_its_area():
    x = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    changed = 0
    for seed in range(10):
        mixed, mixed_t = cutmix(x, targets, torch.Generator().manual_seed(seed))
        perm = torch.randperm(2, generator=torch.Generator().manual_seed(seed))  # cutmix's first draw
        for i in range(2):
            pasted = float((mixed[i] != x[i]).float().mean())  # the fraction of pixels from the partner
            if perm[i] == i:  # pasted from itself: nothing changes, the label stays
                assert pasted == 0.0 and torch.equal(mixed_t[i], targets[i])
            else:
                assert float(mixed_t[i, int(perm[i])]) == pytest.approx(pasted)
                assert float(mixed_t[i].sum()) == pytest.approx(1.0)
                changed += pasted > 0
    assert changed > 0


def _tiny(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_pool_synthesis_lowers_the_loss_of_every_model():
    target, member = _tiny(0), _tiny(1)
    settings = MixMixSettings(batch_size=12, iterations=40, lr=0.1, mix_prob=0.0)
    synthesis = MixMixSynthesis([member], 12, (3, 8, 8), 3, settings, torch.Generator().manual_seed(0),
                                torch.device("cpu"))

    def bns(model, x):
        with torch.no_grad(), BNTaps(bn_layers(model, "t")) as taps:
            model(x)
            return float(bns_loss(taps))

    start = torch.randn((12, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    images, = synthesize_batches(target, synthesis, torch.device("cpu"))
    for model in (target, member):
        assert bns(model, images) < 0.5 * bns(model, start)
    assert all(p.requires_grad for p in member.parameters())  # the pool's flags are restored


def _member(tmp_path, arch="vgg8_bn_cifar10", seed=0):
    torch.manual_seed(seed)
    path = tmp_path / f"{arch}-{seed}.pt"
    torch.save(ARCHS[arch]().state_dict(), path)
    return {"source": "dfqbench", "arch": arch, "checkpoint": str(path), "sha256": None, "pretrained": False,
            "num_classes": 10}


def _ctx(sha):
    return QuantContext(Convention.from_dict({"name": "gdfq"}), 4, 4, 0, torch.device("cpu"), (3, 32, 32), 10,
                        progress=False, model_sha256=sha)


def test_the_pool_leaves_the_runs_own_teacher_out_and_refuses_untrained_members(tmp_path):
    own, other = _member(tmp_path, seed=0), _member(tmp_path, "mobilenetv2_cifar10", seed=1)
    import hashlib
    own_sha = hashlib.sha256(open(own["checkpoint"], "rb").read()).hexdigest()
    models, ids = load_pool({"own": own, "other": other}, None, _ctx(own_sha))
    assert len(models) == 1 and ids[0].startswith("other:")
    untrained = {**other, "checkpoint": None}
    with pytest.raises(ValueError, match=re.escape("method.pool.u: no weights for mobilenetv2_cifar10")):
        load_pool({"u": untrained}, None, _ctx(own_sha))


@pytest.mark.parametrize("kwargs, message", [
    ({"pool": {}}, "method.pool must map names to model configs"),
    ({"pool": {"a": {"arch": "x"}}}, "method.pool must map names to model configs"),
    ({"num_images": 0}, "method.num_images=0 must be an integer >= 1"),
    ({"synthesis": {"mix_prob": 2.0}}, "method.synthesis.mix_prob=2.0 must be in [0, 1]"),
    ({"synthesis": {"lr": 0}}, "method.synthesis.lr=0 must be a number > 0"),
    ({"synthesis": {"ce_weight": -0.5}}, "method.synthesis.ce_weight=-0.5 must be a number >= 0"),
    ({"synthesis": {"steps": 1}}, "method.synthesis has unknown keys ['steps']"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    pool = {"a": {"source": "dfqbench", "arch": "vgg8_bn_cifar10"}}
    with pytest.raises(ValueError, match=re.escape(message)):
        MixMix(**{"pool": pool, **kwargs})
