"""The shared runtime: what kernels, algorithms, the einsum evaluator and the layers run on.

One module per concept, each the only copy in the package:

* :mod:`.sizes` -- the convolution output-length formula;
* :mod:`.layouts` -- layout names, memory formats and channels-last / channels-innermost
  checks;
* :mod:`.guard` -- "may the fast path run": no autograd needed, torch not recording a
  graph (jit.trace, torch.compile, torch.export, either ONNX exporter);
* :mod:`.memo` -- results kept per weight while it is unchanged;
* :mod:`.onednn` -- oneDNN weight packing and the packed convolution / linear calls;
* :mod:`.measured` -- the fastest of a step's implementations, picked at run time (through
  :mod:`convgap.choice`);
* :mod:`.pointwise` -- a weight applied at every position (1x1 conv) as one GEMM;
* :mod:`.depthwise` -- one filter per channel: tap by tap, or on oneDNN's NHWC kernel;
* :mod:`.fft` -- convolution by FFT.

Kernels (:mod:`convgap.kernels`) import only this layer and :mod:`convgap.errors` (see
``tests/test_layering.py`` for what may import what).
"""
