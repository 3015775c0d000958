"""Layers built from convgap's ideas: factorized (tensorial) and flattened convolutions, and
fused residual blocks, and whole networks run as one oneDNN plan."""

from .factorizations import FAMILIES, family
from .flattened import FlattenedConv2d
from .fused_blocks import (FusedBasicBlock, FusedBlock, FusedBottleneck, FusedConvAct,
                           FusedConvChain, FusedConvFirst, FusedConvNeXt,
                           FusedInvertedResidual, FusedMBConv, FusedPoolLinear,
                           FusedStemBlock)
from .network import FusedNetwork
from .tensorial import TensorialConv2d

__all__ = ["TensorialConv2d", "FlattenedConv2d", "FAMILIES", "family", "FusedBlock",
           "FusedConvChain", "FusedConvAct", "FusedInvertedResidual", "FusedBasicBlock",
           "FusedBottleneck", "FusedConvFirst", "FusedMBConv", "FusedConvNeXt",
           "FusedPoolLinear", "FusedStemBlock", "FusedNetwork"]
