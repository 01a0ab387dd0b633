"""The Knowledge Within (Haroush et al., CVPR 2020): images synthesized from the teacher's BatchNorm statistics
(or KW's Inception / Gaussian-noise baselines, `scheme`), then activation calibration on them (observe each
activation quantizer over the images with the convention's estimator, then freeze). The synthesis is
`dfqbench.synth.kw`; what is inferred is listed in conf/method/kw.yaml's `source:` block."""

import time

from ..quant import quantize_model
from ..quant.calibration.calibrate import calibrate_on_batches
from ..synth.calib_data import _split
from ..synth.kw import KWSettings, kw_images
from .base import Method
from ..settings import check_int


class KnowledgeWithin(Method):
    stochastic = True

    def __init__(self, name: str = "kw", scheme: str = "bn_stats", num_images: int = 32, batch_size: int = 32,
                 iterations: int = 500, lr: float = 0.5, patience: int = 100, min_lr: float = 1e-4, **kwargs):
        super().__init__(name, **kwargs)
        check_int("method.num_images", num_images)
        self.num_images = num_images
        self.settings = KWSettings(scheme, batch_size, iterations, lr, patience, min_lr).validate()

    def quantize(self, model, ctx):
        t0 = time.perf_counter()
        images = kw_images(model, ctx, self.num_images, self.settings)
        ctx.info.update(calib_data=f"kw-{self.settings.scheme}", calib_images=self.num_images,
                        synth_time_s=round(time.perf_counter() - t0, 3))
        qmodel = quantize_model(model, ctx.convention, ctx.wbit, ctx.abit)
        calibrate_on_batches(qmodel, _split(images, self.settings.batch_size))
        return qmodel
