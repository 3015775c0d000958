"""The fused GPU kernel of factorized layers (convgap.kernels.triton.pcp), checked on CPU
with triton's interpreter against float64 references of the convolutions it replaces, and
the layer mapping (convgap.layers.dispatch, kernel='triton') of every family against the
layer's dense kernel. Every interpreted check runs in ONE subprocess (see
tests/interpreted.py) that prints a JSON summary the tests assert on. Input checks and the
filter product run here."""

from __future__ import annotations

import json
import random
import textwrap

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from convgap.errors import ConvgapError  # noqa: E402
from convgap.kernels.triton import pcp  # noqa: E402
from interpreted import run_interpreted  # noqa: E402

TOL = 1e-5


def _cases(count: int, seed: int = 4) -> list[tuple]:
    """Seeded random geometries (tiny: the interpreter is slow): (N, C, H, W, R1, R3, O,
    kernel, stride, padding, dilation, groups, depthwise, bias, layout)."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        k = (rng.choice([1, 2, 3, 5]), rng.choice([1, 3]))
        s, d = (rng.choice([1, 2]), rng.choice([1, 2, 3])), (rng.choice([1, 2]), rng.choice([1, 2]))
        p = (rng.randint(0, k[0]), rng.randint(0, k[1]))
        h, w = rng.randint(3, 9), rng.randint(3, 9)
        if any(sz + 2 * pp - dd * (kk - 1) - 1 < 0
               for sz, pp, dd, kk in zip((h, w), p, d, k)):
            continue
        depthwise = rng.random() < 0.3
        r1 = rng.choice([3, 7, 16, 21])
        r3 = r1 if depthwise else rng.choice([2, 9, 16, 18])
        cases.append((rng.choice([1, 2]), rng.choice([3, 8, 17]), h, w, r1, r3,
                      rng.choice([5, 16, 33]), k, s, p, d,
                      1 if depthwise else rng.choice([1, 1, 3]), depthwise,
                      rng.random() < 0.5, rng.choice(["nchw", "cl", "slice"])))
    return cases


CASES = _cases(14)
FAMILIES = [("cp", 1, 1, 1), ("tucker", 2, 1, (1, 2)), ("tt", (2, 1), (1, 2), 1),
            ("tr", (1, 2), 2, (2, 1)), ("tt", 1, "same", 1), ("tr", 1, 1, 1)]

_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    from convgap.kernels.triton import interpreting, pcp
    from convgap.layers import dispatch
    import contextlib

    from convgap import TensorialConv2d, choice
    from interpreted import make_input, rel

    torch.manual_seed(0)
    out = {"interpreting": interpreting(), "cases": [], "families": [], "dtypes": {}}

    def reference(x, a, k, b, bias, s, p, d, z, depthwise):
        t = F.conv2d(x.double(), a.double().t()[..., None, None])
        if depthwise:
            u = F.conv2d(t, k.double()[:, None], None, s, p, d, groups=k.shape[0])
        else:
            u = F.conv2d(t, k.double().repeat(z, 1, 1, 1), None, s, p, d, groups=z)
        return F.conv2d(u, b.double()[..., None, None],
                        None if bias is None else bias.double())

    cases, families = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for (n, c, h, w, r1, r3, o, k, s, p, d, z, depthwise, has_bias, layout) in cases:
        x = make_input(n, c, h, w, layout)
        a, b = torch.randn(c, z * r1), torch.randn(o, z * r3)
        bias = torch.randn(o) if has_bias else None
        if depthwise:
            filt = torch.randn(r1, *k)
            y = pcp.pointwise_depthwise_pointwise(x, a, filt, b, bias, s, p, d)
        else:
            filt = torch.randn(r3, r1, *k)
            y = pcp.pointwise_conv_pointwise(x, a, filt, b, bias, s, p, d, groups=z)
        ref = reference(x, a, filt, b, bias, s, p, d, z, depthwise)
        out["cases"].append({
            "shape_ok": tuple(y.shape) == tuple(ref.shape), "err": rel(y, ref),
            "format_ok": y.is_contiguous(memory_format=torch.channels_last
                                         if layout == "cl" else torch.contiguous_format)})

    # every family's layer through the GPU mapping, against its dense kernel; then a
    # changed factor (the bound call is rebuilt by the caller; the prepared forms follow)
    ranks = {"cp": 6, "tucker": (5, 4), "tt": (5, 6, 4), "tr": (3, 2, 3, 2)}
    for fam, stride, padding, dilation in families:
        layer = TensorialConv2d(12, 10, 3, fam, rank=ranks[fam], stride=stride,
                                padding=padding, dilation=dilation, bias=True).eval()
        x = torch.randn(2, 12, 9, 8)
        store, errs = {}, []
        with torch.no_grad():
            for step in range(2):
                factors = list(layer.factors)
                call = dispatch.kernel_call(fam, x, factors, layer.bias, layer.stride,
                                            layer._pads(), layer.dilation, store,
                                            kernel="triton")
                y = call(x)
                ref = F.conv2d(x.double(), layer.dense_weight().double(),
                               layer.bias.double(), layer.stride, layer._pads(),
                               layer.dilation)
                errs.append(rel(y, ref) if y.shape == ref.shape else 1.0)
                layer.factors[1].mul_(-0.5)
        out["families"].append({"family": fam, "errs": errs})

    # the layer's own route to the kernel (forward, its one-time choice, the bound call
    # kept while the factors are unchanged), with the device test bypassed: CPU tensors
    from convgap.layers import tensorial
    tensorial.TensorialConv2d._kernel_applies = lambda self, x: True
    tensorial.TensorialConv2d._candidates = lambda self, x: ["triton"]
    forcing = contextlib.ExitStack()  # held to the end of the script
    forcing.enter_context(choice.forced({"tensorial": "triton"}))
    layer = TensorialConv2d(12, 10, 3, "tt", rank=(5, 6, 4), padding=1).eval()
    x = torch.randn(2, 12, 7, 6).contiguous(memory_format=torch.channels_last)
    errs = []
    with torch.no_grad():
        for step in range(3):
            if step == 2:
                layer.factors[3].mul_(2.0)
            y = layer(x)
            ref = F.conv2d(x.double(), layer.dense_weight().double(), layer.bias.double(),
                           padding=1)
            errs.append(rel(y, ref))
    out["layer"] = {"errs": errs, "runs": layer.kernel_for(x),
                    "channels_last": y.is_contiguous(memory_format=torch.channels_last)}

    # half precision: float32 accumulation, the output rounded once
    for name in ("float16", "bfloat16"):
        dt = getattr(torch, name)
        x = torch.randn(2, 8, 6, 6).to(dt)
        a, k = (torch.randn(8, 16) / 3).to(dt), (torch.randn(16, 16, 3, 3) / 12).to(dt)
        b, bias = (torch.randn(8, 16) / 4).to(dt), torch.randn(8).to(dt)
        y = pcp.pointwise_conv_pointwise(x, a, k, b, bias, 1, 1, 1)
        out["dtypes"][name] = {"dtype": str(y.dtype),
                               "err": rel(y, reference(x, a, k, b, bias, 1, 1, 1, 1, False))}
    try:  # a 5x5 filter on a 3x3 input without padding
        pcp.pointwise_conv_pointwise(torch.randn(1, 4, 3, 3), torch.randn(4, 2),
                                     torch.randn(2, 2, 5, 5), torch.randn(3, 2))
        out["too_small"] = None
    except Exception as e:
        out["too_small"] = type(e).__name__
    print("JSON:" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(_SCRIPT, json.dumps(CASES), json.dumps(FAMILIES))


def test_runs_under_the_interpreter(results):
    assert results["interpreting"] is True
    assert len(results["cases"]) == len(CASES) and len(results["families"]) == len(FAMILIES)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_kernel_matches_float64_reference(results, i):
    r = results["cases"][i]
    assert r["shape_ok"] and r["format_ok"], CASES[i]
    assert r["err"] <= TOL, (CASES[i], r["err"])


@pytest.mark.parametrize("i", range(len(FAMILIES)))
def test_every_family_maps_onto_the_kernel(results, i):
    r = results["families"][i]
    assert r["family"] == FAMILIES[i][0]
    assert max(r["errs"]) <= TOL, (FAMILIES[i], r["errs"])


def test_layer_forward_reaches_the_kernel(results):
    r = results["layer"]
    assert r["runs"] == "triton" and r["channels_last"]
    assert max(r["errs"]) <= TOL, r["errs"]


@pytest.mark.parametrize("name,tol", [("float16", 2e-3), ("bfloat16", 1.6e-2)])
def test_half_precision(results, name, tol):
    r = results["dtypes"][name]
    assert r["dtype"] == f"torch.{name}" and r["err"] <= tol


def test_sequential_core_equals_the_two_convolutions():
    """TT's k x 1 then 1 x k filters as one k x k filter, with split geometry."""
    k1, k2 = torch.randn(6, 5, 3, 1, dtype=torch.float64), torch.randn(7, 6, 1, 3,
                                                                        dtype=torch.float64)
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64)
    two = F.conv2d(F.conv2d(x, k1, None, (2, 1), (1, 0), (1, 1)), k2, None, (1, 3), (0, 2),
                   (1, 2))
    one = F.conv2d(x, pcp.sequential_core(k1, k2), None, (2, 3), (1, 2), (1, 2))
    assert one.shape == two.shape
    assert torch.allclose(one, two, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConvgapError, match="expected k1"):
        pcp.sequential_core(torch.randn(6, 5, 3, 3), k2)


def _operands(**change):
    ops = {"x": torch.randn(1, 8, 6, 6), "a": torch.randn(8, 4), "k": torch.randn(5, 4, 3, 3),
           "b": torch.randn(7, 5), "bias": None}
    ops.update(change)
    return ops


@pytest.mark.parametrize("change,match", [
    ({"a": torch.randn(9, 4)}, "channel counts disagree"),
    ({"b": torch.randn(7, 6)}, "channel counts disagree"),
    ({"k": torch.randn(5, 4, 3)}, "expected x"),
    ({"bias": torch.randn(6)}, "bias must have shape"),
    ({"a": torch.randn(8, 4, dtype=torch.float64)}, "every operand must match"),
    ({"x": torch.randn(1, 8, 6, 6, dtype=torch.float64),
      "a": torch.randn(8, 4, dtype=torch.float64), "k": torch.randn(5, 4, 3, 3).double(),
      "b": torch.randn(7, 5, dtype=torch.float64)}, "float32, float16 or bfloat16"),
    ({"a": torch.randn(8, 4, requires_grad=True)}, "inference only"),
    ({"a": [[1.0]]}, "must be a tensor"),
])
def test_bad_inputs_raise(change, match):
    ops = _operands(**change)
    with pytest.raises(ConvgapError, match=match):
        pcp.pointwise_conv_pointwise(ops["x"], ops["a"], ops["k"], ops["b"], ops["bias"],
                                     padding=1)


def test_bad_groups_and_geometry_raise():
    ops = _operands()
    with pytest.raises(ConvgapError, match="groups"):
        pcp.pointwise_conv_pointwise(ops["x"], ops["a"], ops["k"], ops["b"], groups=0)
    with pytest.raises(ConvgapError, match="channel counts"):  # 2 groups need a of 8 x 8
        pcp.pointwise_conv_pointwise(ops["x"], ops["a"], ops["k"], ops["b"], groups=2)


def test_cpu_tensors_without_the_interpreter_raise():
    ops = _operands()
    if pcp.interpreting():
        pytest.skip("this process interprets triton")
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        pcp.pointwise_depthwise_pointwise(ops["x"], ops["a"], torch.randn(4, 3, 3),
                                          torch.randn(7, 4))


def test_filter_larger_than_the_input_raises(results):
    assert results["too_small"] == "ConvgapError"
