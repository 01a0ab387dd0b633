"""PSAQ-ViT (Li et al., ECCV 2022): patch-similarity-aware synthetic images, then min/max calibration on them.

The images come from `synth.patch_similarity` (one batch of 32, optimized from Gaussian noise); the quantized model
is calibrated on them with the whole model in float (`observe: float`, the official code calibrates before
`model_quant()`), ranges frozen. The placement is the convention's: `quant=psaqvit` is the official one.
"""

from ..quant.calibration.calibrate import OBSERVE_MODES, calibrate_on_batches
from ..synth.calib_data import cached
from ..synth.patch_similarity import PSAQSettings, check_transformer, psaq_images
from .base import CalibrationMethod
from ..settings import check_int, check_number


class PSAQViT(CalibrationMethod):
    needs_batchnorm = False
    stochastic = True

    def __init__(self, name: str = "psaqvit", num_batches: int = 1, observe: str = "float", **settings):
        method_keys = {k: settings.pop(k) for k in ("convention_overrides", "source") if k in settings}
        known = set(PSAQSettings.__dataclass_fields__)
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; valid: {sorted(known | {'num_batches', 'observe'})}")
        super().__init__(name, **method_keys)
        self.settings = PSAQSettings(**settings)
        s = self.settings
        for key in ("batch_size", "rounds", "iterations", "kde_points"):
            value = getattr(s, key)
            check_int(f"method.{key}", value)
        check_int("method.num_batches", num_batches)
        check_number("method.bandwidth", s.bandwidth, strict=True)
        if observe not in OBSERVE_MODES:
            raise ValueError(f"method.observe={observe!r} is not valid; choose one of: {', '.join(OBSERVE_MODES)}")
        self.num_batches, self.observe = num_batches, observe

    def calibration_data(self, model, ctx):
        s = self.settings
        lo, hi = (0 - ctx.mean) / ctx.std, (1 - ctx.mean) / ctx.std
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        gen = ctx.generator()
        ctx.info["calib_data"] = "psaqvit"
        ctx.info["calib_images"] = s.batch_size * self.num_batches
        return cached(ctx, "psaqvit", {**vars(s), "num_batches": self.num_batches, "prefix": prefix}, lambda: [
            psaq_images(model, ctx.input_shape, ctx.num_classes, lo, hi, s, gen, ctx.device, prefix, ctx.progress)
            for _ in range(self.num_batches)])

    def check_model(self, model) -> None:
        check_transformer(model)

    def calibrate(self, qmodel, batches):
        calibrate_on_batches(qmodel, batches, observe=self.observe)
