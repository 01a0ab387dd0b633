"""REx's residual expansion of a weight quantizer (Yvinec et al., NeurIPS 2023).

W ~ R_1 + R_2 + ... + R_K with R_1 = Q(W) and R_k = Q(W - R_1 - ... - R_{k-1}): every term is quantized at the
layer's bit-width on its own grid (the convention's: granularity, symmetry, range estimator), so each order adds
one more low-bit weight tensor to store and multiply. A sparse expansion keeps, in each term after the first, only
the fraction `sparsity` of the entries with the largest residual |W - approximation so far| (the others are 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .precomputed import PrecomputedWeightQuantizer


def expand(weight: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor], order: int,
           sparsity: float = 1.0) -> list[torch.Tensor]:
    """The K = order quantized terms whose sum approximates `weight`."""
    terms: list[torch.Tensor] = []
    approx = torch.zeros_like(weight)
    for k in range(order):
        residual = weight - approx
        term = quantize(residual)
        if k > 0 and sparsity < 1.0:
            keep = max(1, math.ceil(sparsity * residual.numel()))
            idx = residual.abs().flatten().topk(keep, sorted=False).indices
            mask = torch.zeros(residual.numel(), dtype=torch.bool, device=residual.device)
            mask[idx] = True
            term = term * mask.view_as(term)
        terms.append(term)
        approx = approx + term
    return terms


class ExpansionWeightQuantizer(PrecomputedWeightQuantizer):
    def __init__(self, bits: int, order: int = 2, sparsity: float = 1.0, **kwargs):
        super().__init__(bits, **kwargs)
        self.order, self.sparsity = order, sparsity
        self.term_slots = 0  # weight entries stored over all terms (a dense term: numel; a sparse one: kept)
        self.nonzeros = 0  # non-zero entries over all terms

    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        grids = []

        def quantize(x):
            grids.append(self.make_grid(x))
            return self.uniform(x, grids[-1])

        terms = expand(weight, quantize, self.order, self.sparsity)
        self.grid = grids[0]  # the first term's grid, for inspection
        kept = max(1, math.ceil(self.sparsity * weight.numel()))
        self.term_slots = weight.numel() + (len(terms) - 1) * kept
        self.nonzeros = sum(int(torch.count_nonzero(t)) for t in terms)
        out = terms[0]
        for term in terms[1:]:  # in the order expand() accumulated them
            out = out + term
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, order={self.order}, sparsity={self.sparsity}"
