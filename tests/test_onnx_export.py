"""Every model convgap produces exports to ONNX and runs in ONNX Runtime with the eager
result: each registered algorithm (swap) and each factorization family (factorize), on NCHW
and channels_last inputs, through both exporters of torch.onnx.export (the default
torch.export-based one, dynamo=True, and the TorchScript one, dynamo=False). Layers whose
own ops cannot export run as plain torch ops under export; never a failed export or a file
that does not load."""

import copy
import functools
import io
import warnings

import pytest
import torch
import torch.nn as nn

import convgap
from convgap import config, timing
from convgap.algorithms import AlgorithmFallbackWarning, registry
from convgap.layers import FlattenedConv2d, TensorialConv2d
from convgap.ops.guard import exporting

ort = pytest.importorskip("onnxruntime")

TOL = 1e-4  # max |y - ref| / max |ref|, against the eager model
EXPORTERS = ["dynamo", "torchscript"]
LAYOUTS = ["nchw", "channels_last"]
FAMILIES = ["cp", "tucker", "tt", "tr", "rcp", "flattened"]


@pytest.fixture(scope="module", autouse=True)
def _one_onnx_registry():
    """Test speed only: the default exporter rebuilds its table of ONNX functions on every
    export (0.4-0.7 s here, a third of a small model's export); build it once per opset.
    Nothing registers into it (no custom_translation_table is passed)."""
    try:
        from torch.onnx._internal.exporter import _registration
        build = _registration.ONNXRegistry.from_torchlib.__func__
    except (ImportError, AttributeError):   # another torch: export as it is
        yield
        return
    cache: dict = {}

    def from_torchlib(cls, *args, **kw):
        key = (cls, args, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = build(cls, *args, **kw)
        return cache[key]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(from_torchlib))
        yield


@pytest.fixture(scope="module", autouse=True)
def _quick_choices():
    """Test speed only: a factorized layer's one-time choice between its fused C kernel and
    its torch steps is timed briefly (either gives the same result)."""
    with config.override(KERNEL_ROUNDS=timing.QUICK):
        yield


def _model() -> nn.Module:
    """A dense 3x3 conv, BN, ReLU, a depthwise conv, a 1x1 conv, a strided dense conv, a
    Linear head."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),   # 0-2
        nn.Conv2d(8, 8, 3, padding=1, groups=8),                       # 3 depthwise
        nn.Conv2d(8, 16, 1),                                           # 4 1x1
        nn.Conv2d(16, 16, 3, stride=2, padding=1),                     # 5 strided
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():  # BN statistics that are not the identity
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def _input(layout: str) -> torch.Tensor:
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _export(model: nn.Module, x: torch.Tensor, exporter: str, **kw) -> bytes:
    """``model`` exported on ``x`` (exporter chatter and warnings silenced)."""
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(model, (x,), buf, dynamo=True, verbose=False, **kw)
        else:
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17,
                              verbose=False, **kw)
    return buf.getvalue()


def _run(data: bytes, x: torch.Tensor) -> torch.Tensor:
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.contiguous().numpy()})
    return torch.from_numpy(y)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).abs().max() / ref.abs().max()).item()


def _check(model: nn.Module, x: torch.Tensor, exporter: str) -> None:
    """ONNX Runtime's result on ``x`` matches the eager model's, and the export left the
    eager model as it was."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", AlgorithmFallbackWarning)  # (expected, per layer)
        ref = model(x)   # (the first call also makes the layers' one-time choices)
    y = _run(_export(model, x, exporter), x)
    assert y.shape == ref.shape
    assert _rel(y, ref) <= TOL
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", AlgorithmFallbackWarning)
        assert _rel(model(x), ref) <= TOL   # nothing the export traced is used in eager


# (models are built once and shared by the tests of both exporters: an export does not
# change a model, and _check verifies that)
@functools.lru_cache(maxsize=None)
def _swapped(algo: str, layout: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # layers an algorithm cannot run fall back to torch
        return convgap.swap(_model(), algo, _input(layout), quiet=True, linear="prepacked")


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("algo", registry.names())
def test_swapped_model_exports(algo, layout, exporter):
    _check(_swapped(algo, layout), _input(layout), exporter)


# swap() without an example input gives every conv the algorithm; a layer it cannot run
# falls back to torch per call, in eager and under export alike
@pytest.mark.parametrize("algo", registry.names())
def test_swapped_without_example_input_exports(algo):
    """Layers the algorithm cannot run (here: winograd on the depthwise, 1x1 and strided
    convs; depthwise on the dense ones) export as plain convolutions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convgap.swap(_model(), algo, quiet=True)
    _check(model, _input("nchw"), "torchscript")


@functools.lru_cache(maxsize=None)
def _factorized(family: str) -> nn.Module:
    """``_model`` with its two dense 3x3 convs (the stem and the strided one) factorized."""
    model = _model()
    if family == "flattened":
        return convgap.factorize(model, family, quiet=True).eval()
    if family == "tr":  # rank[0] * rank[1] <= in_channels: ranks per layer
        model = convgap.factorize(model, family, rank=(1, 3, 2, 1), layers=["0"], quiet=True,
                                  inplace=True)
        return convgap.factorize(model, family, rank=3, layers=["5"], quiet=True).eval()
    return convgap.factorize(model, family, rank=3, quiet=True).eval()


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_factorized_model_exports(family, layout, exporter):
    model = _factorized(family)
    kind = FlattenedConv2d if family == "flattened" else TensorialConv2d
    assert [n for n, m in model.named_modules() if isinstance(m, kind)] == ["0", "5"]
    _check(model, _input(layout), exporter)


def test_torchscript_export_keeps_no_traced_plan():
    """A TorchScript export plans by the sizes' int values and keeps nothing compiled from
    the traced sizes: one plan per input shape, as in eager."""
    model = copy.deepcopy(_factorized("cp"))   # a copy starts with no plans
    assert not model[0]._plans
    x = _input("nchw")
    _export(model, x, "torchscript")
    with torch.no_grad():
        model(x)
    for name in ("0", "5"):
        keys = list(model.get_submodule(name)._plans)
        assert len(keys) == 1 and all(type(n) is int for n in keys[0])


@pytest.mark.parametrize("what", ["im2col", "tr", "rcp"])
def test_torchscript_export_with_dynamic_batch(what):
    """The TorchScript exporter records the factorized steps' shape arithmetic (and im2col's
    gather) from the traced sizes: an export with a dynamic batch runs another batch."""
    x = _input("nchw")
    model = _swapped(what, "nchw") if what == "im2col" else _factorized(what)
    with torch.no_grad():
        model(x)   # steps compiled in eager (static sizes) must not reach the trace
    data = _export(model, x, "torchscript", input_names=["x"], dynamic_axes={"x": {0: "n"}})
    x3 = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = model(x3)
    assert _rel(_run(data, x3), ref) <= TOL


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_exporting_is_true_under_both_exporters(exporter):
    """exporting() is what keeps the C kernels (ctypes, real memory) away from traced and
    fake tensors: it must hold in forward under both exporters."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(exporting())
            return x * 2

    _export(Probe(), torch.randn(1, 3, 4, 4), exporter)
    assert seen and all(seen)
