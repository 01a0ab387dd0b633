"""Layer-wise data-free compression (Horton, Jin, Farhadi, Rastegari, ICPR 2022; arXiv 2011.09058; no code): a
RECONSTRUCTION from the abstract ("independent layer-wise compressions, each trained on layer-wise data generated
from the pretrained network alone, after preconditioning the network"), quantization only.

1. preconditioning: ReLU6 -> ReLU, BatchNorm folding, cross-layer equalization and high-bias absorption (DFQ's
   transforms, `quant.transforms.precondition`);
2. quantization on the convention's grid; every activation range first set from the BN statistics (mean +-
   k_std std, RTN/DFQ's data-free ranges: the fallback of a quantizer no layer fit reaches);
3. layer-wise data and independent per-layer reconstruction (`quant.calibration.layerwise.fit_layers`): for each
   conv/linear, samples of per-channel Gaussians of the BN statistics that feed it, through its ReLU; the layer's
   AdaRound rounding, weight step and input-quantizer step fitted to the float layer's output on them.
No image is synthesized. What is inferred is listed in conf/method/layerwise.yaml's `source:` block."""

from __future__ import annotations

import time

from ..quant import quantize_model
from ..quant.calibration.calibrate import set_ranges_from_bn
from ..quant.calibration.layerwise import fit_layers
from ..quant.calibration.reconstruct import ReconstructSettings
from ..quant.transforms.equalize import EQUALIZE_RANGES
from ..quant.transforms.precondition import precondition
from .base import Method
from ..settings import check_int, check_number


class LayerWise(Method):
    stochastic = True

    def __init__(self, name: str = "layerwise", num_samples: int = 1024, relu6_to_relu: bool = True,
                 equalize: bool = True, absorb_bias: bool = True, absorb_k_std: float = 3.0,
                 equalize_iterations: int = 100, equalize_tol: float = 2e-7, equalize_range: str = "absmax",
                 k_std: float = 6.0, reconstruct: dict | None = None, **kwargs):
        super().__init__(name, **kwargs)
        check_int("method.num_samples", num_samples, 2)
        if equalize_range not in EQUALIZE_RANGES:
            raise ValueError(f"method.equalize_range={equalize_range!r} is not valid; choose one of: "
                             f"{', '.join(EQUALIZE_RANGES)}")
        for key, value in (("absorb_k_std", absorb_k_std), ("k_std", k_std)):
            check_number(f"method.{key}", value, strict=True)
        self.num_samples, self.relu6_to_relu = num_samples, relu6_to_relu
        self.do_equalize, self.do_absorb, self.absorb_k_std = equalize, absorb_bias, absorb_k_std
        self.equalize_iterations, self.equalize_tol, self.equalize_range = (equalize_iterations, equalize_tol,
                                                                            equalize_range)
        self.k_std = k_std
        self.settings = ReconstructSettings.from_dict(reconstruct, "method.reconstruct")

    def quantize(self, model, ctx):
        pre = precondition(model, self.relu6_to_relu, self.do_equalize, self.equalize_iterations, self.equalize_tol,
                           self.equalize_range, self.do_absorb, self.absorb_k_std)
        ctx.info["precondition_pairs"] = len(pre.pairs)
        if pre.equalize_iterations is not None:
            ctx.info["equalize_iterations"] = pre.equalize_iterations
        qmodel = quantize_model(pre.gm, ctx.convention, ctx.wbit, ctx.abit)
        set_ranges_from_bn(qmodel, self.k_std)
        t0 = time.perf_counter()
        ctx.info["layerwise_layers"] = fit_layers(qmodel, ctx.input_shape, self.num_samples, self.settings,
                                                  seed=ctx.seed, progress=ctx.progress)
        ctx.info["layerwise_time_s"] = round(time.perf_counter() - t0, 3)
        return qmodel
