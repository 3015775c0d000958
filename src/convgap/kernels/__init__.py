"""Compiled convolution kernels: ``triton/`` (GPU; tested on CPU with ``TRITON_INTERPRET=1``)."""
