"""An ensemble teacher for the generator trainer (DFED: Hao et al., ACM MM 2021) and its BN-moments loss.

`Ensemble` averages its members' logits; the trainer's BN recorder sees every member's BatchNorms, member after
member, so `ensemble_bns` can weight each member's first BN layer and average over members, as the first
author's re-implementation (Hao840/CDFKD-MFS, DFED.py) does:
    (1/K) sum_k sum_l w_l (||var_l - running_var_l||_2 + ||mean_l - running_mean_l||_2), w = first_weight on
    each member's first BN layer, 1 elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModel
from .losses import GENERATOR_LOSSES, LossTerm
from .registry import register
from ..settings import check_number


class Ensemble(nn.Module):
    """The mean of the members' logits; `bn_counts` = BatchNorm2d layers per member, in `modules()` order."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.bn_counts = [sum(isinstance(m, nn.BatchNorm2d) for m in member.modules()) for member in members]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(0)


@register(GENERATOR_LOSSES, "ensemble_bns")
class EnsembleBNMoments(LossTerm):
    """DFED's moment matching over an ensemble teacher (module docstring). `bn_counts` is set from the
    `Ensemble` by the method (`methods.dfed`); unset, every recorded BN counts as one member's."""

    needs_bn_stats = True

    def __init__(self, weight: float = 0.1, first_weight: float = 5.0):
        super().__init__(weight)
        check_number("first_weight", first_weight)
        self.first_weight = float(first_weight)
        self.bn_counts: list[int] | None = None

    def __call__(self, step):
        stats = step.bn_stats
        if not stats:
            raise UnsupportedModel("generator loss 'ensemble_bns' needs teachers with BatchNorm2d layers")
        counts = self.bn_counts or [len(stats)]
        if sum(counts) != len(stats):
            raise ValueError(f"ensemble_bns: {len(stats)} BN layers recorded, the ensemble has {sum(counts)}")
        total, start = 0.0, 0
        for count in counts:
            for i, (mean, var, rm, rv) in enumerate(stats[start:start + count]):
                w = self.first_weight if i == 0 else 1.0
                total = total + w * (torch.linalg.vector_norm(var - rv) + torch.linalg.vector_norm(mean - rm))
            start += count
        return total / len(counts)
