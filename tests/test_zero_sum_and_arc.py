"""AdaSG/AdaDFQ's zero-sum losses and AutoReCon's searched generator: hand-computed values, then smoke runs."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg
from dfqbench.runner import build_method, run
from dfqbench.train.generators import ConditionalBN, ConditionalGenerator, SuperposedGenerator
from dfqbench.train.generators.arc import GENOTYPES, SearchedGenerator, auto_genotype, resolve_genotype
from dfqbench.train.losses import (AdaptabilityMargin, AgreementCE, DifferenceEntropy, DisagreementCE, Step,
                                   difference_entropy)

SMOKE = ["schedule=smoke", "threads=1", "progress=false"]
# W4A4 smoke runs on the first 200 test images, the lowest top-1 of seeds 0, 1, 2 (seed 0: 75.0, 77.5, 72.5, 79.5)
SMOKE_TOP1 = {"adasg": 74.0, "adadfq": 67.5, "arc": 72.5, "arc_ait": 75.5}


def _step(teacher, student, targets=None):
    step = Step(student, targets, teacher_logits=teacher)
    step._student_logits = student
    return step


# ---------------------------------------------------------------------------------------------- losses
def test_difference_entropy_is_log_c_when_the_student_matches_up_to_a_constant():
    teacher = torch.tensor([[1.0, 2.0, 3.0]])
    assert difference_entropy(teacher, teacher + 5.0).item() == pytest.approx(math.log(3), rel=1e-6)
    # (t - s) = [ln 3, 0]: softmax = [3/4, 1/4]
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    t = torch.tensor([[math.log(3.0), 0.0]])
    assert difference_entropy(t, torch.zeros(1, 2)).item() == pytest.approx(h, rel=1e-6)
    # the student loss: -T^2 * entropy at temperature T
    step = _step(2 * t, torch.zeros(1, 2))
    assert DifferenceEntropy(temperature=2)(step).item() == pytest.approx(-4 * h, rel=1e-6)


def test_disagreement_and_agreement_terms_are_ce_of_the_logit_difference_and_sum():
    teacher, student = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0]])
    step = _step(teacher, student, targets)
    assert DisagreementCE()(step).item() == pytest.approx(-F.log_softmax(torch.tensor([1.0, -1.0]), 0)[0].item())
    assert AgreementCE()(step).item() == pytest.approx(-F.log_softmax(torch.tensor([3.0, 1.0]), 0)[0].item())


def test_adaptability_margin_hinges_the_min_max_rescaled_entropy():
    # three samples over C = 2 classes with (t - s) = [d, 0]: entropies h(d); rescaled (h - min) / (ln 2 - min)
    d = torch.tensor([0.0, 1.0, 4.0])
    teacher = torch.stack([d, torch.zeros(3)], dim=1)
    h = difference_entropy(teacher, torch.zeros(3, 2))
    scaled = (h - h.min()) / (math.log(2) - h.min())  # [1, s, 0] with 0 < s < 1
    assert scaled[0].item() == pytest.approx(1.0) and scaled[2].item() == pytest.approx(0.0)
    lower, upper = 0.3, 0.8
    expected = (F.relu(lower - scaled).sum() + F.relu(scaled - upper).sum()) / 3
    term = AdaptabilityMargin(lower=lower, upper=upper)
    assert term(_step(teacher, torch.zeros(3, 2))).item() == pytest.approx(expected.item(), rel=1e-6)
    s1 = scaled[1].item()  # sample 0 is 0.2 above the band, sample 2 is 0.3 below it
    assert expected.item() == pytest.approx((0.2 + 0.3 + max(0.0, lower - s1) + max(0.0, s1 - upper)) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="lower=0.9 must not exceed upper=0.8"):
        AdaptabilityMargin(lower=0.9, upper=0.8)
    with pytest.raises(ValueError, match=r"upper=1.5 must be a number in \[0, 1\]"):
        AdaptabilityMargin(upper=1.5)


def test_adaptability_margin_is_finite_when_every_sample_is_at_maximum_entropy():
    logits = torch.randn(4, 10)
    value = AdaptabilityMargin(lower=0.3)(_step(logits, logits))
    assert torch.isfinite(value) and value.item() == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------- ARC generator
def test_arc_genotypes_have_the_searched_counts_and_names():
    for name, g in GENOTYPES.items():
        assert resolve_genotype(name) == g
        assert (len(g["up"]), len(g["ops"]), len(g["cross"])) == (6, 15, 12)
    assert GENOTYPES["cifar10"]["ops"][:5] == ["dil_conv_5x5", "none", "dil_conv_5x5", "dil_conv_3x3", "conv_5x5"]
    with pytest.raises(ValueError, match="genotype='cifar' is not valid; choose one of: cifar10, cifar100"):
        resolve_genotype("cifar")
    bad = dict(GENOTYPES["cifar10"], ops=["conv_7x7"] * 15)
    with pytest.raises(ValueError, match="genotype.ops must list 15 of"):
        resolve_genotype(bad)


def test_arc_auto_genotype_is_the_teachers_else_one_of_the_same_input_size():
    assert auto_genotype("resnet20_cifar100", 100, 32) == "cifar100"
    assert auto_genotype("mobilenetv2_w1", 1000, 224) == "mobilenetv2"
    assert auto_genotype("preresnet20_cifar10", 10, 32) == "cifar10"  # never searched: same input size
    assert auto_genotype("regnetx_002", 1000, 224) == "resnet18"
    assert SearchedGenerator(10, (3, 32, 32), model="resnet50", width=4).record_info == {"genotype": "resnet50"}


def test_arc_generator_output_is_normalized_and_label_conditioned():
    g = SearchedGenerator(10, (3, 32, 32), width=8).train()
    sample = g.sample(16, torch.Generator().manual_seed(0))
    images = g(sample)
    assert images.shape == (16, 3, 32, 32)
    var, mean = torch.var_mean(images, dim=(0, 2, 3), unbiased=False)
    assert mean.abs().max() < 1e-5 and var.max() <= 1.0  # BN(affine=False) on tanh outputs (eps 1e-5)
    # the labels act only through the class-conditional BNs: in eval mode (per-sample BN), changing one class's
    # scale changes the images of that class and no other
    g.eval()
    with torch.no_grad():
        before = g(sample)
        g.out_norm.scale.weight[int(sample.labels[0, 0])] *= 3.0
        changed = (g(sample) - before).abs().flatten(1).amax(1) > 1e-6
    assert torch.equal(changed, sample.labels[:, 0] == sample.labels[0, 0])
    with pytest.raises(ValueError, match="divisible by 8"):
        SearchedGenerator(10, (3, 36, 36))


# ---------------------------------------------------------------------------------------------- methods
def test_yamls_compose_adasg_adadfq_arc():
    adasg, adadfq, arc, arc_ait = (build_method(compose_cfg(f"method={m}"))
                                   for m in ("adasg", "adadfq", "arc", "arc_ait"))
    terms = dict(adasg.generator_terms)
    assert set(terms) == {"bns", "adaptability_margin", "disagreement_ce", "agreement_ce"}
    assert (terms["bns"].weight, terms["disagreement_ce"].weight, terms["adaptability_margin"].lower) == (1.0, 0.1, 0.3)
    assert [n for n, _ in adasg.student_terms] == ["difference_entropy"]
    terms = dict(adadfq.generator_terms)
    assert (terms["adaptability_margin"].lower, terms["disagreement_ce"].weight, terms["agreement_ce"].weight) == \
        (0.1, 0.2, 0.1)
    assert arc.generator_spec["name"] == "arc" and arc.generator_spec["genotype"] == "auto"
    assert arc.generator_spec["model"] == "resnet20_cifar10"
    assert [n for n, _ in arc.student_terms] == ["kd", "ce"] and arc.settings.inundation_threshold is None
    assert [n for n, _ in arc_ait.student_terms] == ["kd"] and arc_ait.settings.inundation_threshold == 1e-3
    assert compose_cfg("schedule=paper_adasg").schedule.batch_size == 16


@pytest.mark.parametrize("method", ["adasg", "adadfq", "arc", "arc_ait"])
def test_smoke_run_on_the_shared_teacher(tmp_path, cache_dir, cifar10_root, teacher, method):
    cfg = compose_cfg(f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}", "dataset.max_samples=200",
                      f"paths.cache_dir={cache_dir}", *SMOKE, f"method={method}", "wbit=4", "abit=4")
    record = run(cfg, tmp_path)
    assert record["status"] == "done" and set(record["info"]["training"]["final_losses"]) == {"G", "S"}
    if method.startswith("arc"):
        assert record["info"]["generator"] == {"genotype": "cifar10"}
    # at most 5 points below the lowest seed measured (FP32 82.5, RTN W4A4 79.5); floor rounding gives 12.5
    assert SMOKE_TOP1[method] - 5.0 <= record["top1"] <= record["fp32_top1"]


# ---------------------------------------------------------------------------------------------- ImageNet generators
def test_conditional_bn_mixes_superposed_labels_with_a_mean_over_components():
    cbn = ConditionalBN(3, 2)
    with torch.no_grad():
        cbn.scale.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
        cbn.shift.weight.zero_()
    cbn.bn.eval()  # running stats 0 / 1: the BN is the identity up to eps
    x = torch.ones(1, 2, 1, 1)
    out = cbn(x, torch.tensor([[0, 2]]), torch.tensor([[0.25, 0.75]]))
    expected = torch.tensor([(0.25 * 1 + 0.75 * 5) / 2, (0.25 * 2 + 0.75 * 6) / 2]) / math.sqrt(1 + 1e-5)
    assert torch.allclose(out.flatten(), expected, rtol=1e-6)
    assert torch.allclose(cbn(x, torch.tensor([1])).flatten(), torch.tensor([3.0, 4.0]) / math.sqrt(1 + 1e-5))


def test_imagenet_sized_inputs_get_the_lineages_conditional_bn_generators():
    gdfq = ConditionalGenerator(10, (3, 96, 96), latent_dim=8)
    assert gdfq.conditional_bn and not hasattr(gdfq, "embedding")  # GDFQ ImageNet: labels only through the BNs
    assert not ConditionalGenerator(10, (3, 32, 32), latent_dim=8).conditional_bn
    qimera = SuperposedGenerator(10, (3, 16, 16), latent_dim=8, conditional_bn=True, mix_prob=1.0)
    rng = torch.Generator().manual_seed(0)
    for g in (gdfq, qimera):
        sample = g.sample(6, rng)
        images = g(sample)
        assert images.shape == ((6, 3, 96, 96) if g is gdfq else (6, 3, 16, 16))
        g.eval()
        with torch.no_grad():  # per-sample BN in eval mode: one class's scale changes only images with that class
            before = g(sample)
            label = int(sample.labels[0, 0])
            g.trunk.norm2.scale.weight[label] *= 2.0
            changed = (g(sample) - before).abs().flatten(1).amax(1) > 1e-6
        assert torch.equal(changed, (sample.labels == label).any(dim=1))
    with pytest.raises(ValueError, match="conditional_bn='yes' is not valid; choose one of: auto, true, false"):
        ConditionalGenerator(10, (3, 32, 32), conditional_bn="yes")


def test_for_small_differences_the_zero_sum_student_loss_is_c_times_gdfqs_kd():
    # -T^2 H(softmax(d / T)) = -T^2 log C + Var_c(d) / 2 + O(d^3): a centred-logit MSE, while GDFQ's KD
    # (element-mean KL * T^2) is Var_c(d) / (2 C): the two pull the student C times apart
    from dfqbench.train.losses import DistillationKL

    teacher = torch.tensor([[0.3, -0.2, 0.1, 0.0, -0.4, 0.2, 0.05, -0.1, 0.15, -0.05]], dtype=torch.float64)
    student = torch.zeros(1, 10, dtype=torch.float64)  # float64: the entropy term is a small difference of ~921
    var = (teacher - student).var(unbiased=False).item()
    step = _step(teacher, student)
    entropy_term = DifferenceEntropy(temperature=20)(step).item() + 400 * math.log(10)
    assert entropy_term == pytest.approx(var / 2, rel=1e-2)
    assert DistillationKL(temperature=20, reduction="mean")(step).item() == pytest.approx(var / 20, rel=1e-2)
