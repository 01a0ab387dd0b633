"""Generators of the training family, by name (`GENERATORS`): the GDFQ lineage's (base.py) and ARC's searched
generator (arc.py), which builds on base.py's classes, and AdvKD's three-stage DCGAN (dcgan.py)."""

from . import arc  # noqa: F401  (registers "arc")
from . import dcgan  # noqa: F401  (registers "dcgan3": AdvKD's)
from .base import (GENERATORS, ConditionalBN, ConditionalGenerator, FixedSet, Sample, SuperposedGenerator,
                   UnconditionalGenerator)

__all__ = ["GENERATORS", "ConditionalBN", "ConditionalGenerator", "FixedSet", "Sample", "SuperposedGenerator",
           "UnconditionalGenerator"]
