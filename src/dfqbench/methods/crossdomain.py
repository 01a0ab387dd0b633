"""Calibration on data that is not the teacher's: another domain, procedural images or noise.

The "Is in-domain data really needed?" study: the same ZeroQ-style calibration (observe each activation over the
calibration batches with the convention's range estimator, then freeze) fed by any source of
`dfqbench.synth.calib_data`, so the sources are compared with everything else fixed. Every other
calibration-based method takes the same `calib_data` option.
"""

from ..quant.calibration.calibrate import OBSERVE_MODES, calibrate_on_batches
from ..synth.calib_data import calibration_batches, check_source
from .base import CalibrationMethod
from ..settings import check_int


class CrossDomain(CalibrationMethod):
    needs_batchnorm = False
    time_key = "calib_data_time_s"

    def __init__(self, name: str = "crossdomain", calib_data: str = "procedural", num_images: int = 32,
                 batch_size: int = 32, observe: str = "quantized", **kwargs):
        super().__init__(name, **kwargs)
        self.calib_data = check_source(calib_data)
        for key, value in (("num_images", num_images), ("batch_size", batch_size)):
            check_int(f"method.{key}", value)
        self.num_images, self.batch_size = num_images, batch_size
        if observe not in OBSERVE_MODES:
            raise ValueError(f"method.observe={observe!r} is not valid; choose one of: {', '.join(OBSERVE_MODES)}")
        self.observe = observe  # quantized: ZeroQ's observe-while-quantizing; float: PSAQ-ViT's float pass
        # the noise and procedural sources draw from the seed; real and other_domain pick images with it
        self.stochastic = True

    def calibration_data(self, model, ctx):
        return calibration_batches(self.calib_data, model, ctx, self.num_images, self.batch_size)

    def calibrate(self, qmodel, batches):
        calibrate_on_batches(qmodel, batches, observe=self.observe)
