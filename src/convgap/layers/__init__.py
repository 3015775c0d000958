"""Layers built from convgap's ideas: factorized (tensorial) and flattened convolutions."""

from .factorizations import FAMILIES, family
from .flattened import FlattenedConv2d
from .tensorial import TensorialConv2d

__all__ = ["TensorialConv2d", "FlattenedConv2d", "FAMILIES", "family"]
