"""convgap's Triton grouped conv (convgap.kernels.triton.grouped), checked on CPU with
triton's interpreter against float64 F.conv2d: group widths 4-16, 3x3 and 5x5, odd map
sizes (TMA's zero fill is the padding, its clipped stores the tails), every dtype, any input
format; and through blocks.convfirst (w1_diagonal). Interpreted in one subprocess
(tests/interpreted.py); tests/test_gpu.py runs the same script compiled for a GPU."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from convgap.errors import ConvgapError  # noqa: E402
from convgap.kernels.triton import grouped  # noqa: E402
from interpreted import compile_for_hopper, run_interpreted  # noqa: E402

TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}

# (N, C, H, W, group width, kernel, layout, dtype)
CASES = [
    (2, 32, 5, 7, 8, 3, "cl", "float32"),
    (1, 48, 6, 6, 8, 3, "nchw", "float32"),
    (1, 16, 9, 5, 4, 5, "slice", "float32"),
    (1, 64, 3, 6, 16, 3, "shifted", "float32"),
    (1, 32, 6, 6, 8, 3, "cl", "bfloat16"),
    (1, 64, 4, 4, 16, 3, "cl", "float16"),
]

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    from convgap.kernels.triton import blocks, grouped, interpreting
    from interpreted import make_input, rel

    torch.manual_seed(0)
    if len(sys.argv) > 2:  # tests/test_gpu.py: compiled for a GPU
        torch.set_default_device(sys.argv[2])
    out = {"interpreting": interpreting(), "cases": []}
    for n, c, h, w, gw, k, layout, dt in json.loads(sys.argv[1]):
        dt = getattr(torch, dt)
        x = make_input(n, c, h, w, layout).to(dt)
        wt = (torch.randn(c, gw, k, k) / (k * gw ** 0.5)).to(dt)
        b = torch.randn(c).to(dt)
        y = grouped.grouped_conv(x, grouped.block_diagonal(wt), b, (k, k))
        ref = F.conv2d(x.double(), wt.double(), b.double(), padding=k // 2, groups=c // gw)
        out["cases"].append({"err": rel(y, ref), "shape_ok": tuple(y.shape) == (n, c, h, w),
                             "cl": y.is_contiguous(memory_format=torch.channels_last),
                             "dtype_ok": y.dtype == dt})
    # the whole ConvFirst block with the Triton grouped conv
    x = make_input(1, 32, 5, 6, "cl")
    w1, w2, w3 = torch.randn(32, 8, 3, 3) / 8, torch.randn(128, 32) / 6, torch.randn(32, 128) / 11
    b1, b2, b3 = torch.randn(32), torch.randn(128), torch.randn(32)
    y = blocks.convfirst(x, w1, b1, w2, b2, w3, b3, w1_diagonal=grouped.block_diagonal(w1))
    u = F.conv2d(x.double(), w1.double(), b1.double(), padding=1, groups=4)
    t = F.silu(F.conv2d(u, w2.double()[..., None, None], b2.double()))
    out["convfirst"] = rel(y, x.double() + F.conv2d(t, w3.double()[..., None, None],
                                                     b3.double()))
    print("JSON:" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(SCRIPT, json.dumps(CASES))


def assert_agrees(out: dict) -> None:
    assert len(out["cases"]) == len(CASES)
    for r, case in zip(out["cases"], CASES):
        assert r["shape_ok"] and r["cl"] and r["dtype_ok"], case
        assert r["err"] <= TOL[case[7]], (case, r["err"])
    assert out["convfirst"] <= 1e-4


def test_grouped_conv_matches_float64_reference(results):
    assert results["interpreting"] is True
    assert_agrees(results)


def test_block_diagonal_holds_each_group_on_the_diagonal():
    w = torch.randn(32, 8, 3, 3)
    bd = grouped.block_diagonal(w)   # chunks of 32: one chunk, 4 groups
    assert bd.shape == (9, 32, 32)
    for o in range(32):
        g = o // 8
        assert torch.equal(bd[:, g * 8:g * 8 + 8, o], w[o].reshape(8, 9).t())
        assert bd[:, :g * 8, o].abs().sum() == 0 and bd[:, g * 8 + 8:, o].abs().sum() == 0
    assert grouped.chunk_width(96, 8) == 32 and grouped.chunk_width(24, 8) is None


@pytest.mark.parametrize("args,match", [
    ((torch.randn(1, 24, 5, 5), torch.randn(24, 8, 3, 3)), "tile by 16, 32 or 64"),
    ((torch.randn(1, 32, 5, 5), torch.randn(32, 8, 2, 2)), "odd filter"),
    ((torch.randn(1, 32, 5, 5).half(), torch.randn(32, 8, 3, 3)), "x is torch.float16"),
])
def test_bad_operands_raise(args, match):
    x, w = args
    with pytest.raises(ConvgapError, match=match):
        grouped.grouped_conv(x, grouped.block_diagonal(w), torch.randn(x.shape[1]),
                             tuple(w.shape[2:]))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernel_compiles_for_hopper(dtype):
    """Compiled here for sm_90 down to its cubin: 4-D TMA loads into wgmma."""
    bh, bw, bc, warps, stages = grouped.CONFIGS[0]
    constexprs = dict(KH=3, KW=3, PRECISION="ieee" if dtype == "fp32" else None,
                      UPCAST=False, BH=bh, BW=bw, BC=bc)
    box = (1, bh, bw, bc)
    kernel = compile_for_hopper(grouped._kernel, constexprs, dtype,
                                {"x_desc": box, "y_desc": box}, warps, stages)
    assert kernel.asm["cubin"] and "cp.async.bulk.tensor" in kernel.asm["ptx"]
    if dtype == "bf16":
        assert "wgmma.mma_async" in kernel.asm["ptx"]
