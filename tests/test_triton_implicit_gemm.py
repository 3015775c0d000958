"""The Triton implicit-GEMM convolution, checked on CPU with triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton is first imported, and other tests of the
session may already have imported it, so every kernel check runs in ONE subprocess (tiny
shapes: the interpreter is slow) that prints a JSON summary the tests assert on.
"""

from __future__ import annotations

import json
import random
import textwrap

import pytest

pytest.importorskip("triton")

from convgap.algorithms import ConvSpec, get  # noqa: E402
from interpreted import run_interpreted, run_py  # noqa: E402

TOL = 1e-4

# (name, N, C, O, H, W, kernel, stride, padding, dilation, groups, bias, layout, flat_k)
# layout: 'nchw' contiguous, 'cl' channels_last, 'slice' a strided view.
# flat_k: None = the wrapper's choice (flat K loop unless C/groups % 16 == 0).
CASES = [
    ("1x1", 2, 16, 16, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1), 1, True, "nchw", None),
    ("1x1_s2_cl", 1, 8, 24, 8, 8, (1, 1), (2, 2), (0, 0), (1, 1), 1, False, "cl", None),
    ("3x3_pad", 2, 16, 16, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "nchw", None),
    ("3x3_s2_slice", 1, 16, 32, 8, 8, (3, 3), (2, 2), (1, 1), (1, 1), 1, True, "slice", None),
    ("3x3_c3_stem", 2, 3, 16, 8, 7, (3, 3), (2, 2), (1, 1), (1, 1), 1, True, "nchw", None),
    ("3x3_dil2", 1, 16, 16, 8, 8, (3, 3), (1, 1), (2, 2), (2, 2), 1, False, "cl", None),
    ("3x3_nopad", 1, 8, 12, 7, 6, (3, 3), (1, 1), (0, 0), (1, 1), 1, True, "slice", None),
    ("3x3_g2", 2, 16, 16, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, True, "cl", None),
    ("3x3_g4_s2", 1, 16, 32, 7, 7, (3, 3), (2, 2), (1, 1), (1, 1), 4, False, "nchw", None),
    ("3x3_depthwise", 1, 8, 8, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 8, True, "cl", None),
    ("5x5_pad2", 1, 8, 16, 8, 8, (5, 5), (1, 1), (2, 2), (1, 1), 1, True, "nchw", None),
    ("5x5_s2_dil", 1, 16, 16, 8, 8, (5, 5), (2, 1), (2, 3), (1, 2), 1, True, "slice", None),
    ("1x3", 2, 16, 20, 6, 6, (1, 3), (1, 1), (0, 1), (1, 1), 1, True, "nchw", None),
    ("3x1_s12", 1, 12, 16, 8, 5, (3, 1), (1, 2), (1, 0), (1, 1), 1, False, "cl", None),
    ("pertap_tail", 1, 24, 16, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "nchw", False),
    ("pertap_g2_tail", 1, 20, 16, 5, 5, (3, 3), (2, 2), (1, 1), (1, 1), 2, True, "slice", False),
    ("flat_forced", 1, 16, 16, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "cl", True),
    ("pad_gt_half_kernel", 1, 8, 8, 4, 4, (3, 3), (1, 1), (3, 2), (1, 1), 1, True, "nchw", None),
]



def _random_cases(count: int, seed: int = 2026) -> list[tuple]:
    """Seeded random configurations (deterministic): kernel, stride, padding, dilation,
    groups, bias and layout drawn independently, sizes kept valid and tiny."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        g = rng.choice([1, 1, 2, 4])
        c, o = g * rng.choice([1, 3, 4, 8]), g * rng.choice([2, 5, 8])
        k = (rng.choice([1, 2, 3, 5]), rng.choice([1, 3, 4]))
        s, d = (rng.choice([1, 2]), rng.choice([1, 3])), (rng.choice([1, 2]), 1)
        p = (rng.randint(0, k[0]), rng.randint(0, k[1]))
        h, w = rng.randint(3, 8), rng.randint(3, 8)
        if any(sz + 2 * pp - dd * (kk - 1) - 1 < 0
               for sz, pp, dd, kk in zip((h, w), p, d, k)):
            continue
        cases.append((f"random{len(cases)}", rng.choice([1, 2]), c, o, h, w, k, s, p, d, g,
                      rng.random() < 0.5, rng.choice(["nchw", "cl", "slice"]),
                      rng.choice([None, None, True, False])))
    return cases


CASES += _random_cases(8)

_SCRIPT = textwrap.dedent("""
    import json, os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    import torch.nn.functional as F
    from convgap.algorithms import ConvSpec, get, layout_of
    from convgap.kernels.triton import conv2d_implicit_gemm, interpreting, pack_weight
    from interpreted import make_input, rel

    torch.manual_seed(0)
    out = {"interpreting": interpreting(), "cases": {}}
    alg = get("implicit_gemm")

    for (name, n, c, o, h, w, k, s, p, d, g, has_bias, layout, flat_k) in json.loads(
            sys.argv[1]):
        k, s, p, d = map(tuple, (k, s, p, d))
        x = make_input(n, c, h, w, layout)
        weight = torch.randn(o, c // g, *k)
        bias = torch.randn(o) if has_bias else None
        ref = F.conv2d(x, weight, bias, s, p, d, g)
        spec = ConvSpec(c, o, k, s, p, d, g, has_bias, (n, c, h, w), "float32", "cpu",
                        layout_of(x))
        if flat_k is None:  # through the registered algorithm
            reason = alg.supports(spec)
            y = alg.run(x, alg.prepare(weight, bias, spec), spec)
        else:  # the wrapper, forcing a K-loop variant
            reason = None
            y = conv2d_implicit_gemm(x, pack_weight(weight, g), bias, spec, flat_k=flat_k)
        out["cases"][name] = {
            "reason": reason, "layout": layout_of(x),
            "shape_ok": tuple(y.shape) == tuple(ref.shape),
            "channels_last": y.is_contiguous(memory_format=torch.channels_last),
            "dtype": str(y.dtype), "err": rel(y, ref)}

    # half precision: fp16 / bf16 inputs, fp32 accumulation (rounding of the output only)
    for dt in ("float16", "bfloat16"):
        dtype = getattr(torch, dt)
        x = torch.randn(1, 16, 6, 6).to(dtype)
        weight = (torch.randn(16, 16, 3, 3) / 12).to(dtype)
        bias = torch.randn(16).to(dtype)
        spec = ConvSpec(16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, (1, 16, 6, 6), dt,
                        "cpu", "nchw")
        y = alg.run(x, alg.prepare(weight, bias, spec), spec)
        ref = F.conv2d(x.double(), weight.double(), bias.double(), 1, 1)
        out["cases"][dt] = {"reason": alg.supports(spec), "dtype": str(y.dtype),
                            "shape_ok": tuple(y.shape) == tuple(ref.shape),
                            "channels_last": y.is_contiguous(
                                memory_format=torch.channels_last),
                            "err": rel(y, ref)}
    # a fixed block configuration instead of the autotuner's (block sizes other than the
    # interpreter's 16x16x16, so the tails of M, N and K are masked differently)
    x = torch.randn(2, 24, 7, 9)
    weight, bias = torch.randn(40, 24, 3, 3), torch.randn(40)
    spec = ConvSpec(24, 40, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, (2, 24, 7, 9),
                    "float32", "cpu", "nchw")
    y = conv2d_implicit_gemm(x, pack_weight(weight, 1), bias, spec, flat_k=False,
                             config={"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16,
                                     "num_warps": 8})
    out["cases"]["fixed_config"] = {"reason": None, "dtype": str(y.dtype),
                                    "shape_ok": tuple(y.shape) == (2, 40, 7, 9),
                                    "channels_last": y.is_contiguous(
                                        memory_format=torch.channels_last),
                                    "err": rel(y, F.conv2d(x, weight, bias, padding=1))}
    # end to end through AlgoConv2d: 'same' with an even kernel and reflect padding are
    # pre-padded by the module, the kernel only sees symmetric zero padding
    from convgap.algorithms import AlgoConv2d
    for name, conv in (
            ("algoconv_same", torch.nn.Conv2d(8, 16, (2, 4), padding="same")),
            ("algoconv_reflect", torch.nn.Conv2d(8, 8, 3, padding=1, groups=2,
                                                 padding_mode="reflect"))):
        x = torch.randn(2, 8, 6, 5)
        with torch.no_grad():
            mod = AlgoConv2d(conv, "implicit_gemm")
            y, ref = mod(x), conv(x)
        out["cases"][name] = {"reason": mod.fallback, "dtype": str(y.dtype),
                              "shape_ok": tuple(y.shape) == tuple(ref.shape),
                              "algorithm": mod.algorithm,
                              "channels_last": y.is_contiguous(
                                  memory_format=torch.channels_last), "err": rel(y, ref)}
    print("JSON:" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(_SCRIPT, json.dumps(CASES), timeout=300)


def test_runs_under_the_interpreter(results):
    assert results["interpreting"] is True
    assert set(results["cases"]) == {c[0] for c in CASES} | {"float16", "bfloat16"} | {
        "algoconv_same", "algoconv_reflect", "fixed_config"}


def test_fixed_block_config(results):
    r = results["cases"]["fixed_config"]
    assert r["shape_ok"] and r["channels_last"] and r["err"] <= TOL


@pytest.mark.parametrize("config", [
    {"BLOCK_M": 32, "BLOCK_N": 32},                       # BLOCK_K missing
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 24},        # not a power of two
    {"BLOCK_M": 8, "BLOCK_N": 32, "BLOCK_K": 16},         # below tl.dot's 16
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 0},
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "BLOCK_Q": 16},
])
def test_bad_block_config_raises(config):
    import torch

    from convgap.kernels.triton import conv2d_implicit_gemm, pack_weight
    w = torch.randn(16, 16, 3, 3)
    with pytest.raises(ValueError, match="config needs BLOCK_M"):
        conv2d_implicit_gemm(torch.randn(1, 16, 8, 8), pack_weight(w, 1), None, _spec(),
                             config=config)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_conv2d_fp32(results, case):
    r = results["cases"][case[0]]
    assert r["reason"] is None
    assert r["shape_ok"] and r["channels_last"] and r["dtype"] == "torch.float32"
    assert r["err"] <= TOL, f"{case[0]}: relative error {r['err']:.3g}"


@pytest.mark.parametrize("name", ["algoconv_same", "algoconv_reflect"])
def test_algoconv2d_runs_the_kernel(results, name):
    r = results["cases"][name]
    assert r["reason"] is None, r["reason"]  # no fallback to torch
    assert r["algorithm"] == "implicit_gemm"
    assert r["channels_last"]  # the kernel's NHWC output, not F.conv2d's NCHW one
    assert r["shape_ok"] and r["err"] <= TOL


def test_input_layouts_covered(results):
    layouts = {results["cases"][c[0]]["layout"] for c in CASES}
    assert layouts == {"nchw", "channels_last", "strided"}


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("bfloat16", 1e-2)])
def test_half_precision_accumulates_in_fp32(results, dtype, tol):
    r = results["cases"][dtype]
    assert r["reason"] is None and r["dtype"] == f"torch.{dtype}"
    assert r["shape_ok"] and r["channels_last"]
    assert r["err"] <= tol


def _spec(device="cpu", dtype="float32") -> ConvSpec:
    return ConvSpec(16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, (1, 16, 8, 8), dtype,
                    device, "nchw")


def test_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    alg = get("implicit_gemm")
    assert alg.supports(_spec("cpu")) == "needs a CUDA device"
    assert alg.supports(_spec("mps")) == "needs a CUDA device"
    assert alg.supports(_spec("cuda")) is None
    assert "float64" in alg.supports(_spec("cuda", "float64"))
    assert alg.differentiable is False and alg.exports == "fallback"
    assert alg.tolerance == 1e-4


def test_cpu_wrapper_refuses_without_interpreter(monkeypatch):
    import torch

    from convgap.kernels.triton import conv2d_implicit_gemm, interpreting, pack_weight

    if interpreting():
        pytest.skip("this session's triton was imported in interpreter mode")
    w = torch.randn(4, 4, 3, 3)
    with pytest.raises(RuntimeError, match="CUDA"):
        conv2d_implicit_gemm(torch.randn(1, 4, 5, 5), pack_weight(w, 1), None, _spec())


_NO_TRITON = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # any "import triton" now raises ImportError
    sys.modules["triton.language"] = None
    import convgap.algorithms as algos
    from convgap.algorithms import ConvSpec, get
    from convgap.kernels.triton import AVAILABLE
    assert AVAILABLE is False
    assert "implicit_gemm" in algos.names()
    spec = ConvSpec(8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, False, (1, 8, 8, 8), "float32",
                    "cuda", "nchw")
    print("REASON:" + get("implicit_gemm").supports(spec))
""")


def test_imports_without_triton():
    out = run_py(_NO_TRITON, interpret=True, timeout=120)
    assert "REASON:triton is not installed" in out


def test_gpu_config_pruning():
    """The autotuner's candidate list (the configs themselves only run on a GPU)."""
    from convgap.kernels.triton import implicit_gemm as ig

    configs = ig.gpu_configs()

    def kept(og, cg, ktot, flat):
        return ig._prune_configs(configs, {"Og": og, "Cg": cg, "Ktot": ktot}, FLAT_K=flat)

    big = kept(256, 256, 2304, False)
    assert len(big) >= 8 and all(c.kwargs["BLOCK_K"] >= 32 for c in big)
    stem = kept(64, 3, 147, True)  # 7x7 stem: flat K, BLOCK_N <= 64
    assert stem and all(c.kwargs["BLOCK_N"] <= 64 for c in stem)
    c48 = kept(48, 48, 432, False)  # per-tap: BLOCK_K must divide 48
    assert c48 and all(48 % c.kwargs["BLOCK_K"] == 0 for c in c48)
    c16 = kept(16, 16, 144, False)
    assert c16 and all(c.kwargs["BLOCK_K"] == 16 and c.kwargs["BLOCK_N"] <= 32 for c in c16)
    assert len(kept(1, 1, 1, True)) >= 1  # never empty
    for c in configs:  # tl.dot needs every block dimension >= 16
        assert min(c.kwargs.values()) >= 16
