"""The fused GPU block kernels (convgap.kernels.triton.blocks), checked on CPU with triton's
interpreter against float64 F.conv2d chains of the layers they replace: the inverted
residual (expand, depthwise, project; stride 2, no expansion, 5x5, every activation) and
the ConvFirst block (grouped 3x3, expand, project, residual), in float32, float16 and
bfloat16 and in several memory formats and weight strides. Every interpreted check runs in
ONE subprocess (see tests/interpreted.py) that prints a JSON summary the tests assert on;
the operand checks run here (they raise before anything is launched). tests/test_gpu.py runs
the same script compiled for a GPU."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from convgap.errors import ConvgapError  # noqa: E402
from convgap.kernels.triton import blocks  # noqa: E402
from interpreted import compile_for_hopper, run_interpreted  # noqa: E402

TOL = 1e-4  # float32: relative to the reference's largest magnitude
# half precision: x, the weights and the output rounded to the dtype, the depthwise /
# grouped results and the activations rounded once more before each 1x1 conv
HALF_TOL = {"float16": 2e-3, "bfloat16": 1.6e-2}

# (N, C, H, W, R, O, kernel, stride, padding, act, residual, expand, layout, dtype,
#  weights stored transposed); layout as tests/interpreted.make_input
IR_CASES = [
    (2, 8, 6, 6, 48, 8, 3, 1, 1, "relu6", True, True, "cl", "float32", False),
    (1, 16, 7, 7, 32, 24, 3, 2, 1, "relu", False, True, "cl", "float32", False),
    (1, 16, 6, 5, 16, 8, 3, 1, 1, "silu", False, False, "nchw", "float32", False),
    (1, 24, 7, 7, 16, 8, 5, 2, 2, "relu6", False, True, "slice", "float32", False),
    (1, 8, 5, 5, 32, 8, 3, 1, 1, "silu", True, True, "cl", "float32", True),
    (1, 16, 5, 6, 32, 16, 3, 1, 0, "relu", False, True, "nchw", "float32", True),
    (1, 16, 6, 6, 32, 16, 3, 1, 1, "relu6", True, True, "cl", "float16", False),
    (1, 16, 6, 6, 32, 16, 3, 1, 1, "relu6", True, True, "cl", "bfloat16", False),
]
# (N, C, H, W, group width, act, layout, dtype, weights stored transposed)
CF_CASES = [
    (2, 16, 6, 6, 8, "silu", "cl", "float32", False),
    (1, 24, 4, 4, 8, "relu", "cl", "float32", False),
    (1, 8, 5, 5, 8, "relu6", "nchw", "float32", True),
    (1, 16, 4, 6, 4, "silu", "slice", "float32", False),
    (1, 16, 4, 5, 16, "silu", "cl", "float32", True),
    (1, 16, 5, 5, 8, "silu", "cl", "float16", False),
    (1, 16, 5, 5, 8, "silu", "cl", "bfloat16", False),
    (1, 12, 5, 5, 6, "silu", "cl", "float32", False),   # a group width not a power of two
    (2, 40, 3, 5, 8, "silu", "slice", "float32", True),  # C > the K and output tiles
    (1, 40, 4, 4, 8, "silu", "cl", "bfloat16", True),
]
# pointwise_mlp alone: (N, C, H, W, E, O, residual, act, layout, dtype)
MLP_CASES = [
    (2, 16, 3, 5, 48, 40, False, "silu", "nchw", "float32"),
    (1, 24, 4, 4, 40, 24, True, "relu", "slice", "float32"),
    (1, 8, 5, 3, 24, 8, True, "relu6", "cl", "float32"),
    (1, 32, 3, 3, 64, 48, False, "silu", "cl", "float16"),
    (1, 32, 3, 3, 64, 32, True, "silu", "cl", "bfloat16"),
    (2, 16, 3, 4, 32, 16, True, "silu", "shifted", "float32"),  # copied for TMA
]

_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    from convgap.kernels.triton import blocks, interpreting
    from interpreted import make_input, rel

    ACT = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu}
    torch.manual_seed(0)
    if len(sys.argv) > 4:  # tests/test_gpu.py: the same cases compiled for a GPU
        torch.set_default_device(sys.argv[4])
    out = {"interpreting": interpreting(), "ir": [], "cf": [], "mlp": []}

    def stored(t, transposed):
        # the same values in transposed storage: the kernels take any weight strides
        return t.t().contiguous().t() if transposed else t

    def ir_reference(x, a, bias1, d, bias2, b, bias, s, p, act, residual):
        x = x.double()
        t = x if a is None else ACT[act](F.conv2d(x, a.double().t()[..., None, None],
                                                  bias1.double()))
        u = ACT[act](F.conv2d(t, d.double()[:, None], bias2.double(), s, p,
                              groups=d.shape[0]))
        y = F.conv2d(u, b.double()[..., None, None], bias.double())
        return y + x if residual else y

    def cf_reference(x, w1, bias1, w2, bias2, w3, bias3, act):
        x = x.double()
        u = F.conv2d(x, w1.double(), bias1.double(), padding=1,
                     groups=x.shape[1] // w1.shape[1])
        return x + mlp_reference(u, w2, bias2, w3, bias3, act)

    def mlp_reference(u, w2, bias2, w3, bias3, act):
        t = ACT[act](F.conv2d(u.double(), w2.double()[..., None, None], bias2.double()))
        return F.conv2d(t, w3.double()[..., None, None], bias3.double())

    def summary(y, ref, x, layout):
        fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
        return {"shape_ok": tuple(y.shape) == tuple(ref.shape), "err": rel(y, ref),
                "dtype_ok": y.dtype == x.dtype, "format_ok": y.is_contiguous(memory_format=fmt)}

    ir_cases, cf_cases, mlp_cases = (json.loads(a) for a in sys.argv[1:4])
    for (n, c, h, w, r, o, k, s, p, act, residual, expand, layout, dt,
         transposed) in ir_cases:
        dt = getattr(torch, dt)
        if not expand:
            r = c
        x = make_input(n, c, h, w, layout).to(dt)
        a = stored(torch.randn(c, r) / c ** 0.5, transposed).to(dt) if expand else None
        bias1 = torch.randn(r).to(dt) if expand else None
        d = (torch.randn(r, k, k) / k).to(dt)
        b = stored(torch.randn(o, r) / r ** 0.5, transposed).to(dt)
        bias2, bias = torch.randn(r).to(dt), torch.randn(o).to(dt)
        kw = dict(stride=s, padding=p, act=act, residual=residual)
        y = blocks.inverted_residual(x, a, bias1, d, bias2, b, bias, **kw)
        res = summary(y, ir_reference(x, a, bias1, d, bias2, b, bias, s, p, act, residual),
                      x, layout)
        res["supports"] = blocks.supports("inverted_residual", x, a, bias1, d, bias2, b,
                                          bias, **kw)
        out["ir"].append(res)
    for (n, c, h, w, gw, act, layout, dt, transposed) in cf_cases:
        dt = getattr(torch, dt)
        x = make_input(n, c, h, w, layout).to(dt)
        w1 = (torch.randn(c, gw, 3, 3) / (3 * gw ** 0.5)).to(dt)
        w2 = stored(torch.randn(4 * c, c) / c ** 0.5, transposed).to(dt)
        w3 = stored(torch.randn(c, 4 * c) / (2 * c ** 0.5), transposed).to(dt)
        bias1, bias2, bias3 = (torch.randn(m).to(dt) for m in (c, 4 * c, c))
        y = blocks.convfirst(x, w1, bias1, w2, bias2, w3, bias3, act=act)
        res = summary(y, cf_reference(x, w1, bias1, w2, bias2, w3, bias3, act), x, layout)
        res["supports"] = blocks.supports("convfirst", x, w1, bias1, w2, bias2, w3, bias3,
                                          act=act)
        out["cf"].append(res)
    for (n, c, h, w, e, o, residual, act, layout, dt) in mlp_cases:
        dt = getattr(torch, dt)
        u = make_input(n, c, h, w, layout).to(dt)
        w2 = (torch.randn(e, c) / c ** 0.5).to(dt)
        w3 = (torch.randn(o, e) / e ** 0.5).to(dt)
        bias2, bias3 = torch.randn(e).to(dt), torch.randn(o).to(dt)
        r = make_input(n, o, h, w, layout).to(dt) if residual else None
        y = blocks.pointwise_mlp(u, w2, bias2, w3, bias3, r, act=act)
        ref = mlp_reference(u, w2, bias2, w3, bias3, act)
        res = summary(y, ref if r is None else ref + r.double(), u, "cl")
        out["mlp"].append(res)
    # a residual add at stride 2: a reason, not None, under the interpreter too
    x = torch.randn(1, 8, 6, 6)
    out["refused"] = blocks.supports("inverted_residual", x, torch.randn(8, 16),
                                     torch.randn(16), torch.randn(16, 3, 3), torch.randn(16),
                                     torch.randn(8, 16), torch.randn(8), stride=2,
                                     padding=1, residual=True)
    print("JSON:" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(_SCRIPT, json.dumps(IR_CASES), json.dumps(CF_CASES),
                           json.dumps(MLP_CASES))


def test_runs_under_the_interpreter(results):
    assert results["interpreting"] is True
    assert len(results["ir"]) == len(IR_CASES) and len(results["cf"]) == len(CF_CASES)
    assert len(results["mlp"]) == len(MLP_CASES)


def _assert_agrees(r: dict, case: tuple, dtype: str) -> None:
    assert r["shape_ok"] and r["dtype_ok"] and r["format_ok"], case
    assert r["err"] <= HALF_TOL.get(dtype, TOL), (case, r["err"])
    assert r.get("supports") is None, (case, r["supports"])


@pytest.mark.parametrize("i", range(len(IR_CASES)))
def test_inverted_residual_matches_float64_reference(results, i):
    _assert_agrees(results["ir"][i], IR_CASES[i], IR_CASES[i][13])


@pytest.mark.parametrize("i", range(len(CF_CASES)))
def test_convfirst_matches_float64_reference(results, i):
    _assert_agrees(results["cf"][i], CF_CASES[i], CF_CASES[i][7])


@pytest.mark.parametrize("i", range(len(MLP_CASES)))
def test_pointwise_mlp_matches_float64_reference(results, i):
    """Output channels != input channels, no residual, any input format: the output
    comes back channels_last."""
    _assert_agrees(results["mlp"][i], MLP_CASES[i], MLP_CASES[i][9])


def test_supports_gives_the_reason_under_the_interpreter(results):
    assert "residual add" in results["refused"]


# per kernel: its function, the constexprs of its first GPU config and a zoo-like problem,
# num_warps, num_stages, the arguments specialized to 1 (unit strides, as triton does for
# channels_last operands and weights stored as the fused modules store them)
_BM, _BK, _BE, _BN, _MW, _MS = blocks.MLP_CONFIGS[0]
_COMPILED = {
    "inverted_residual": (blocks._ir_kernel,
                          dict(KH=3, KW=3, EXPAND=True, RESIDUAL=True, ACT="relu6",
                               BLOCK_C=32, BLOCK_P=blocks.IR_CONFIGS[0][0],
                               BLOCK_R=blocks.IR_CONFIGS[0][1],
                               BLOCK_O=blocks.IR_CONFIGS[0][2]),
                          blocks.IR_CONFIGS[0][3], 3, ("x_sc", "y_sc", "a_sr", "d_sr", "b_so")),
    "pointwise_mlp": (blocks._mlp_kernel,
                      dict(ACT="silu", RESIDUAL=True, BLOCK_M=_BM, BLOCK_K=_BK, BLOCK_E=_BE,
                           BLOCK_N=_BN, ONE_K=True), _MW, _MS, ()),
}
# the pointwise MLP's tensor descriptors: their tiles at that configuration
_DESCS = {"u_desc": (_BM, _BK), "w2_desc": (_BE, _BK), "w3_desc": (_BN, _BE),
          "r_desc": (_BM, _BN), "y_desc": (_BM, _BN)}


@pytest.mark.parametrize("block", list(_COMPILED))
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_hopper(block, dtype):
    """The interpreter runs what a GPU would reject (layouts, types, register-held tiles),
    and no GPU runs the tests: each kernel is compiled here for sm_90 down to its cubin."""
    fn, constexprs, warps, stages, unit = _COMPILED[block]
    constexprs = dict(constexprs, PRECISION="ieee" if dtype == "fp32" else None,
                      UPCAST=False, **dict.fromkeys(unit, 1))
    kernel = compile_for_hopper(fn, constexprs, dtype,
                                _DESCS if block == "pointwise_mlp" else {}, warps, stages)
    assert kernel.asm["cubin"]
    if block == "pointwise_mlp" and dtype == "bf16":  # Hopper: TMA tiles into wgmma
        assert "wgmma.mma_async" in kernel.asm["ptx"]
        assert "cp.async.bulk.tensor" in kernel.asm["ptx"]


def _ir_operands(**change) -> dict:
    ops = {"x": torch.randn(1, 8, 6, 6), "a": torch.randn(8, 16), "bias1": torch.randn(16),
           "d": torch.randn(16, 3, 3), "bias2": torch.randn(16), "b": torch.randn(8, 16),
           "bias": torch.randn(8), "stride": 1, "padding": 1, "act": "relu6",
           "residual": True}
    ops.update(change)
    return ops


def _cf_operands(**change) -> dict:
    ops = {"x": torch.randn(1, 16, 5, 5), "w1": torch.randn(16, 8, 3, 3),
           "bias1": torch.randn(16), "w2": torch.randn(64, 16), "bias2": torch.randn(64),
           "w3": torch.randn(16, 64), "bias3": torch.randn(16), "act": "silu"}
    ops.update(change)
    return ops


_F64 = {name: t.double() for name, t in _ir_operands().items() if isinstance(t, torch.Tensor)}


@pytest.mark.parametrize("change,match", [
    ({"a": torch.randn(9, 16)}, "channel counts disagree"),
    ({"b": torch.randn(8, 12)}, "channel counts disagree"),
    ({"d": torch.randn(16, 3)}, "expected a"),
    ({"bias2": torch.randn(15)}, "bias2 must be a contiguous"),
    ({"bias": torch.randn(16)[::2]}, "bias must be a contiguous"),
    ({"stride": 2}, "residual add"),
    ({"b": torch.randn(12, 16), "bias": torch.randn(12)}, "residual add"),
    ({"act": "gelu"}, "unknown activation"),
    ({"padding": -1}, "padding >= 0"),
    ({"a": None}, "bias1 must be None"),
    ({"d": torch.randn(16, 7, 7), "padding": 0, "residual": False}, "does not fit"),
    ({"bias": torch.randn(8, dtype=torch.float16)}, "every operand must match"),
    (_F64, "float32, float16 or bfloat16"),
    ({"d": torch.randn(16, 3, 3, requires_grad=True)}, "inference only"),
    ({"a": [[1.0]]}, "must be a tensor"),
    ({"x": torch.randn(8, 6, 6)}, "expected x"),
])
def test_inverted_residual_bad_operands_raise(change, match):
    ops = _ir_operands(**change)
    with pytest.raises(ConvgapError, match=match):
        blocks.inverted_residual(**ops)
    x = ops.pop("x")
    assert match in blocks.supports("inverted_residual", x, **ops)


@pytest.mark.parametrize("change,match", [
    ({"x": torch.randn(1, 12, 5, 5), "w1": torch.randn(12, 8, 3, 3)},
     "channel counts disagree"),
    ({"w1": torch.randn(16, 8, 2, 2)}, "odd filter"),
    ({"w3": torch.randn(16, 32)}, "channel counts disagree"),
    ({"w2": torch.randn(64, 16, 1, 1)}, "expected w1"),
    ({"bias2": torch.randn(16)}, "bias2 must be a contiguous"),
    ({"act": "tanh"}, "unknown activation"),
    ({"w3": torch.randn(16, 64).half()}, "every operand must match"),
    ({name: t.bfloat16() for name, t in _cf_operands(
        x=torch.randn(1, 12, 5, 5), w1=torch.randn(12, 4, 3, 3), bias1=torch.randn(12),
        w2=torch.randn(48, 12), w3=torch.randn(12, 48), bias3=torch.randn(12),
        bias2=torch.randn(48)).items() if name != "act"}, "C = 12 must be a multiple of 8"),
])
def test_convfirst_bad_operands_raise(change, match):
    ops = _cf_operands(**change)
    with pytest.raises(ConvgapError, match=match):
        blocks.convfirst(**ops)
    x = ops.pop("x")
    assert match in blocks.supports("convfirst", x, **ops)


def _mlp_operands(**change) -> dict:
    ops = {"u": torch.randn(1, 16, 5, 5), "w2": torch.randn(64, 16), "bias2": torch.randn(64),
           "w3": torch.randn(24, 64), "bias3": torch.randn(24), "residual": None,
           "act": "silu"}
    ops.update(change)
    return ops


@pytest.mark.parametrize("change,match", [
    ({"w2": torch.randn(64, 12)}, "expected w2"),
    ({"w3": torch.randn(24, 32)}, "expected w2"),
    ({"w2": torch.randn(64, 16, 1, 1)}, "expected w2"),
    ({"bias3": torch.randn(16)}, "bias3 must be a contiguous"),
    ({"residual": torch.randn(1, 16, 5, 5)}, "residual must be"),
    ({"act": "gelu"}, "unknown activation"),
    ({"u": torch.randn(1, 16, 5, 5).half()}, "every operand must match"),
    ({"u": torch.randn(1, 6, 5, 5), "w2": torch.randn(64, 6)}, "C = 6 must be a multiple of 4"),
    ({"w2": torch.randn(62, 16), "bias2": torch.randn(62), "w3": torch.randn(24, 62)},
     "E = 62 must be a multiple of 4"),
])
def test_pointwise_mlp_bad_operands_raise(change, match):
    with pytest.raises(ConvgapError, match=match):
        blocks.pointwise_mlp(**_mlp_operands(**change))


def test_supports_names_the_blocks():
    with pytest.raises(ConvgapError, match="unknown block"):
        blocks.supports("resnet_basic", torch.randn(1, 8, 6, 6))


def test_cpu_tensors_without_the_interpreter_are_refused():
    if blocks.interpreting():
        pytest.skip("this process interprets triton")
    ops = _cf_operands()
    x = ops.pop("x")
    assert "CUDA tensor" in blocks.supports("convfirst", x, **ops)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        blocks.convfirst(x, **ops)
    ops = _ir_operands()
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        blocks.inverted_residual(**ops)
