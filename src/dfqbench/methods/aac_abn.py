"""AAC+ABN (He, Zhang, Wu, Zhou, "Data-Free Quantization with Accurate Activation Clipping and Adaptive Batch
Normalization", Neural Processing Letters 2023): a best-effort reconstruction from the abstract.

1. Highly responsive images: KW-style synthesis (`dfqbench.synth.kw`) with the BN-statistics KL and a CE term
   towards balanced target classes; of `num_images / keep` candidates the `num_images` whose target class the
   teacher gives the highest probability are kept (the images the network responds to most).
2. AAC: each activation quantizer's upper clip is the peak of its float input on those images: per image the
   maximum over channels and positions (per channel for per-channel quantizers), reduced over the images by
   `peak` (max | mean); the lower end is the minimum (0 after a ReLU).
3. ABN (`abn: shift`, default): on the same images, each BN input's mean and variance in the quantized model
   against the teacher's; the BN's running mean moves by the difference and its variance scales by the ratio,
   undoing the shift quantization adds while keeping the BN's own (real-data) statistics. `abn: reestimate`
   re-estimates the running statistics from the synthetic images outright (measured worse: the images' BN
   statistics only approximate the real data's; records under results/superseded/2026-12-03-aac_abn-reestimate/).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import quantize_model
from ..quant.calibration.calibrate import calibrate_on_batches, forward_with_hooks
from ..quant.quantizers import ActQuantizer
from ..synth.calib_data import _split
from ..synth.kw import KWSettings, kw_images
from .base import Method
from ..settings import check_int

PEAKS = ("max", "mean")
ABN_MODES = ("shift", "reestimate", False)


@torch.no_grad()
def peak_ranges(qmodel: nn.Module, batches: list[torch.Tensor], peak: str) -> int:
    """Set every enabled, uncalibrated activation quantizer's range from its float input over `batches`:
    lo = the minimum, hi = the per-image peak reduced by `peak` (max | mean). Returns how many were set."""
    quantizers = [q for q in qmodel.modules() if isinstance(q, ActQuantizer) and q.enabled and not q.fixed]
    peaks: dict[ActQuantizer, list[torch.Tensor]] = {q: [] for q in quantizers}
    lows: dict[ActQuantizer, list[torch.Tensor]] = {q: [] for q in quantizers}

    def keep(q, inputs):
        x = inputs[0].detach().float()
        flat = x.transpose(0, 1).reshape(x.shape[1], x.shape[0], -1) if q.per_channel and x.dim() > 2 else \
            x.reshape(1, x.shape[0], -1)  # [C or 1, images, values]
        peaks[q].append(flat.amax(dim=2))
        lows[q].append(flat.amin(dim=(1, 2)))

    # uncalibrated quantizers pass their input through: the hooks see float activations
    forward_with_hooks(qmodel, [q.register_forward_pre_hook(keep) for q in quantizers], batches)
    for q in quantizers:
        per_image = torch.cat(peaks[q], dim=1)
        hi = per_image.amax(dim=1) if peak == "max" else per_image.mean(dim=1)
        lo = torch.stack(lows[q]).amin(dim=0)
        q.set_range(lo.squeeze(0) if not q.per_channel else lo, hi.squeeze(0) if not q.per_channel else hi)
    return len(quantizers)


@torch.no_grad()
def adapt_batchnorm(qmodel: nn.Module, batches: list[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running mean/var on `batches` through the quantized model (cumulative
    average, as momentum=None), the rest of the model in eval mode. Returns the number of BN layers."""
    bns = [m for m in qmodel.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    qmodel.eval()
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for x in batches:
            qmodel(x)
    finally:
        for bn, momentum in zip(bns, saved):
            bn.momentum = momentum
            bn.eval()
    return len(bns)


@torch.no_grad()
def bn_input_moments(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BatchNorm (by module name): the channel mean and biased variance of its input over `batches`."""
    sums: dict[str, list] = {}

    def keep(name):
        def hook(bn, inputs):
            x = inputs[0].detach().float().transpose(0, 1).reshape(inputs[0].shape[1], -1)
            s = sums.setdefault(name, [0.0, 0.0, 0])
            s[0], s[1], s[2] = s[0] + x.sum(1), s[1] + x.pow(2).sum(1), s[2] + x.shape[1]
        return hook

    forward_with_hooks(model, [m.register_forward_pre_hook(keep(n)) for n, m in model.named_modules()
                               if isinstance(m, nn.modules.batchnorm._BatchNorm)], batches)
    return {n: (s0 / n_, s1 / n_ - (s0 / n_) ** 2) for n, (s0, s1, n_) in sums.items()}


@torch.no_grad()
def shift_batchnorm(teacher: nn.Module, qmodel: nn.Module, batches: list[torch.Tensor]) -> int:
    """ABN as a correction: on the same images, each BN input's statistics in the quantized model against the
    teacher's; the running mean moves by the difference and the running variance scales by the ratio, so the
    BN keeps its (real-data) statistics and undoes only the shift quantization adds. Layer by layer in forward
    order: a layer is measured after the layers before it are corrected (measuring all at once over-corrects
    the later layers for an upstream shift that the upstream correction removes). Returns the BN count."""
    fp = bn_input_moments(teacher, batches)
    bns = dict((n, m) for n, m in qmodel.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    for name, bn in bns.items():  # in forward order, each measured after the ones before it are corrected
        (m_fp, v_fp), (m_q, v_q) = fp[name], bn_input_moments(qmodel, batches)[name]
        bn.running_mean.add_(m_q - m_fp)
        bn.running_var.mul_((v_q + bn.eps) / (v_fp + bn.eps))
    return len(bns)


@torch.no_grad()
def most_responsive(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, n: int, batch_size: int):
    """The `n` images whose label the teacher gives the highest probability, in their original order."""
    probs = torch.cat([F.softmax(model(x), dim=1).gather(1, y[:, None]).squeeze(1)
                       for x, y in zip(images.split(batch_size), labels.split(batch_size))])
    keep = probs.topk(n).indices.sort().values
    return images[keep], probs[keep]


class AACABN(Method):
    stochastic = True

    def __init__(self, name: str = "aac_abn", num_images: int = 32, keep: float = 0.5, peak: str = "max",
                 aac: bool = True, abn: str | bool = "shift", synthesis: dict | None = None, **kwargs):
        super().__init__(name, **kwargs)
        check_int("method.num_images", num_images)
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise ValueError(f"method.keep={keep!r} must be a number in (0, 1]")
        if peak not in PEAKS:
            raise ValueError(f"method.peak={peak!r} is not valid; choose one of: {', '.join(PEAKS)}")
        if abn is True or abn not in ABN_MODES:
            raise ValueError(f"method.abn={abn!r} is not valid; choose one of: shift, reestimate, false")
        self.num_images, self.keep, self.peak, self.aac, self.abn = num_images, float(keep), peak, aac, abn
        spec = {"scheme": "bn_stats", "bn_weight": 1.0, "ce_weight": 1.0, **(synthesis or {})}
        try:
            self.settings = KWSettings(**spec).validate("method.synthesis.")
        except TypeError:
            raise ValueError(f"method.synthesis has unknown keys {sorted(set(spec) - set(KWSettings().__dict__))}; "
                             f"valid: {sorted(KWSettings().__dict__)}") from None

    def check_convention(self, convention) -> None:
        if self.abn and convention.fold_bn:
            raise ValueError(f"method=aac_abn: ABN re-estimates BatchNorm layers, but quant={convention.name} "
                             f"folds them (fold_bn: true); use a convention that keeps BN (quant=gdfq) or "
                             f"method.abn=false")

    def quantize(self, model, ctx):
        t0 = time.perf_counter()
        candidates = round(self.num_images / self.keep)
        images = kw_images(model, ctx, candidates, self.settings)
        labels = (torch.arange(candidates) % ctx.num_classes).to(images.device)
        images, probs = most_responsive(model, images, labels, self.num_images, self.settings.batch_size)
        batches = _split(images, self.settings.batch_size)
        ctx.info.update(calib_data="aac_responsive", calib_images=self.num_images, candidates=candidates,
                        kept_min_target_prob=round(float(probs.min()), 4), synth_time_s=round(time.perf_counter()
                                                                                             - t0, 3))
        qmodel = quantize_model(model, ctx.convention, ctx.wbit, ctx.abit)
        if self.aac:
            ctx.info["aac_quantizers"] = peak_ranges(qmodel, batches, self.peak)
        else:  # min/max observed while quantizing (ZeroQ's calibration) on the same images
            calibrate_on_batches(qmodel, batches)
        if self.abn == "shift":
            ctx.info["abn_layers"] = shift_batchnorm(model, qmodel, batches)
        elif self.abn == "reestimate":
            ctx.info["abn_layers"] = adapt_batchnorm(qmodel, batches)
        return qmodel
