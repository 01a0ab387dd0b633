"""Integer grids: a range ``[lo, hi]`` (per tensor, or one per channel) becomes a scale and a zero point.

Asymmetric grids always contain zero (``lo <= 0 <= hi``) and use ``[0, 2^b - 1]`` with an integer zero point;
symmetric grids have zero point 0, and are unsigned ``[0, 2^b - 1]`` when the range is non-negative (post-ReLU
activations), signed ``[-2^(b-1), 2^(b-1) - 1]`` otherwise (`symmetric_grid="auto"`). `symmetric_grid="signed"`:
always signed, even for a non-negative range; `"qasr"`: Q-ASR's always signed grid (kssteven418/Q-ASR
quant_utils.SymmetricQuantFunction): scale amax / (2^(b-1) - 1), integers clamped to
``[-(2^(b-1) - 1), 2^(b-1) - 2]`` (its clamp(-n, n - 1): the top level is never used). `"half_levels"`: the
ZeroQ/HAWQ-lineage grid PSAQ-ViT's weights use (zkkli/PSAQ-ViT quant_utils.symmetric_linear_quantization_params):
scale amax / ((2^b - 1) / 2) (amax / 7.5 at 4 bits), integers clamped to ``[-2^(b-1), 2^(b-1) - 1]``.
A leaf module: the kernels quantize onto it, the quantizers build it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-8  # the smallest scale: a constant tensor still gets a valid grid


@dataclass
class Grid:
    scale: torch.Tensor  # float32, shape [] or [C]
    zero_point: torch.Tensor  # int32, same shape
    qmin: int
    qmax: int


SYMMETRIC_GRIDS = ("auto", "signed", "qasr", "half_levels")


def grid_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                    symmetric_grid: str = "auto") -> Grid:
    lo, hi = lo.float(), hi.float()
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        if symmetric_grid == "qasr":
            n = 2 ** (bits - 1) - 1
            scale = (amax / n).clamp_min(EPS)
            return Grid(scale, torch.zeros_like(scale, dtype=torch.int32), -n, n - 1)
        if symmetric_grid == "half_levels":
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            scale = (amax / ((qmax - qmin) / 2)).clamp_min(EPS)
            return Grid(scale, torch.zeros_like(scale, dtype=torch.int32), qmin, qmax)
        if symmetric_grid == "signed" or bool((lo < 0).any()):
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            qmin, qmax = 0, 2**bits - 1
        scale = (amax / qmax).clamp_min(EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return Grid(scale, zero_point, qmin, qmax)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    qmin, qmax = 0, 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(EPS)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return Grid(scale, zero_point, qmin, qmax)
