"""DDAQ and ACQ (reconstructions from the abstracts, issue 18): their loss terms on hand-computable inputs, the
layer-importance prior, the centre-conditioned paired generator, the yamls, and both methods end to end (a tiny
model on the smoke schedule; the shared teacher when it is there)."""

import math
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import compose_cfg, tiny_bn_model
from dfqbench.errors import UnsupportedModel
from dfqbench.feature_taps import FeatureTap
from dfqbench.methods.acq import (ACQ, AttentionCentre, AttentionConsistency, CentredSample, PairDiversity,
                                  attention_centre, attention_vector, batch_statistics, centre_heatmap,
                                  pair_similarity, spatial_attention)
from dfqbench.methods.base import QuantContext
from dfqbench.methods.ddaq import (DDAQ, ImportanceBNS, LayerDiscrepancy, bn_feeding_layers, depth_prior,
                                   normalized, sensitivity_prior)
from dfqbench.runner import build_convention, build_method
from dfqbench.train.generators import GENERATORS
from dfqbench.train.losses import GENERATOR_LOSSES, Step
from dfqbench.train.schedule import Schedule


# ---------------------------------------------------------------------------------------------- DDAQ
def _two_layer_stats():
    # layer 0: 2 channels, layer 1: 1 channel
    return [(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])),
            (torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([5.0]))]


def _bn_step(stats, epoch=None):
    return Step(torch.zeros(1), None, teacher_logits=torch.zeros(1, 2), bn_stats=lambda: stats, epoch=epoch)


def test_importance_bns_is_the_weighted_hand_sum():
    # layer 0: MSE(mean) = (1 + 0) / 2 = 0.5, MSE(var) = (1 + 0) / 2 = 0.5 -> 1.0
    # layer 1: MSE(mean) = (3 - 1)^2 = 4, MSE(var) = (1 - 5)^2 = 16 -> 20.0
    term = ImportanceBNS(weight=0.1)
    term.set_importance([1.0, 3.0])  # normalized to 0.25, 0.75
    assert float(term(_bn_step(_two_layer_stats()))) == pytest.approx(0.25 * 1.0 + 0.75 * 20.0)
    term.set_importance([1.0, 1.0])  # uniform: GDFQ's bns exactly
    assert float(term(_bn_step(_two_layer_stats()))) == pytest.approx(
        float(GENERATOR_LOSSES["bns"]()(_bn_step(_two_layer_stats()))))


def test_importance_terms_need_the_prior_and_the_right_number_of_layers():
    with pytest.raises(ValueError, match="needs the layer-importance prior that method ddaq sets"):
        ImportanceBNS()(_bn_step(_two_layer_stats()))
    term = ImportanceBNS()
    term.set_importance([1.0, 1.0, 1.0])
    with pytest.raises(UnsupportedModel, match="3 layer weights, the model 2 BatchNorm2d layers"):
        term(_bn_step(_two_layer_stats()))


def test_normalized_and_depth_prior():
    assert normalized([2.0, 6.0]).tolist() == [0.25, 0.75]
    assert normalized([0.0, 0.0, 0.0, 0.0]).tolist() == [0.25] * 4  # nothing measured: uniform
    assert depth_prior(3).tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6])


class _Taps:
    def __init__(self, teacher, student):
        self.pair = (SimpleNamespace(value={"bn_inputs": teacher}), SimpleNamespace(value={"bn_inputs": student}))


def _discrepancy_step(teacher_feats, student_feats, epoch=None):
    taps = _Taps(teacher_feats, student_feats).pair
    return Step(torch.zeros(2, 1), None, student=lambda x: torch.zeros(2, 3), teacher_logits=torch.zeros(2, 3),
                taps=taps, teacher_features={"bn_inputs": teacher_feats}, epoch=epoch)


def test_layer_discrepancy_hand_value_and_sign():
    t = [torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.tensor([[2.0], [0.0]])]   # ||T_0||^2 = 4, ||T_1||^2 = 4
    s = [torch.tensor([[1.0, 2.0], [1.0, 1.0]]), torch.tensor([[0.0], [0.0]])]   # ||S-T||^2: 1 and 4
    term = LayerDiscrepancy(weight=0.1)
    term.set_importance([3.0, 1.0])
    value = float(term(_discrepancy_step(t, s)))
    assert value == pytest.approx(-(0.75 * 1 / 4 + 0.25 * 4 / 4))
    assert value < 0  # the generator MAXIMIZES the discrepancy: a larger discrepancy, a lower loss
    assert float(term(_discrepancy_step(t, t))) == 0.0
    further = [x * 3 for x in s]
    assert float(term(_discrepancy_step(t, further))) < value


def test_layer_discrepancy_waits_for_the_warmup():
    t, s = [torch.ones(2, 2)], [torch.zeros(2, 2)]
    term = LayerDiscrepancy()
    term.set_importance([1.0])
    term.bind_schedule(Schedule(name="t", epochs=4, iters_per_epoch=1, batch_size=2, warmup_epochs=2))
    assert float(term(_discrepancy_step(t, s, epoch=1))) == 0.0
    assert float(term(_discrepancy_step(t, s, epoch=2))) == pytest.approx(-1.0)
    assert float(term(_discrepancy_step(t, s))) == pytest.approx(-1.0)  # outside the trainer: on
    always = LayerDiscrepancy(after_warmup=False)
    always.set_importance([1.0])
    always.bind_schedule(Schedule(name="t", epochs=4, iters_per_epoch=1, batch_size=2, warmup_epochs=2))
    assert float(always(_discrepancy_step(t, s, epoch=0))) == pytest.approx(-1.0)


def test_bn_input_tap_keeps_execution_order_on_each_forward():
    model = tiny_bn_model()
    tap = FeatureTap(model, {"bn_inputs"})
    x = torch.randn(2, 3, 8, 8)
    model(x)
    model(x)  # the list restarts with every forward
    feats = tap.value["bn_inputs"]
    assert [f.shape[1] for f in feats] == [4, 6]
    assert torch.equal(feats[0], model[0](x))
    tap.close()
    with pytest.raises(UnsupportedModel, match="needs BatchNorm2d layers"):
        FeatureTap(nn.Sequential(nn.Conv2d(3, 2, 1)), {"bn_inputs"})


def _convention(*overrides):
    cfg = compose_cfg("method=ddaq", *overrides)
    return build_convention(cfg, build_method(cfg))


def test_sensitivity_prior_on_a_toy():
    model = tiny_bn_model()
    assert bn_feeding_layers(model, torch.randn(2, 3, 8, 8)) == ["0", "3"]
    weights, raw = sensitivity_prior(model, _convention(), 2, 2, (3, 8, 8), torch.device("cpu"), probe_images=8)
    assert len(weights) == 2 and float(weights.sum()) == pytest.approx(1.0) and min(raw) > 0
    # by hand: the logits' relative change with only conv "0" (then only conv "3") quantized
    from dfqbench.quant import quantize_model
    from dfqbench.quant.quantizers.layers import QuantLayer
    q = quantize_model(__import__("copy").deepcopy(model), _convention(), 2, 2)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLayer)}
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        for i, name in enumerate(["0", "3"]):
            saved = model[int(name)].weight.clone()
            model[int(name)].weight.copy_(layers[name].quantized_weight())
            expected = float((model(x) - ref).pow(2).sum() / ref.pow(2).sum())
            model[int(name)].weight.copy_(saved)
            assert raw[i] == pytest.approx(expected, rel=1e-4)
    weights32, raw32 = sensitivity_prior(model, _convention(), 32, 32, (3, 8, 8), torch.device("cpu"), 8)
    assert raw32 == [0.0, 0.0] and weights32.tolist() == [0.5, 0.5]  # nothing quantized: uniform


# ---------------------------------------------------------------------------------------------- ACQ
def test_attention_centre_of_known_maps():
    a = torch.zeros(3, 4, 8)
    a[0, 0, 7] = 2.0                      # one hot pixel: top row, last column
    a[1] = 1.0                            # uniform: the middle
    a[2, 1, 0] = a[2, 1, 7] = 1.0         # two pixels mirrored left/right in row 1
    c = attention_centre(a)
    assert c[0].tolist() == pytest.approx([1 - 1 / 8, -1 + 1 / 4])   # (x, y) of pixel centres
    assert c[1].tolist() == pytest.approx([0.0, 0.0], abs=1e-7)
    assert c[2].tolist() == pytest.approx([0.0, (2 * 1 + 1) / 4 - 1])
    f = torch.zeros(1, 2, 4, 4)
    f[0, 0, 2, 3], f[0, 1, 2, 3] = 3.0, 1.0
    assert spatial_attention(f)[0, 2, 3] == pytest.approx((9 + 1) / 2)
    assert attention_vector(f).norm(dim=1).item() == pytest.approx(1.0)


def test_centre_heatmap_peaks_at_the_centre():
    heat = centre_heatmap(torch.tensor([[0.75, -0.25]]), 4, 0.5)  # pixel centres -0.75, -0.25, 0.25, 0.75
    assert heat.shape == (1, 4, 4) and heat[0, 1, 3] == pytest.approx(1.0)
    assert heat[0].argmax().item() == 1 * 4 + 3


def test_attention_centre_term_normalized_by_its_chance_value():
    stage = torch.zeros(2, 1, 2, 2)
    stage[0, 0, 0, 0] = 1.0    # centre (-0.5, -0.5)
    stage[1, 0, 1, 1] = 1.0    # centre (0.5, 0.5)
    generator = SimpleNamespace(last_centres=torch.tensor([[-0.5, -0.5], [0.0, 0.5]]), centre_range=0.5)
    step = Step(torch.zeros(2, 1), None, teacher_logits=torch.zeros(2, 3), teacher_features={"stages": [stage]})
    term = AttentionCentre()
    term.bind(generator=generator)
    distance = (0.0 + 0.25) / 2
    assert float(term(step)) == pytest.approx(distance / (2 * 0.25 / 3))
    raw = AttentionCentre(normalize=False)
    raw.bind(generator=generator)
    assert float(raw(step)) == pytest.approx(distance)
    with pytest.raises(ValueError, match="needs the run's generator"):
        AttentionCentre()(step)


def test_pair_term_sign_pushes_pairs_apart():
    same = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])   # pairs (0, 2), (1, 3) identical
    apart = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # orthogonal pairs
    assert float(pair_similarity(same)) == pytest.approx(1.0)
    assert float(pair_similarity(apart)) == pytest.approx(0.0)
    # minimized by the generator: a gradient step on the term moves the two samples of a pair apart
    feats = torch.tensor([[1.0, 0.2], [1.0, 0.3]], requires_grad=True)
    pair_similarity(feats).backward()
    moved = (feats - 0.5 * feats.grad).detach()
    assert float(pair_similarity(moved)) < float(pair_similarity(feats.detach()))
    step = Step(torch.zeros(4, 1), None, teacher_logits=torch.zeros(4, 3), teacher_features={"penultimate": same})
    assert float(PairDiversity()(step)) == pytest.approx(1.0)
    unpaired = PairDiversity()
    unpaired.bind(generator=SimpleNamespace(last_centres=torch.rand(4, 2)))
    with pytest.raises(ValueError, match="needs same-condition pairs"):
        unpaired(step)


def _staged_model():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        stage1=nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        stage2=nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.BatchNorm2d(6), nn.ReLU()),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(6, 5)))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_attention_consistency_is_zero_at_the_running_statistics_and_leaves_them_untouched():
    model = _staged_model()
    x = torch.randn(8, 3, 8, 8)
    tap = FeatureTap(model, {"stages"})
    term = AttentionConsistency()
    term.bind(teacher=model)

    def value():
        step = Step(x, None, teacher=model, taps=(tap, tap))
        return float(term(step).detach())

    before = [b.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
              for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
    assert value() > 1e-6
    after = [b for m in model.modules() if isinstance(m, nn.BatchNorm2d)
             for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and not any(
        m.training for m in model.modules())
    # set every BN's running statistics to this batch's (biased) statistics: train mode == eval mode
    with torch.no_grad():
        h = x
        for stage in (model.stage1, model.stage2):
            conv, bn = stage[0], stage[1]
            pre = conv(h)
            var, mean = torch.var_mean(pre, dim=(0, 2, 3), unbiased=False)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            h = stage(h)
    assert value() == pytest.approx(0.0, abs=1e-9)
    with batch_statistics(model):
        assert all(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert not any(m.training for m in model.modules())


def test_acq_generator_draws_same_condition_pairs():
    g = GENERATORS["acq"](10, (3, 16, 16), latent_dim=8, centre_range=0.25)
    s = g.sample(6, torch.Generator().manual_seed(0))
    assert isinstance(s, CentredSample)
    assert torch.equal(s.labels[:3], s.labels[3:]) and torch.equal(s.centres[:3], s.centres[3:])
    assert not torch.equal(s.z[:3], s.z[3:]) and float(s.centres.abs().max()) <= 0.25
    out = g(s.to(torch.device("cpu")))
    assert out.shape == (6, 3, 16, 16) and torch.equal(g.last_centres, s.centres)
    with pytest.raises(ValueError, match="batch size must be even, not 5"):
        g.sample(5, torch.Generator())
    with pytest.raises(ValueError, match="centre_range=2"):
        GENERATORS["acq"](10, (3, 16, 16), centre_range=2)
    big = GENERATORS["acq"](10, (3, 96, 96), latent_dim=8)  # ImageNet-sized: labels in conditional BNs
    assert big(big.sample(2, torch.Generator().manual_seed(0))).shape == (2, 3, 96, 96)


# ---------------------------------------------------------------------------------------------- the yamls
@pytest.mark.parametrize("name", ["ddaq", "acq"])
def test_yaml_composes_builds_and_is_labelled_a_reconstruction(name):
    cfg = compose_cfg(f"method={name}")
    method = build_method(cfg)
    assert method.name == name and method.fidelity == "reconstruction" and method.source["code"] == "none"
    assert len(method.source["inferred"]) >= 8
    assert build_convention(cfg, method).name == "gdfq"
    terms = {n: t.weight for n, t in method.generator_terms}
    if name == "ddaq":
        assert isinstance(method, DDAQ) and method.spec["importance"]["prior"] == "sensitivity"
        assert terms == {"ce": 1.0, "importance_bns": 0.1, "layer_discrepancy": 0.1}  # GDFQ's bns replaced
    else:
        assert isinstance(method, ACQ) and method.generator_spec["name"] == "acq"
        assert terms == {"ce": 1.0, "bns": 0.1, "attention_centre": 1.0, "pair_diversity": 0.1,
                         "attention_consistency": 500.0}
    assert {n: t.weight for n, t in method.student_terms} == {"kd": 1.0, "ce": 1.0}


def test_yaml_refusals():
    with pytest.raises(ValueError, match="needs a convention that keeps BatchNorm"):
        _convention("quant=dfq")
    with pytest.raises(ValueError, match="method.importance.prior='size' is not valid"):
        build_method(compose_cfg("method=ddaq", "method.importance.prior=size"))
    with pytest.raises(ValueError, match="batch_size must be even, not 15"):
        build_method(compose_cfg("method=acq", "schedule=smoke", "schedule.batch_size=15"))
    with pytest.raises(ValueError, match="method.generator.name=acq, not 'gdfq'"):
        build_method(compose_cfg("method=acq", "method.generator.name=gdfq", "~method.generator.centre_range",
                                 "~method.generator.centre_sigma"))


# ---------------------------------------------------------------------------------------------- end to end
def _ctx(convention, shape):
    return QuantContext(convention, 4, 4, 0, torch.device("cpu"), shape, 5, progress=False)


def test_ddaq_trains_a_tiny_model_on_the_smoke_schedule():
    cfg = compose_cfg("method=ddaq", "schedule=smoke")
    method = build_method(cfg)
    ctx = _ctx(build_convention(cfg, method), (3, 8, 8))
    student = method.quantize(tiny_bn_model(), ctx)
    assert student(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    prior = ctx.info["layer_importance"]
    assert prior["prior"] == "sensitivity" and len(prior["weights"]) == 2
    assert sum(prior["weights"]) == pytest.approx(1.0, abs=1e-5)
    assert math.isfinite(ctx.info["training"]["final_losses"]["G"])


def test_acq_trains_a_tiny_staged_model_on_the_smoke_schedule():
    cfg = compose_cfg("method=acq", "schedule=smoke")
    method = build_method(cfg)
    ctx = _ctx(build_convention(cfg, method), (3, 8, 8))
    model = _staged_model()
    before = [b.clone() for b in model.buffers()]
    student = method.quantize(model, ctx)
    assert student(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    assert math.isfinite(ctx.info["training"]["final_losses"]["G"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))  # the teacher's BN statistics kept


@pytest.mark.parametrize("name", ["ddaq", "acq"])
def test_runs_end_to_end_on_the_shared_teacher(name, tmp_path, cache_dir, cifar10_root, teacher):
    from dfqbench.runner import run

    record = run(compose_cfg(f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}",
                             "dataset.max_samples=200", f"paths.cache_dir={cache_dir}", "schedule=smoke",
                             "threads=1", f"method={name}"), tmp_path)
    assert record["method"] == name and 0 <= record["top1"] <= 100
    assert record["fidelity"] == "reconstruction"
    if name == "ddaq":
        assert len(record["info"]["layer_importance"]["weights"]) == 21  # ResNet-20's BatchNorm2d layers
