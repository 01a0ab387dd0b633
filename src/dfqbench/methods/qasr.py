"""Q-ASR (Kim et al., "Integer-only Zero-shot Quantization for Efficient Speech Recognition", ICASSP 2022;
kssteven418/Q-ASR@aa1ec2e): synthetic data from BatchNorm statistics by a Gaussian KL (`synth.bn_kl`), then
calibration of the activation ranges only, on the synthetic batches.

Calibration follows the code's QuantAct in calibration mode: each batch's range (min/max, or the
percentile of `quant.act.percentile` when `quant.act.estimator=percentile`) is merged into the running range by
an exponential moving average, ``range = momentum * range + (1 - momentum) * batch range`` (momentum 0.95, the
QuantAct default; the first batch initializes it; momentum -1: running min/max). Weights are never calibrated on
data (their grids come from the weights). The integer-only quantizer is the convention (`quant=qasr`).
"""

from __future__ import annotations

import torch

from ..quant import act_quantizers
from ..synth.bn_kl import QASRSettings, qasr_synthetic_data
from ..synth.calib_data import SOURCES, cached, calibration_batches
from .base import CalibrationMethod
from ..settings import check_int, check_number


@torch.no_grad()
def calibrate_ema(model: torch.nn.Module, batches, momentum: float) -> None:
    """Activation ranges as Q-ASR's QuantAct sets them: per batch, each quantizer's range over that batch (its
    estimator), merged by EMA with `momentum` (-1: running min / max). Ranges a convention fixes (the pixels)
    are left alone. While a batch is observed, the quantizers upstream quantize with that batch's own range (the
    code: with the EMA range updated by that batch)."""
    quantizers = [q for q in act_quantizers(model) if q.enabled]
    running: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    model.eval()
    for x in batches:
        for q in quantizers:
            q.start_observing()  # forgets the range: this batch's own, from the estimator
        model(x)
        for q in quantizers:
            q.stop_observing()
            if q.fixed or not q.calibrated:
                continue
            lo, hi = q.lo.detach().clone(), q.hi.detach().clone()
            if q in running:
                old_lo, old_hi = running[q]
                if momentum == -1:
                    lo, hi = torch.minimum(old_lo, lo), torch.maximum(old_hi, hi)
                else:
                    lo, hi = old_lo * momentum + lo * (1 - momentum), old_hi * momentum + hi * (1 - momentum)
            running[q] = (lo, hi)
    for q, (lo, hi) in running.items():
        q.set_range(lo, hi)


class QASR(CalibrationMethod):
    stochastic = True

    def __init__(self, name: str = "qasr", batch_size: int = 8, num_batches: int = 50, iterations: int = 200,
                 lr: float = 0.01, patience: int = 25, min_lr: float = 1e-4, init_range: float = 0.3,
                 momentum: float = 0.95, calib_data: str = "synthetic", **kwargs):
        super().__init__(name, **kwargs)
        for key, value in (("batch_size", batch_size), ("num_batches", num_batches), ("iterations", iterations),
                           ("patience", patience)):
            check_int(f"method.{key}", value)
        for key, value in (("lr", lr), ("min_lr", min_lr), ("init_range", init_range)):
            check_number(f"method.{key}", value, strict=True)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (
                momentum == -1 or 0 <= momentum < 1):
            raise ValueError(f"method.momentum={momentum!r} is not valid; use a number in [0, 1) (the EMA of the "
                             f"activation ranges; 0.95 = Q-ASR's QuantAct) or -1 (running min/max)")
        self.settings = QASRSettings(batch_size, num_batches, iterations, float(lr), patience, float(min_lr),
                                     float(init_range))
        self.momentum = float(momentum)
        # synthetic = Q-ASR's data; any dfqbench.synth.calib_data source (real, noise, ...) for ablations
        if calib_data != "synthetic" and calib_data not in SOURCES:
            raise ValueError(f"method.calib_data={calib_data!r} is not a known calibration source; choose one of: "
                             f"synthetic, {', '.join(SOURCES)}")
        self.calib_data = calib_data

    def calibration_data(self, model, ctx):
        s = self.settings
        if self.calib_data != "synthetic":
            return calibration_batches(self.calib_data, model, ctx, s.batch_size * s.num_batches, s.batch_size)
        ctx.info["calib_data"] = "qasr_synthetic"
        return cached(ctx, "qasr", vars(s), lambda: qasr_synthetic_data(
            model, ctx.input_shape, s, ctx.generator(), ctx.device, ctx.progress))

    def calibrate(self, qmodel, batches):
        calibrate_ema(qmodel, batches, self.momentum)
