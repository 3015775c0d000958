"""Triton kernels. Importable without triton installed: check :data:`AVAILABLE` first."""

from .implicit_gemm import AVAILABLE, conv2d_implicit_gemm, interpreting, pack_weight

__all__ = ["AVAILABLE", "conv2d_implicit_gemm", "interpreting", "pack_weight"]
