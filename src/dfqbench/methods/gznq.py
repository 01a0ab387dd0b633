"""GZNQ (He et al., CVPRW 2021, "Generative Zero-shot Network Quantization"; no code): a RECONSTRUCTION from the
abstract. A generator trained so that the distribution of the teacher's features at every BatchNorm input
matches the stored Gaussian (`dfqbench.synth.gznq`: KL of the moment-matched Gaussian + negentropy), then its
images calibrate the activation ranges (ZeroQ's calibration, `stage: calibrate`) or feed the block
reconstruction stage (`stage: reconstruct`, the zeroq_recon / Genie stage). What is inferred is listed in
conf/method/gznq.yaml's `source:` block."""

from __future__ import annotations

import time

from ..quant import quantize_model
from ..quant.calibration.calibrate import calibrate_on_batches
from ..quant.calibration.reconstruct import ReconstructSettings, reconstruct
from ..synth.gznq import GZNQSettings, gznq_source
from .base import Method
from ..settings import check_int

STAGES = ("calibrate", "reconstruct")


class GZNQ(Method):
    stochastic = True

    def __init__(self, name: str = "gznq", num_images: int = 32, calib_batch_size: int = 32,
                 stage: str = "calibrate", synthesis: dict | None = None, reconstruct: dict | None = None,
                 **kwargs):
        super().__init__(name, **kwargs)
        for key, value in (("num_images", num_images), ("calib_batch_size", calib_batch_size)):
            check_int(f"method.{key}", value)
        if stage not in STAGES:
            raise ValueError(f"method.stage={stage!r} is not valid; choose one of: {', '.join(STAGES)}")
        self.num_images, self.calib_batch_size, self.stage = num_images, calib_batch_size, stage
        self.synthesis = GZNQSettings.from_dict(synthesis, "method.synthesis")
        self.settings = ReconstructSettings.from_dict(reconstruct, "method.reconstruct")

    def quantize(self, model, ctx):
        t0 = time.perf_counter()
        batches = gznq_source(model, ctx, self.num_images, self.calib_batch_size, self.synthesis)
        ctx.info.update(calib_data="gznq", calib_images=self.num_images,
                        synth_time_s=round(time.perf_counter() - t0, 3))
        qmodel = quantize_model(model, ctx.convention, ctx.wbit, ctx.abit)
        if self.stage == "calibrate":
            calibrate_on_batches(qmodel, batches)
            return qmodel
        t0 = time.perf_counter()
        ctx.info["reconstruct_blocks"] = reconstruct(qmodel, batches, self.settings, seed=ctx.seed,
                                                     progress=ctx.progress)
        ctx.info["reconstruct_time_s"] = round(time.perf_counter() - t0, 3)
        return qmodel
