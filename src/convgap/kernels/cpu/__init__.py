"""Native CPU kernels: C with AVX-512 intrinsics, compiled at first use (:mod:`.build`).

* :func:`pointwise_depthwise_pointwise` (``pdp.c``): 1x1 -> depthwise -> 1x1, a CP layer
  (without the second 1x1, a FlattenedConv2d repeat; with activations and the residual add,
  :func:`inverted_residual`, a MobileNetV2 block);
* :func:`pointwise_conv_pointwise` (``pcp.c``): 1x1 -> conv (-> conv along rows) -> 1x1,
  Tucker-2, TT and (with groups sharing the filters) TR layers;
* both on channels-innermost maps, or on NCHW maps in place (``planar.c``);
* :func:`residual_tiles` (``tiles.c``): a residual block's body ([1x1 ->] k x k dense or
  depthwise -> 1x1) on kept output tiles only, added into the output in place (the sparse
  execution of :class:`convgap.layers.dynamic.DynamicBlock`);
* :func:`stem_block` (``stem.c``): a network's stem conv and the depthwise [+ squeeze-
  excitation] + 1x1 block after it in one pass (:class:`convgap.layers.FusedStemBlock`);
* ``gemm.h``: the GEMM core they share (filter taps as shifted views of a zero-padded
  window; packed weights for NHWC, broadcast weights for NCHW).

Each is used only where it measures faster than the torch ops it replaces
(:mod:`convgap.layers.dispatch`), and every caller keeps its torch path for machines or
installs without them (:func:`available`)."""

from .build import NativeKernelWarning, avx512, enabled, library
from .pcp import pointwise_conv_pointwise
from .pdp import available, inverted_residual, pointwise_depthwise_pointwise
from .stem import stem_block
from .tiles import residual_tiles

__all__ = ["NativeKernelWarning", "avx512", "enabled", "library", "available",
           "pointwise_depthwise_pointwise", "inverted_residual", "pointwise_conv_pointwise",
           "residual_tiles", "stem_block"]
