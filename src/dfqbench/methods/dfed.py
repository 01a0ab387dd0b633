"""DFED (Hao et al., "Data-Free Ensemble Knowledge Distillation for Privacy-conscious Multimedia Model
Compression", ACM MM 2021) applied to quantization: the generator trainer with an ENSEMBLE teacher.

The teacher is the mean of the run's teacher and the teacher pool (`pool:`, as MixMix's; dfqbench.pool);
the generator maximizes the L1 disagreement between the quantized student and the ensemble while its images keep
every member's BatchNorm moments (`train.ensemble.ensemble_bns`), and the student takes several L1 steps towards
the ensemble per generator step. DFED is a KD method with no official code: the settings follow its first
author's re-implementation (Hao840/CDFKD-MFS DFED.py); the quantization frame is GDFQ's (conf/method/dfed.yaml).
"""

from __future__ import annotations

import copy

from torch import nn

from ..pool import check_pool, load_pool
from ..train.ensemble import Ensemble, EnsembleBNMoments
from .qat import GeneratorQAT


class DFED(GeneratorQAT):
    def __init__(self, name: str = "dfed", pool: dict | None = None, models_dir: str | None = None, **kwargs):
        super().__init__(name, **kwargs)
        self.pool, self.models_dir = check_pool(pool), models_dir
        self.spec["pool"] = sorted(self.pool)

    def build_teacher(self, model: nn.Module, ctx) -> nn.Module:
        members, ids = load_pool(self.pool, self.models_dir, ctx)
        if not members:
            raise ValueError("method.pool holds no model besides the run's teacher: DFED needs an ensemble")
        ensemble = Ensemble([copy.deepcopy(model).eval(), *members]).eval()
        for _, term in self.generator_terms:
            if isinstance(term, EnsembleBNMoments):
                term.bn_counts = ensemble.bn_counts
        ctx.info["pool"] = ids
        return ensemble
