"""ZeroQ (Cai et al., CVPR 2020): distilled data from BatchNorm statistics, then activation calibration on it."""

from ..quant.calibration.calibrate import calibrate_on_batches
from ..synth.bn_distill import DistillSettings, distill_bn_data
from ..synth.calib_data import cached, calibration_batches, check_source
from ..settings import check_int, check_number
from .base import CalibrationMethod


class ZeroQ(CalibrationMethod):
    stochastic = True
    time_key = "distill_time_s"

    def __init__(self, name: str = "zeroq", batch_size: int = 32, num_batches: int = 1, iterations: int = 500,
                 lr: float = 0.5, patience: int = 100, min_lr: float = 1e-4, calib_data: str = "distill",
                 **kwargs):
        super().__init__(name, **kwargs)
        for key, value in (("batch_size", batch_size), ("num_batches", num_batches), ("iterations", iterations),
                           ("patience", patience)):
            check_int(f"method.{key}", value)
        check_number("method.lr", lr, strict=True)
        check_number("method.min_lr", min_lr)
        self.settings = DistillSettings(batch_size, num_batches, iterations, lr, patience, min_lr)
        self.calib_data = check_source(calib_data)

    def calibration_data(self, model, ctx):
        s = self.settings
        if self.calib_data != "distill":  # the same calibration on another source (the cross-domain study)
            return calibration_batches(self.calib_data, model, ctx, s.batch_size * s.num_batches, s.batch_size)
        ctx.info["calib_data"] = "distill"
        return cached(ctx, "distill", vars(s), lambda: distill_bn_data(
            model, ctx.input_shape, s, ctx.generator(), ctx.device, ctx.progress))

    def calibrate(self, qmodel, batches):
        calibrate_on_batches(qmodel, batches)
