"""Generators of the training family, by name (`GENERATORS`): the GDFQ lineage's (base.py) and ARC's searched
generator (arc.py), which builds on base.py's classes."""

from . import arc  # noqa: F401  (registers "arc")
from .base import (GENERATORS, ConditionalBN, ConditionalGenerator, FixedSet, Sample, SuperposedGenerator,
                   UnconditionalGenerator)

__all__ = ["GENERATORS", "ConditionalBN", "ConditionalGenerator", "FixedSet", "Sample", "SuperposedGenerator",
           "UnconditionalGenerator"]
