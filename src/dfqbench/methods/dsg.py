"""DSG, post-training variant (Zhang et al., CVPR 2021): one batch of diverse synthetic images (slack BN
alignment + layer-wise sample enhancement, `dfqbench.synth.dsg`), then one calibration pass of the activation
ranges, which are then frozen. Any calibration source can replace the DSG batch (`calib_data`)."""

from __future__ import annotations

import torch
from torch import nn

from ..quant.calibration.calibrate import calibrate_on_batches, forward_with_hooks
from ..quant.quantizers.ranges import ESTIMATORS
from ..quant.transforms.wrap import act_quantizers
from ..synth.calib_data import calibration_batches, check_source
from ..synth.dsg import DSGSettings, dsg_batches
from .base import CalibrationMethod
from ..settings import check_int

RANGES = ("ema", *ESTIMATORS, "convention")


class DSG(CalibrationMethod):
    stochastic = True
    time_key = "distill_time_s"

    def __init__(self, name: str = "dsg", calib_data: str = "dsg", num_images: int = 40, batch_size: int = 40,
                 iterations: int = 500, lr: float = 0.9, patience: int = 260, min_lr: float = 1e-4,
                 margins: str = "none", margin_percentile: float = 90.0, enhance_weight: float = 2.0,
                 ce_weight: float = 2.0, tv_weight: float = 0.01, l2_weight: float = 0.01, range: str = "ema",
                 percentile: float = 99.999, enhance: str = "official", enhance_layers: int = 20, **kwargs):
        super().__init__(name, **kwargs)
        self.calib_data = check_source(calib_data)
        check_int("method.num_images", num_images)
        if range not in RANGES:
            raise ValueError(f"method.range={range!r} is not valid; choose one of: {', '.join(RANGES)}")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"method.percentile={percentile!r} must be in (0, 100]")
        self.settings = DSGSettings(batch_size, 1, iterations, lr, patience, min_lr, margins, margin_percentile,
                                    enhance_weight, ce_weight, tv_weight, l2_weight, enhance, enhance_layers)
        self.settings.validate()
        self.num_images, self.range, self.percentile = num_images, range, percentile

    def quantize(self, model, ctx):
        ctx.info["act_range"] = self.range
        return super().quantize(model, ctx)

    def calibration_data(self, model, ctx):
        if self.calib_data != "dsg":
            return calibration_batches(self.calib_data, model, ctx, self.num_images, self.settings.batch_size)
        ctx.info.update(calib_data="dsg", calib_images=self.num_images)  # this method's generation settings
        return dsg_batches(model, ctx, self.settings, self.num_images)

    def calibrate(self, qmodel, batches):
        calibrate(qmodel, batches, self.range, self.percentile)


def calibrate(model: nn.Module, batches: list[torch.Tensor], method: str, percentile: float = 99.999) -> None:
    """One observe-and-quantize pass over `batches`, then frozen ranges. `ema` is DSG's default (below);
    minmax / percentile / mse switch every activation quantizer to that shared estimator for this pass;
    `convention` keeps the preset's estimator."""
    if method == "ema":
        calibrate_ema(model, batches)
        return
    if method != "convention":
        for q in act_quantizers(model):
            q.estimator, q.percentile = method, percentile
    calibrate_on_batches(model, batches)


@torch.no_grad()
def calibrate_ema(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """DSG's `ema` range: per batch, the mean over samples of each sample's min and max; across batches a
    running min / max that starts at 0 (as ZeroQ's). Each quantizer quantizes with its range as it goes, so
    later layers are calibrated on quantized inputs."""
    running: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(q, inputs):
        flat = inputs[0].detach().float().flatten(1)
        lo, hi = flat.min(dim=1).values.mean().clamp(max=0.0), flat.max(dim=1).values.mean().clamp(min=0.0)
        if q in running:
            lo, hi = torch.minimum(lo, running[q][0]), torch.maximum(hi, running[q][1])
        running[q] = (lo, hi)
        q.set_range(lo, hi)

    forward_with_hooks(model, [q.register_forward_pre_hook(observe) for q in act_quantizers(model) if q.enabled],
                       batches)
