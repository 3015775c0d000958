"""Native CPU kernels (C with AVX-512 intrinsics, compiled at first use; see
:mod:`.build`). Each is used only where it measures faster than the torch ops it replaces,
and every caller keeps its torch path for CPUs or installs without them."""

from .build import NativeKernelWarning, avx512, enabled, library
from .pdp import available, pointwise_depthwise_pointwise

__all__ = ["NativeKernelWarning", "avx512", "enabled", "library", "available",
           "pointwise_depthwise_pointwise"]
