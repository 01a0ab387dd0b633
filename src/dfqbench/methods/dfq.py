"""DFQ: data-free quantization through weight equalization and bias correction (Nagel et al., ICCV 2019).

ReLU6 -> ReLU, BatchNorm folding, cross-layer equalization, high-bias absorption, quantization, data-free bias
correction, activation ranges from the (equalized) BatchNorm statistics. No images.

Two settings follow the unofficial jakc4103/DFQ code (quant=official_dfq carries them in
quant.method_settings.dfq; scripts/parity/dfq.py): `equalize_range: minmax` (each channel's range is max - min, as
its _layer_equalization(signed=False); default absmax: max |w|) and `input_range: normalization` (a quantized image
gets the normalization's range ((0 - mean) / std, (1 - mean) / std), as its set_quant_minmax does with ImageNet's
constants; default bn: N(0, 1) -/+ k_std).
"""

from ..quant import ActQuantizer, quantize_model
from ..quant.transforms.bias_correction import correct_bias
from ..quant.calibration.calibrate import set_ranges_from_bn
from ..quant.transforms.equalize import EQUALIZE_RANGES
from ..quant.transforms.precondition import precondition
from .base import Method


class DFQ(Method):
    def __init__(self, name: str = "dfq", equalize: bool = True, absorb_bias: bool = True, correct_bias: bool = True,
                 relu6_to_relu: bool = True, k_std: float = 6.0, absorb_k_std: float = 3.0,
                 equalize_iterations: int = 100, equalize_tol: float = 2e-7, equalize_range: str = "absmax",
                 input_range: str = "bn", **kwargs):
        super().__init__(name, **kwargs)
        self.do_equalize, self.do_absorb, self.do_correct = equalize, absorb_bias, correct_bias
        self.relu6_to_relu, self.k_std, self.absorb_k_std = relu6_to_relu, k_std, absorb_k_std
        self.equalize_iterations, self.equalize_tol = equalize_iterations, equalize_tol
        self._check_choices(equalize_range, input_range)
        self.equalize_range, self.input_range = equalize_range, input_range

    @staticmethod
    def _check_choices(equalize_range, input_range) -> None:
        if equalize_range not in EQUALIZE_RANGES:
            raise ValueError(f"method.equalize_range={equalize_range!r} is not valid; choose one of: "
                             f"{', '.join(EQUALIZE_RANGES)}")
        if input_range not in INPUT_RANGES:
            raise ValueError(f"method.input_range={input_range!r} is not valid; choose one of: "
                             f"{', '.join(INPUT_RANGES)}")

    def check_convention(self, convention) -> None:
        """Take the settings the convention carries for this method (quant.method_settings.dfq, the official
        preset's): they replace the method's own."""
        extra = dict(convention.method_settings.get(self.name) or {})
        unknown = sorted(set(extra) - set(SETTINGS))
        if unknown:
            raise ValueError(f"quant.method_settings.{self.name}: unknown setting(s) {unknown}; valid: "
                             f"{sorted(SETTINGS)}")
        self._check_choices(extra.get("equalize_range", self.equalize_range),
                            extra.get("input_range", self.input_range))
        for key, value in extra.items():
            setattr(self, key, value)

    def quantize(self, model, ctx):
        self.check_convention(ctx.convention)
        pre = precondition(model, self.relu6_to_relu, self.do_equalize, self.equalize_iterations, self.equalize_tol,
                           self.equalize_range, self.do_absorb, self.absorb_k_std)
        ctx.info["dfq_pairs"] = len(pre.pairs)
        if pre.equalize_iterations is not None:
            ctx.info["dfq_equalize_iterations"] = pre.equalize_iterations
        qmodel = quantize_model(pre.gm, ctx.convention, ctx.wbit, ctx.abit)
        if self.do_correct:
            ctx.info["dfq_bias_corrected_layers"] = correct_bias(qmodel)
        set_ranges_from_bn(qmodel, self.k_std)
        if self.input_range == "normalization":
            lo, hi = float(((0.0 - ctx.mean) / ctx.std).min()), float(((1.0 - ctx.mean) / ctx.std).max())
            for node in qmodel.graph.nodes:
                if node.op == "placeholder":
                    for user in node.users:
                        q = qmodel.get_submodule(user.target) if user.op == "call_module" else None
                        if isinstance(q, ActQuantizer) and q.enabled:
                            q.set_range(lo, hi)
                            ctx.info["dfq_input_range"] = [round(lo, 6), round(hi, 6)]
        return qmodel


INPUT_RANGES = ("bn", "normalization")
SETTINGS = ("equalize_range", "input_range", "k_std", "absorb_k_std", "equalize_iterations", "equalize_tol")
