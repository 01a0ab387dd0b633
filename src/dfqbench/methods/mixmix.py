"""MixMix (Li et al., "MixMix: All You Need for Data-Free Compression Are Feature and Data Mixing", ICCV 2021;
LIS, arXiv 2011.09899 v1, is its first preprint): images inverted through a pool of pretrained models with
CutMix-ed images and labels (`dfqbench.synth.mixmix`), then BRECQ-style block reconstruction of the quantized
model on them (`dfqbench.quant.calibration.reconstruct`, QDrop off). A best-effort reconstruction: no code, and
the abstract does not give the losses or settings (conf/method/mixmix.yaml lists what is inferred)."""

from __future__ import annotations

import time

from ..pool import check_pool, load_pool
from ..quant import quantize_model
from ..quant.calibration.reconstruct import ReconstructSettings, reconstruct
from ..synth.calib_data import _split
from ..synth.mixmix import MixMixSettings, mixmix_images
from .base import Method
from ..settings import check_int


class MixMix(Method):
    stochastic = True

    def __init__(self, name: str = "mixmix", pool: dict | None = None, models_dir: str | None = None,
                 num_images: int = 128,
                 calib_batch_size: int = 32, synthesis: dict | None = None, reconstruct: dict | None = None,
                 **kwargs):
        super().__init__(name, **kwargs)
        pool = check_pool(pool)
        for key, value in (("num_images", num_images), ("calib_batch_size", calib_batch_size)):
            check_int(f"method.{key}", value)
        self.pool, self.models_dir = pool, models_dir
        self.num_images, self.calib_batch_size = num_images, calib_batch_size
        try:
            self.synthesis = MixMixSettings(**(synthesis or {})).validate()
        except TypeError:
            raise ValueError(f"method.synthesis has unknown keys {sorted(set(synthesis) - set(vars(MixMixSettings())))}; "
                             f"valid: {sorted(vars(MixMixSettings()))}") from None
        self.settings = ReconstructSettings.from_dict(reconstruct, "method.reconstruct")

    def quantize(self, model, ctx):
        t0 = time.perf_counter()
        pool, ids = load_pool(self.pool, self.models_dir, ctx)
        images = mixmix_images(model, pool, ids, ctx, self.num_images, self.synthesis)
        ctx.info.update(calib_data="mixmix", calib_images=self.num_images, pool=ids,
                        synth_time_s=round(time.perf_counter() - t0, 3))
        qmodel = quantize_model(model, ctx.convention, ctx.wbit, ctx.abit)
        t0 = time.perf_counter()
        ctx.info["reconstruct_blocks"] = reconstruct(qmodel, _split(images, self.calib_batch_size), self.settings,
                                                     seed=ctx.seed, progress=ctx.progress)
        ctx.info["reconstruct_time_s"] = round(time.perf_counter() - t0, 3)
        return qmodel
