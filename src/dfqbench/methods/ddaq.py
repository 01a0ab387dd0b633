"""DDAQ (Li, Ma, Long, Xiao, Gu, "Dual-discriminator adversarial framework for data-free quantization",
Neurocomputing 511:67-77, 2022): a best-effort RECONSTRUCTION from the abstract (no code, no paper text here).

The abstract: a generator steered by two "discriminators", (a) BN-distribution matching and (b) maximising the
FP-vs-quantized discrepancy, both weighted by a layer-importance prior; the quantized model is then trained with
FP supervision. Built on GDFQ's frame (conf/method/ddaq.yaml extends gdfq.yaml):

    generator:  CE(T(x), y) + 0.1 * sum_l w_l [MSE(mu_l, mu^_l) + MSE(var_l, var^_l)]              (importance_bns)
                            - 0.1 * sum_l w_l ||F^S_l(x) - F^T_l(x)||^2 / ||F^T_l(x)||^2     (layer_discrepancy)
    student:    GDFQ's KD (T = 20) + CE

with F_l the input of the l-th BatchNorm (execution order) of the teacher T and the quantized student S, and w the
layer-importance prior (sum_l w_l = 1; uniform w gives GDFQ's `bns` exactly). The prior (`importance.prior`):
`sensitivity` (default): w_l = s_l / sum s, s_l = ||T_l(x) - T(x)||^2 / ||T(x)||^2 the relative change of the
teacher's logits when the convolution feeding BN l alone has its weights quantized as the run quantizes them,
on a fixed batch of N(0, 1) images in the normalized input space (data-free, computed once per run);
`depth`: w_l proportional to l + 1; `uniform`: 1 / L.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from ..errors import UnsupportedModel
from ..quant import quantize_model
from ..quant.quantizers.layers import QuantLayer
from ..settings import check_int
from ..train.losses import GENERATOR_LOSSES, LossTerm
from ..train.registry import register
from .qat import GeneratorQAT

PRIORS = ("sensitivity", "depth", "uniform")


def normalized(weights) -> torch.Tensor:
    """Non-negative scores -> weights summing to 1 (all zero: uniform)."""
    w = torch.as_tensor(weights, dtype=torch.float64).clamp_min(0)
    if not len(w):
        raise ValueError("the layer-importance prior needs at least one BatchNorm layer")
    total = float(w.sum())
    return w / total if total > 0 and math.isfinite(total) else torch.full_like(w, 1.0 / len(w))


def depth_prior(num_layers: int) -> torch.Tensor:
    """w_l proportional to l + 1 (deeper BN layers weigh more), summing to 1."""
    return normalized(torch.arange(1, num_layers + 1, dtype=torch.float64))


class _Importance:
    """The layer weights a term reads: set by the DDAQ method before training (`set_importance`)."""

    importance: torch.Tensor | None = None

    def set_importance(self, weights) -> None:
        self.importance = normalized(weights)

    def weights(self, num_layers: int, like: torch.Tensor) -> torch.Tensor:
        if self.importance is None:
            raise ValueError(f"generator loss '{self.term_name}' needs the layer-importance prior that method "
                             f"ddaq sets (dfqbench.methods.ddaq.DDAQ); set_importance() was not called")
        if len(self.importance) != num_layers:
            raise UnsupportedModel(f"generator loss '{self.term_name}': the prior has {len(self.importance)} layer "
                                   f"weights, the model {num_layers} BatchNorm2d layers")
        return self.importance.to(dtype=like.dtype, device=like.device)


@register(GENERATOR_LOSSES, "importance_bns")
class ImportanceBNS(_Importance, LossTerm):
    """DDAQ's BN-distribution "discriminator" (reconstruction): GDFQ's BNS with the layer-importance prior as the
    per-layer weights, sum_l w_l [MSE(batch mean_l, running mean_l) + MSE(biased batch var_l, running var_l)] at
    the inputs of the teacher's BN layers (execution order); sum w = 1, so a uniform prior is GDFQ's `bns`."""

    needs_bn_stats = True
    term_name = "importance_bns"

    def __call__(self, step):
        stats = step.bn_stats
        if not stats:
            raise UnsupportedModel("generator loss 'importance_bns' needs a teacher with BatchNorm2d layers")
        per_layer = torch.stack([torch.nn.functional.mse_loss(m, rm) + torch.nn.functional.mse_loss(v, rv)
                                 for m, v, rm, rv in stats])
        return (self.weights(len(stats), per_layer) * per_layer).sum()


def relative_discrepancy(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """||S - T||^2 / ||T||^2 over the whole batch (a scale-free per-layer discrepancy)."""
    return (student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(eps)


@register(GENERATOR_LOSSES, "layer_discrepancy")
class LayerDiscrepancy(_Importance, LossTerm):
    """DDAQ's FP-vs-quantized "discriminator" (reconstruction): the generator MAXIMIZES the importance-weighted
    relative discrepancy between the quantized student's and the FP teacher's BN inputs,
    returns -sum_l w_l ||F^S_l - F^T_l||^2 / ||F^T_l||^2 (<= 0). `after_warmup` (default true): 0 without
    gradient during the schedule's warm-up epochs, while the quantized model is not trained (outside the trainer,
    Step.epoch None, the term is on)."""

    features = frozenset({"bn_inputs"})
    term_name = "layer_discrepancy"

    def __init__(self, weight: float = 0.1, after_warmup: bool = True):
        super().__init__(weight)
        if not isinstance(after_warmup, bool):
            raise ValueError(f"after_warmup={after_warmup!r} must be true or false")
        self.after_warmup, self.start_epoch = after_warmup, 0

    def bind_schedule(self, schedule) -> None:
        self.start_epoch = int(schedule.warmup_epochs) if self.after_warmup else 0

    def __call__(self, step):
        if step.epoch is not None and step.epoch < self.start_epoch:
            return step.teacher_logits.new_zeros(())
        student = step.student_feature_set["bn_inputs"]
        teacher = step.teacher_feature_set["bn_inputs"]
        if len(student) != len(teacher):
            raise UnsupportedModel(f"generator loss 'layer_discrepancy': the student has {len(student)} BatchNorm "
                                   f"inputs, the teacher {len(teacher)}")
        d = torch.stack([relative_discrepancy(s, t) for s, t in zip(student, teacher)])
        return -(self.weights(len(d), d) * d).sum()


# ---------------------------------------------------------------------------------------------- the prior
def bn_feeding_layers(model: nn.Module, x: torch.Tensor) -> list[str | None]:
    """Per BatchNorm2d in execution order, the qualified name of the Conv/Linear layer executed last before it
    (the layer that feeds it in a conv-BN network; None when no such layer ran before it)."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str | None] = []
    last: list[str | None] = [None]
    handles = []
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(lambda mod, i, o: last.__setitem__(0, names[mod])))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(lambda mod, i: order.append(last[0])))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order


@torch.no_grad()
def sensitivity_prior(model: nn.Module, convention, wbit: int, abit: int, input_shape, device,
                      probe_images: int = 64, probe_seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    """(weights summing to 1, raw scores s_l) per BatchNorm2d of `model` in execution order:
    s_l = ||T_l(x) - T(x)||^2 / ||T(x)||^2, T_l = the teacher with only the weights of the layer feeding BN l
    quantized by the run's weight quantizer (the convention's grid, first/last-layer bit-widths included), x a
    fixed batch of N(0, 1) images. BN layers with no feeding layer get the mean score of the others."""
    teacher = copy.deepcopy(model).eval().to(device)
    rng = torch.Generator().manual_seed(int(probe_seed))
    x = torch.randn(int(probe_images), *input_shape, generator=rng).to(device)
    feeding = bn_feeding_layers(teacher, x)
    if not feeding:
        raise UnsupportedModel("method ddaq needs a teacher with BatchNorm2d layers")
    # the teacher's own (unfolded) layers, quantized with the run's weight grid and per-layer bit-widths
    unfolded = dataclasses.replace(convention, fold_bn=False)
    quantized = quantize_model(copy.deepcopy(model).eval().to(device), unfolded, wbit, abit)
    qlayers = {n: m for n, m in quantized.named_modules() if isinstance(m, QuantLayer)}
    modules = dict(teacher.named_modules())
    reference = teacher(x)
    norm = float(reference.double().pow(2).sum())
    scores: dict[str, float] = {}
    for name in dict.fromkeys(n for n in feeding if n is not None):
        if name not in qlayers:  # e.g. a layer the convention leaves in float
            scores[name] = 0.0
            continue
        layer = modules[name]
        saved = layer.weight.detach().clone()
        layer.weight.copy_(qlayers[name].quantized_weight().detach())
        try:
            out = teacher(x)
        finally:
            layer.weight.copy_(saved)
        scores[name] = float((out.double() - reference.double()).pow(2).sum()) / max(norm, 1e-30)
    known = [scores[n] for n in feeding if n is not None]
    fill = sum(known) / len(known) if known else 1.0
    raw = [scores[n] if n is not None else fill for n in feeding]
    return normalized(raw), raw


class DDAQ(GeneratorQAT):
    """GDFQ's trainer with DDAQ's two importance-weighted generator terms; computes the layer-importance prior
    before training and hands it to every term that takes one (`set_importance`)."""

    def __init__(self, name: str = "ddaq", importance: dict | None = None, **kwargs):
        super().__init__(name=name, **kwargs)
        spec = {"prior": "sensitivity", "probe_images": 64, "probe_seed": 0, **dict(importance or {})}
        unknown = sorted(set(spec) - {"prior", "probe_images", "probe_seed"})
        if unknown:
            raise ValueError(f"method.importance: unknown setting(s) {unknown}; valid: "
                             f"['prior', 'probe_images', 'probe_seed']")
        if spec["prior"] not in PRIORS:
            raise ValueError(f"method.importance.prior={spec['prior']!r} is not valid; choose one of: "
                             f"{', '.join(PRIORS)}")
        for key, low in (("probe_images", 1), ("probe_seed", 0)):
            check_int(f"method.importance.{key}", spec[key], low)
        self.importance = spec
        self.spec["importance"] = spec  # in the checkpoint fingerprint

    def _weighted_terms(self) -> list[LossTerm]:
        return [t for _, t in (*self.generator_terms, *self.warmup_terms) if hasattr(t, "set_importance")]

    def check_convention(self, convention) -> None:
        if convention.fold_bn and any("bn_inputs" in t.features for t in self._weighted_terms()):
            raise ValueError("method=ddaq compares the FP and quantized models at every BatchNorm input: it needs a "
                             "convention that keeps BatchNorm (fold_bn: false, e.g. quant=gdfq or quant=brecq)")

    def layer_prior(self, model: nn.Module, ctx) -> tuple[torch.Tensor, list[float] | None]:
        prior = self.importance["prior"]
        if prior == "sensitivity":
            return sensitivity_prior(model, ctx.convention, ctx.wbit, ctx.abit, tuple(ctx.input_shape), ctx.device,
                                     self.importance["probe_images"], self.importance["probe_seed"])
        num = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        if not num:
            raise UnsupportedModel("method ddaq needs a teacher with BatchNorm2d layers")
        return (depth_prior(num) if prior == "depth" else normalized([1.0] * num)), None

    def quantize(self, model: nn.Module, ctx):
        self.check_convention(ctx.convention)
        weights, raw = self.layer_prior(model, ctx)
        for term in self._weighted_terms():
            term.set_importance(weights)
        ctx.info["layer_importance"] = {"prior": self.importance["prior"],
                                        "weights": [round(float(w), 6) for w in weights]}
        if raw is not None:
            ctx.info["layer_importance"]["sensitivity"] = [float(f"{s:.6g}") for s in raw]
        return super().quantize(model, ctx)
