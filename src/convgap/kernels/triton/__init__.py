"""Triton kernels. Importable without triton installed: check :data:`AVAILABLE` first."""

from .implicit_gemm import (AVAILABLE, conv2d_implicit_gemm, dot_precision, interpreting,
                            pack_weight, runnable)

__all__ = ["AVAILABLE", "conv2d_implicit_gemm", "dot_precision", "interpreting",
           "pack_weight", "runnable"]
