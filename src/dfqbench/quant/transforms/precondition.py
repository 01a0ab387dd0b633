"""DFQ's preconditioning of the float model (Nagel et al., ICCV 2019), shared by the methods built on it (dfq,
layerwise, pnmq): ReLU6 -> ReLU, BatchNorm folding, cross-layer equalization, high-bias absorption."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from .bn_fold import fold_batchnorm
from .equalize import LayerPair, absorb_high_bias, equalize, find_pairs


@dataclass
class Preconditioned:
    gm: fx.GraphModule  # BatchNorm folded, equalized
    pairs: list[LayerPair]  # the equalized layer pairs
    equalize_iterations: int | None  # None: not equalized


def replace_relu6(model: nn.Module) -> None:
    """ReLU6 -> ReLU in place: cross-layer equalization needs a positively homogeneous activation."""
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU6):
            setattr(model, name, nn.ReLU(inplace=child.inplace))
        else:
            replace_relu6(child)


def precondition(model: nn.Module, relu6_to_relu: bool = True, equalize_pairs: bool = True,
                 iterations: int = 100, tol: float = 2e-7, channel_range: str = "absmax",
                 absorb_bias: bool = False, absorb_k_std: float = 3.0) -> Preconditioned:
    if relu6_to_relu:
        replace_relu6(model)
    gm = fold_batchnorm(model)
    pairs = find_pairs(gm)
    done = equalize(pairs, iterations, tol, channel_range) if equalize_pairs else None
    if absorb_bias:
        absorb_high_bias(pairs, absorb_k_std)
    return Preconditioned(gm, pairs, done)
