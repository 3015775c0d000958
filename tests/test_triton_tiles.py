"""The sparse tile kernels on a GPU (convgap.kernels.triton.tiles), checked on CPU with
triton's interpreter against the float64 torch reference of tests/tile_cases.py (the dense
body times the tile mask, plus the shortcut): bottleneck, inverted residual, basic block
(a strided 3x3 first conv, no last conv) and no-first-conv bodies, dense and depthwise
middles of 3x3 and 5x5 at strides 1 and 2, granularities 1 to 4 with partial tiles, both
memory formats, every activation, keep grids of every dtype, an empty grid, the kept
tiles' order against ``nonzero``; and a dynamic block's sparse execution
through them against its masked execution. Every interpreted check runs in ONE subprocess
(tests/interpreted.py); the operand checks run here."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from convgap.errors import ConvgapError  # noqa: E402
from convgap.kernels.triton import tiles  # noqa: E402
from interpreted import compile_for_hopper, ptxas_spills, run_interpreted  # noqa: E402

TOL = 1e-4

# case() arguments: (n, c, r, o, h, w, k, stride, s, depthwise, first, act1, act2, x_last,
# out_last, density, seed, k1, stride1, last)
CASES = [
    (2, 20, 24, 18, 9, 10, 3, 1, 2, False, True, "relu", "relu", False, False, 0.5, 0, 1, 1,
     True),                                                   # bottleneck, NCHW
    (1, 16, 40, 16, 11, 9, 3, 1, 3, True, True, "relu6", "relu6", True, True, 0.6, 1, 1, 1,
     True),                                                   # inverted residual
    (2, 12, 32, 20, 10, 10, 3, 2, 2, True, True, "silu", "sigmoid", True, False, 0.5, 2, 1,
     1, True),                                                # strided depthwise
    (1, 8, 24, 24, 9, 9, 3, 1, 2, False, True, "relu", None, True, True, 0.7, 3, 3, 2,
     False),                                                  # basic block, strided first
    (2, 8, 24, 24, 7, 8, 3, 1, 1, False, True, None, "relu", False, True, 0.4, 4, 3, 1,
     False),                                                  # basic block, S = 1
    (1, 24, 24, 16, 8, 8, 5, 1, 4, True, False, None, "relu6", True, False, 0.5, 5, 1, 1,
     True),                                                   # no first conv, 5x5
    (1, 12, 20, 12, 9, 7, 5, 2, 2, False, True, "silu", "silu", False, False, 1.0, 6, 1, 1,
     True),                                                   # dense 5x5 at stride 2
]

_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from convgap.kernels.triton import tiles, interpreting
    from tile_cases import case, keep_grid, reference, relative_error

    torch.manual_seed(0)
    out = {"interpreting": interpreting(), "cases": []}
    for args in json.loads(sys.argv[1]):
        x, y, kept, body = case(*args)
        s = args[8]
        want = reference(x, y, kept, s, body)
        keep = keep_grid(kept, y, s).to([torch.float32, torch.bool, torch.uint8][
            len(out["cases"]) % 3])
        with torch.no_grad():
            got = tiles.residual_tiles(x, y.clone(), keep, s, body)
        out["cases"].append({"err": relative_error(got, want), "kept": len(kept)})
    x, y, kept, body = case(*json.loads(sys.argv[1])[0])
    with torch.no_grad():     # nothing kept: the output is the shortcut, untouched
        got = tiles.residual_tiles(x, y.clone(), keep_grid(kept[:0], y, 2), 2, body)
    out["empty"] = bool(torch.equal(got, y))
    # a dynamic block's sparse execution through the kernels, against its masked one
    from convgap.dynamic import dynamic_blocks, force_density, make_dynamic
    from convgap import models
    net = models.create("mobilenet_v2", num_classes=10).eval()
    dyn = make_dynamic(net, "spatial", granularity=2, check=False, quiet=True)
    block = next(iter(dynamic_blocks(dyn).values()))   # an inverted residual
    x = torch.randn(1, block.masker.conv.in_channels, 9, 9)
    force_density(dyn, 0.5, 0)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):     # the aten ops the sparse execution dispatches
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))
    with torch.no_grad():
        m = block.mask(x)
        with Ops() as ops:
            got = block._sparse_triton(x, m)
        out["block"] = {"err": relative_error(got, block.masked(x, m).double()),
                        "kept": float(m.mean()), "ops": sorted(ops.names)}
    print("JSON:" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(_SCRIPT, json.dumps(CASES))


def test_runs_under_the_interpreter(results):
    assert results["interpreting"] is True
    assert len(results["cases"]) == len(CASES)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_matches_the_masked_dense_body(results, i):
    r = results["cases"][i]
    assert r["kept"] > 0, CASES[i]
    assert r["err"] <= TOL, (CASES[i], r["err"])


def test_nothing_kept_leaves_the_output(results):
    assert results["empty"] is True


@pytest.mark.parametrize("seed", range(4))
def test_kept_order_is_nonzero_then_minus_one(seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(3, 5, 7, generator=g) < [0.0, 0.3, 0.8, 1.0][seed]
    order = tiles.kept_order(keep.float())
    want = keep.reshape(-1).nonzero().view(-1)
    assert order.dtype == torch.int32 and order.shape == (keep.numel(),)
    assert torch.equal(order[:len(want)].long(), want)
    assert bool((order[len(want):] == -1).all())


def test_a_dynamic_block_runs_sparse_through_them(results):
    r = results["block"]
    assert 0.0 < r["kept"] < 1.0
    assert r["err"] <= TOL, r


# ops whose result size or value must be read back to the host on a GPU (a synchronization,
# and a CUDA graph cannot capture it)
SYNCING = {"aten.nonzero", "aten._local_scalar_dense", "aten.unique_dim", "aten._unique2",
           "aten.masked_select", "aten.is_nonzero", "aten.item"}


def test_the_sparse_execution_reads_nothing_back(results):
    ops = set(results["block"]["ops"])
    assert "aten.cumsum" in ops, ops        # the ops were recorded: kept_order's
    assert not ops & SYNCING, ops & SYNCING


def test_bad_operands_raise():
    from tile_cases import case, keep_grid
    x, out, kept, body = case(1, 8, 16, 8, 9, 9, 3, 1, 2, False, True, "relu", "relu",
                              False, False, 1.0)
    kept = keep_grid(kept, out, 2)
    if not tiles.runnable(x):
        with pytest.raises(RuntimeError, match="triton"):
            tiles.residual_tiles(x, out, kept, 2, body)
    with pytest.raises(ConvgapError, match="float32"):
        tiles.residual_tiles(x.double(), out, kept, 2, body)
    with pytest.raises(ConvgapError, match="out must have shape"):
        tiles.residual_tiles(x, out[:, :, :3], kept, 2, body)
    with pytest.raises(ConvgapError, match="grid"):
        tiles.residual_tiles(x, out, kept[:, :, :-1], 2, body)
    with pytest.raises(ConvgapError, match="grid"):
        tiles.residual_tiles(x, out, kept, 3, body)
    with pytest.raises(ConvgapError, match="unknown activation"):
        tiles.residual_tiles(x, out, kept, 2, body._replace(act2="gelu"))


def test_first_kernel_compiles_for_hopper_without_spills():
    """The first launch compiled for sm_90 in its GPU configuration, its early exit past
    the kept tiles included (the interpreter runs code a GPU compiler may reject)."""
    cfg = dict(tiles.FIRST_CONFIG)
    warps = cfg.pop("num_warps")
    kernel = compile_for_hopper(
        tiles._first_kernel, dict(ST1=1, K1=1, ACT="relu", PRECISION="tf32", **cfg),
        "fp32", {}, warps, 2, pointers={"order_ptr": "i32"})
    assert ptxas_spills(kernel) == 0


# the tile kernel's heaviest forms: a dense middle with the last conv, a depthwise one
# without (the most spills at the configurations left out)
@pytest.mark.parametrize("config", tiles.TILE_CONFIGS, ids=str)
@pytest.mark.parametrize("depthwise,last", [(False, True), (True, False)])
def test_tile_kernel_configs_compile_for_hopper_without_spills(config, depthwise, last):
    """Every configuration the autotuner may pick compiles for sm_90 without spilling
    registers, on tensor cores under TF32 where the middle conv is dense."""
    p, r, c, o, warps = config
    kernel = compile_for_hopper(
        tiles._tile_kernel, dict(KS=3, DEPTHWISE=depthwise, LAST=last, HAS_B3=last,
                                 ACT="relu6", ADD=True, PRECISION="tf32", BLOCK_P=p,
                                 BLOCK_R=r, BLOCK_C=c, BLOCK_O=o),
        "fp32", {}, warps, 2, pointers={"order_ptr": "i32"})
    assert ptxas_spills(kernel) == 0
    assert "mma" in kernel.asm["ptx"] or depthwise


def test_autotuner_keeps_one_output_block_with_the_last_conv():
    """With the last conv fused, only configurations whose output block covers every
    output (else each block recomputes the middle conv); without, none much wider than
    the outputs; the smallest where nothing fits."""
    import triton
    configs = [triton.Config({"BLOCK_P": p, "BLOCK_R": r, "BLOCK_C": c, "BLOCK_O": o},
                             num_warps=w) for p, r, c, o, w in tiles.TILE_CONFIGS]

    def kept(**args):
        return {(c.kwargs["BLOCK_P"], c.kwargs["BLOCK_O"])
                for c in tiles.prune_tile_configs(configs, args)}
    assert all(o >= 48 for _, o in kept(R=24, O=48, LAST=True))
    assert kept(R=24, O=48, LAST=True) and kept(R=64, O=64, LAST=True)
    assert all(o <= 32 for _, o in kept(R=64, O=24, LAST=False))
    assert len(kept(R=64, O=256, LAST=True)) == 1      # none covers 256: the smallest
    assert tiles.LAST_FUSED_MAX == max(o for *_, o, _ in tiles.TILE_CONFIGS)
