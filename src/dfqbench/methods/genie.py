"""Genie (Jeon et al., CVPR 2023): zero-shot PTQ = distilled data from a generator with learnable latents
(`dfqbench.synth.genie`), then BRECQ/QDrop-style block reconstruction (`dfqbench.quant.calibration.reconstruct`: AdaRound
rounding, learned weight and LSQ activation steps, QDrop). The reconstruction takes any calibration source
(`calib_data`), so `calib_data=distill` is ZeroQ data + reconstruction (conf/method/zeroq_recon.yaml)."""

from __future__ import annotations

import time

from ..quant import quantize_model
from ..quant.calibration.reconstruct import ReconstructSettings, reconstruct
from ..synth.calib_data import calibration_batches, check_source
from ..synth.genie import GenieSettings, genie_source
from .base import Method
from ..settings import check_int


class Genie(Method):
    stochastic = True

    def __init__(self, name: str = "genie", calib_data: str = "genie", num_images: int = 1024,
                 calib_batch_size: int = 128, distill: dict | None = None, reconstruct: dict | None = None,
                 **kwargs):
        super().__init__(name, **kwargs)
        self.calib_data = check_source(calib_data)
        for key, value in (("num_images", num_images), ("calib_batch_size", calib_batch_size)):
            check_int(f"method.{key}", value)
        self.num_images, self.calib_batch_size = num_images, calib_batch_size
        self.distill = GenieSettings.from_dict(distill, "method.distill")
        self.settings = ReconstructSettings.from_dict(reconstruct, "method.reconstruct")

    def calibration_data(self, model, ctx):
        if self.calib_data == "genie":  # with this method's distillation settings (the source uses the paper's)
            ctx.info.update(calib_data="genie", calib_images=self.num_images)
            return genie_source(model, ctx, self.num_images, self.calib_batch_size, self.distill)
        return calibration_batches(self.calib_data, model, ctx, self.num_images, self.calib_batch_size)

    def quantize(self, model, ctx):
        t0 = time.perf_counter()
        batches = self.calibration_data(model, ctx)
        ctx.info["calib_data_time_s"] = round(time.perf_counter() - t0, 3)
        qmodel = quantize_model(model, ctx.convention, ctx.wbit, ctx.abit)
        t0 = time.perf_counter()
        ctx.info["reconstruct_blocks"] = reconstruct(qmodel, batches, self.settings, seed=ctx.seed,
                                                     progress=ctx.progress)
        ctx.info["reconstruct_time_s"] = round(time.perf_counter() - t0, 3)
        return qmodel
