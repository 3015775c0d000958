"""Compiled convolution kernels: ``triton/`` (GPU; tested on CPU with ``TRITON_INTERPRET=1``)
and ``cpu/`` (C with AVX-512, compiled at first use: the fused factorized convolutions)."""
