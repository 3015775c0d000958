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
from interpreted import run_interpreted  # noqa: E402

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
]

_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    from convgap.kernels.triton import blocks, interpreting
    from interpreted import make_input, rel

    ACT = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu}
    torch.manual_seed(0)
    if len(sys.argv) > 3:  # tests/test_gpu.py: the same cases compiled for a GPU
        torch.set_default_device(sys.argv[3])
    out = {"interpreting": interpreting(), "ir": [], "cf": []}

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
        t = ACT[act](F.conv2d(u, w2.double()[..., None, None], bias2.double()))
        return x + F.conv2d(t, w3.double()[..., None, None], bias3.double())

    def summary(y, ref, x, layout):
        fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
        return {"shape_ok": tuple(y.shape) == tuple(ref.shape), "err": rel(y, ref),
                "dtype_ok": y.dtype == x.dtype, "format_ok": y.is_contiguous(memory_format=fmt)}

    ir_cases, cf_cases = json.loads(sys.argv[1]), json.loads(sys.argv[2])
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
    return run_interpreted(_SCRIPT, json.dumps(IR_CASES), json.dumps(CF_CASES))


def test_runs_under_the_interpreter(results):
    assert results["interpreting"] is True
    assert len(results["ir"]) == len(IR_CASES) and len(results["cf"]) == len(CF_CASES)


def _assert_agrees(r: dict, case: tuple, dtype: str) -> None:
    assert r["shape_ok"] and r["dtype_ok"] and r["format_ok"], case
    assert r["err"] <= HALF_TOL.get(dtype, TOL), (case, r["err"])
    assert r["supports"] is None, (case, r["supports"])


@pytest.mark.parametrize("i", range(len(IR_CASES)))
def test_inverted_residual_matches_float64_reference(results, i):
    _assert_agrees(results["ir"][i], IR_CASES[i], IR_CASES[i][13])


@pytest.mark.parametrize("i", range(len(CF_CASES)))
def test_convfirst_matches_float64_reference(results, i):
    _assert_agrees(results["cf"][i], CF_CASES[i], CF_CASES[i][7])


def test_supports_gives_the_reason_under_the_interpreter(results):
    assert "residual add" in results["refused"]


# the constexprs of each kernel's first GPU config and a zoo-like problem; pointers and
# ints as triton types, unit strides specialized as triton does for channels_last operands
_COMPILED = {
    "inverted_residual": (dict(KH=3, KW=3, EXPAND=True, RESIDUAL=True, ACT="relu6",
                               BLOCK_C=32, BLOCK_P=blocks.IR_CONFIGS[0][0],
                               BLOCK_R=blocks.IR_CONFIGS[0][1],
                               BLOCK_O=blocks.IR_CONFIGS[0][2]),
                          blocks.IR_CONFIGS[0][3], ("x_sc", "y_sc", "a_sr", "d_sr", "b_so")),
    "convfirst": (dict(KH=3, KW=3, GW=8, ACT="silu", BLOCK_G=16,
                       BLOCK_P=blocks.CF_CONFIGS[0][0], BLOCK_E=blocks.CF_CONFIGS[0][1],
                       BLOCK_O=blocks.CF_CONFIGS[0][2]),
                  blocks.CF_CONFIGS[0][3], ("x_sc", "y_sc", "w1_so", "w2_se", "w3_so")),
}


@pytest.mark.parametrize("block", list(_COMPILED))
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_hopper(block, dtype):
    """The interpreter runs what a GPU would reject (layouts, types, register-held tiles),
    and no GPU runs the tests: each kernel is compiled here for sm_90 down to its cubin."""
    import triton
    if blocks.interpreting():
        pytest.skip("this process interprets triton")
    nvidia = pytest.importorskip("triton.backends.nvidia.compiler")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    try:
        nvidia.get_ptxas(90).path
    except Exception as exc:  # noqa: BLE001 - a triton without its bundled ptxas
        pytest.skip(f"no ptxas: {exc}")
    constexprs, warps, unit = _COMPILED[block]
    constexprs = dict(constexprs, PRECISION="ieee" if dtype == "fp32" else None,
                      UPCAST=False, **dict.fromkeys(unit, 1))
    fn = triton.runtime.JITFunction(blocks._SPECS[block][0])
    signature = {name: "constexpr" if name in constexprs else
                 f"*{dtype}" if name.endswith("_ptr") else "i32" for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, signature, constexprs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert kernel.asm["cubin"]


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
    ({"x": torch.randn(1, 12, 5, 5), "w1": torch.randn(12, 6, 3, 3),
      "w2": torch.randn(48, 12), "w3": torch.randn(12, 48), "bias1": torch.randn(12),
      "bias2": torch.randn(48), "bias3": torch.randn(12)}, "power of two"),
    ({"w1": torch.randn(16, 8, 2, 2)}, "odd filter"),
    ({"w3": torch.randn(16, 32)}, "channel counts disagree"),
    ({"w2": torch.randn(64, 16, 1, 1)}, "expected w1"),
    ({"bias2": torch.randn(16)}, "bias2 must be a contiguous"),
    ({"act": "tanh"}, "unknown activation"),
    ({"w3": torch.randn(16, 64).half()}, "every operand must match"),
])
def test_convfirst_bad_operands_raise(change, match):
    ops = _cf_operands(**change)
    with pytest.raises(ConvgapError, match=match):
        blocks.convfirst(**ops)


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
