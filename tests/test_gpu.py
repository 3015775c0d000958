"""The same promises on a CUDA GPU: every algorithm that supports CUDA, the Triton kernel
compiled for the device (not interpreted), auto-tuning in fp16, analyze, einsum and the
factorized layers. Skipped where no GPU is visible (CI has none); run on a lent GPU with
``pytest tests/test_gpu.py`` (benchmarks/gpu_check.sh does)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from convgap import analyze, einsum  # noqa: E402
from convgap.algorithms import AlgoConv2d, get, names  # noqa: E402
from convgap.algorithms import tuner  # noqa: E402
from convgap.layers import FlattenedConv2d, TensorialConv2d  # noqa: E402
from convgap.transforms import choices, swap  # noqa: E402

CUDA = torch.device("cuda")
# (C, O, kernel, stride, padding, dilation, groups): 1x1, 3x3, strided, dilated, grouped,
# depthwise and a 3-channel stem
GEOMETRIES = [
    (64, 64, 1, 1, 0, 1, 1), (32, 48, 3, 1, 1, 1, 1), (32, 64, 3, 2, 1, 1, 1),
    (16, 16, 3, 1, 2, 2, 1), (32, 32, 3, 1, 1, 1, 4), (32, 32, 3, 1, 1, 1, 32),
    (3, 32, 7, 2, 3, 1, 1),
]


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 checks are against IEEE fp32 (cuDNN's TF32 default is tested separately)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


CORE = ("torch", "cudnn", "implicit_gemm", "channels_last")


@pytest.mark.parametrize("geom", GEOMETRIES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_cuda_algorithm_matches_float64(geom, dtype):
    """fp32: every algorithm that runs on CUDA within its tolerance. fp16: the core ones
    within the fp16 budget; the transform algorithms (Winograd, FFT) may round worse in
    fp16, which the tuner's check rejects: their errors are printed, not asserted."""
    c, o, k, s, p, d, g = geom
    conv = nn.Conv2d(c, o, k, s, p, d, g).to(CUDA)
    x = torch.randn(2, c, 19, 17, device=CUDA)
    seen = {}
    with torch.no_grad():
        ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), s, p, d, g)
        conv = conv.to(dtype)
        xd = x.to(dtype)
        for name in names():
            mod = AlgoConv2d(conv, name)
            if get(name).supports(mod.spec_for(xd)) is not None:
                continue  # not for this spec / device: AlgoConv2d would run F.conv2d
            try:
                y = mod(xd)
            except Exception as exc:  # noqa: BLE001 - reported below
                seen[name] = f"{type(exc).__name__}: {exc}"
                assert name not in CORE and dtype != torch.float32, seen[name]
                continue
            assert y.dtype == dtype and y.shape == ref.shape, name
            err, tol = rel(y, ref), tuner.tolerance(get(name), mod.spec_for(xd))
            seen[name] = err
            if dtype == torch.float32:
                assert err <= tol, (name, err)
            elif name in CORE:
                # fp16 inputs are rounded too (the float64 reference is not): 2x the budget
                assert err <= 2 * tol, (name, err)
    print(geom, dtype, seen)
    assert set(CORE) <= set(seen)


def test_implicit_gemm_compiled_on_every_interpreter_case():
    from test_triton_implicit_gemm import CASES

    from convgap.algorithms import ConvSpec, layout_of
    from convgap.kernels.triton import conv2d_implicit_gemm, interpreting, pack_weight
    assert not interpreting()
    for (name, n, c, o, h, w, k, s, p, d, g, has_bias, layout, flat_k) in CASES:
        if layout == "slice":
            x = torch.randn(n, c + 3, h, 2 * w, device=CUDA)[:, 1:c + 1, :, ::2]
        else:
            x = torch.randn(n, c, h, w, device=CUDA)
            if layout == "cl":
                x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(o, c // g, *k, device=CUDA)
        bias = torch.randn(o, device=CUDA) if has_bias else None
        spec = ConvSpec(c, o, k, s, p, d, g, has_bias, (n, c, h, w), "float32", "cuda",
                        layout_of(x))
        # one fixed config (the autotuner is exercised by the other tests): a compile per
        # kernel variant rather than an autotuning sweep per shape
        y = conv2d_implicit_gemm(x, pack_weight(weight, g), bias, spec, flat_k=flat_k,
                                 config={"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16})
        ref = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(),
                       s, p, d, g)
        assert y.is_contiguous(memory_format=torch.channels_last), name
        assert rel(y, ref) <= 1e-4, (name, rel(y, ref))


def test_implicit_gemm_follows_cudnn_tf32_switch():
    conv = nn.Conv2d(256, 256, 3, padding=1).to(CUDA)
    x = torch.randn(4, 256, 14, 14, device=CUDA)
    with torch.no_grad():
        ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        mod = AlgoConv2d(conv, "implicit_gemm")
        ieee = rel(mod(x), ref)
        torch.backends.cudnn.allow_tf32 = True
        tf32 = rel(mod(x), ref)
    assert ieee <= 1e-5 < tf32 <= tuner.PRECISION_TOLERANCE["tf32"]


def test_auto_in_fp16_agrees_and_chooses_among_cuda_algorithms():
    net = nn.Sequential(  # stem, 3x3, strided 3x3, 1x1, depthwise
        nn.Conv2d(3, 32, 7, 2, 3), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(), nn.Conv2d(64, 128, 1), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1, groups=128)).eval().to(CUDA, torch.float16)
    x = torch.randn(8, 3, 64, 64, device=CUDA, dtype=torch.float16)
    with torch.no_grad():
        ref = net.double()(x.double())
        net = net.half()
        tuned = swap(net, "auto", x, quiet=True)
        y = tuned(x)
    picked = {c.algorithm for c in choices(tuned)}
    assert picked <= set(names()) and picked
    for c in choices(tuned):  # nothing was rejected for fp16 rounding alone
        for alg, why in c.tuning["rejected"].items():
            assert "relative error" not in why, (c.spec, alg, why)
    assert rel(y, ref) <= 2e-2


def test_analyze_on_cuda():
    report = analyze("resnet18", (2, 3, 64, 64), device="cuda", dtype="float16",
                     layout="channels_last", quiet=True)
    run = report.runs[0]
    assert run.device.startswith("cuda") and run.dtype == "float16"
    assert run.total.measured_s > 0 and run.peak_flops > 1e12
    assert len(run.layers) > 10 and all(r.measured_s > 0 for r in run.layers)


def test_einsum_and_factorized_layers_on_cuda():
    x = torch.randn(2, 16, 12, 12, device=CUDA, dtype=torch.float64)
    w = torch.randn(24, 16, 3, 3, device=CUDA, dtype=torch.float64)
    y = einsum("bshw,oshw->bohw|hw", x, w, stride=2, padding=1)
    assert rel(y, F.conv2d(x, w, stride=2, padding=1)) <= 1e-12
    x = torch.randn(2, 32, 14, 14, device=CUDA)
    with torch.no_grad():
        for fam in ("cp", "tucker", "tt", "tr", "rcp"):
            layer = TensorialConv2d(32, 32, 3, fam, rank=4, padding=1, bias=False,
                                    objective="combo").to(CUDA)
            want = F.conv2d(x.double(), layer.dense_weight().double(), padding=1)
            for _ in range(2):  # compiled on the first call, weight-only steps kept after
                assert rel(layer(x), want) <= 1e-5, fam
            with torch.no_grad():
                layer.factors[-1].mul_(-2.0)
            want = F.conv2d(x.double(), layer.dense_weight().double(), padding=1)
            assert rel(layer(x), want) <= 1e-5, fam
        flat = FlattenedConv2d(32, 32, 3, padding=1, bias=False).to(CUDA)
        want = F.conv2d(x.double(), flat.dense_weight().double(), padding=1)
        assert rel(flat(x), want) <= 1e-5


GPU_RANKS = {"cp": 20, "tucker": (12, 10), "tt": (12, 16, 10), "tr": (4, 3, 4, 3)}


@pytest.mark.parametrize("family", ["cp", "tucker", "tt", "tr"])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), ((2, 1), (0, 2), (1, 2)),
                                                     (1, "same", (2, 1))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_factorized_layers_run_the_triton_kernel(force, family, stride, padding,
                                                 dilation, channels_last):
    """In CUDA inference a CP, Tucker, TT or TR layer runs the fused Triton kernel (forced
    here whatever the measurement says), matches its dense kernel in IEEE fp32, keeps the
    input's layout and follows a changed factor."""
    force({"tensorial": "triton"})
    layer = TensorialConv2d(48, 40, 3, family, rank=GPU_RANKS[family], stride=stride,
                            padding=padding, dilation=dilation, bias=True).to(CUDA).eval()
    x = torch.randn(2, 48, 13, 11, device=CUDA)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pads = layer._pads()
    with torch.no_grad():
        for step in range(3):
            if step == 2:
                layer.factors[1].mul_(-0.5)
            want = F.conv2d(x.double(), layer.dense_weight().double(), layer.bias.double(),
                            layer.stride, pads, layer.dilation)
            y = layer(x)
            assert layer.kernel_for(x) == "triton"
            assert y.shape == want.shape and rel(y, want) <= 1e-5, (family, step)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("runs", ["triton", "steps"])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_factorized_layers_in_half_precision(force, dtype, tol, runs):
    force({"tensorial": runs})  # the kernel, or the torch steps, whatever the timing says
    with torch.no_grad():
        for family in ("cp", "tucker", "tt", "tr"):
            layer = TensorialConv2d(64, 64, 3, family, compression=8, padding=1).to(CUDA)
            layer = layer.to(dtype).eval()
            x = torch.randn(4, 64, 14, 14, device=CUDA, dtype=dtype)
            want = F.conv2d(x.double(), layer.dense_weight().double(), layer.bias.double(),
                            padding=1)
            y = layer(x)
            assert y.dtype == dtype and layer.kernel_for(x) == runs
            assert rel(y, want) <= tol, family


@pytest.mark.parametrize("depthwise,r1,r3", [(True, 224, 224), (False, 128, 128),
                                             (False, 112, 112), (False, 7, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_pcp_kernel_at_resnet_ranks(depthwise, r1, r3, dtype):
    """The widest ranks the benchmark uses (the autotuner's tiles at R = 128-256), and a
    tensor ring's 15 groups of 7 channels, against float64."""
    from convgap.kernels.triton import pcp
    z = 15 if r1 == 7 else 1
    x = torch.randn(8, 512, 7, 7, device=CUDA).to(dtype)
    a = (torch.randn(512, z * r1, device=CUDA) / 512 ** 0.5).to(dtype)
    b = (torch.randn(512, z * r3, device=CUDA) / (z * r3) ** 0.5).to(dtype)
    bias = torch.randn(512, device=CUDA).to(dtype)
    k = (torch.randn(r1, 3, 3, device=CUDA) / 3 if depthwise else
         torch.randn(r3, r1, 3, 3, device=CUDA) / (3 * r1 ** 0.5)).to(dtype)
    with torch.no_grad():
        if depthwise:
            y = pcp.pointwise_depthwise_pointwise(x, a, k, b, bias, padding=1)
            u = F.conv2d(F.conv2d(x.double(), a.double().t()[..., None, None]),
                         k.double()[:, None], padding=1, groups=r1)
        else:
            y = pcp.pointwise_conv_pointwise(x, a, k, b, bias, padding=1, groups=z)
            u = F.conv2d(F.conv2d(x.double(), a.double().t()[..., None, None]),
                         k.double().repeat(z, 1, 1, 1), padding=1, groups=z)
    want = F.conv2d(u, b.double()[..., None, None], bias.double())
    assert rel(y, want) <= (1e-5 if dtype == torch.float32 else 4e-3)


def test_factorized_layer_measures_and_trains_on_cuda(monkeypatch):
    """Without forcing: the one-time measurement picks the kernel or the steps, forward
    runs what it picked, and the result is right either way; with autograd the steps run
    and gradients flow."""
    from convgap.layers import tensorial
    real = tensorial.choose_kernel
    chosen = []

    def spy(*args):
        chosen.append(real(*args))
        return chosen[-1]
    monkeypatch.setattr(tensorial, "choose_kernel", spy)
    layer = TensorialConv2d(128, 128, 3, "tucker", compression=10, padding=1).to(CUDA)
    x = torch.randn(8, 128, 28, 28, device=CUDA)
    want = F.conv2d(x.double(), layer.dense_weight().double(), layer.bias.double(), padding=1)
    with torch.no_grad():
        y = layer(x)
        assert chosen and layer.kernel_for(x) == chosen[0] and rel(y, want) <= 1e-5
        assert rel(layer(x), want) <= 1e-5
    layer(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_cuda_graph_timing_counts_device_time_per_call():
    """compare_graphs: per-call device time from graph replays; a matmul twice the size of
    another takes longer, and the captured calls really ran on every replay (a counter
    bumped inside them: 1 warm-up + 4 calls x (1 upload replay + 5 samples))."""
    from convgap import timing
    a, b = torch.randn(2048, 2048, device=CUDA), torch.randn(4096, 2048, device=CUDA)
    count = torch.zeros((), device=CUDA)
    cfg = timing.TimingConfig(warmup=1, min_repeats=5, max_repeats=5, min_time=0.0)
    small, big = timing.compare_graphs(
        [lambda: (count.add_(1), a @ a), lambda: b @ a], cfg, CUDA, calls=4)
    assert len(small.samples) == len(big.samples) == 5
    assert small.extra == {"method": "cuda_graph", "calls": 4}
    assert 0 < small.median < big.median
    assert int(count) == 1 + 4 * (1 + 5)


def test_sparse_tile_kernels_compiled_on_every_interpreter_case():
    """The sparse tile kernels compiled for the device on tests/test_triton_tiles.py's
    cases, against the float64 reference; a dynamic model runs its spatial blocks through
    them and equals its masked execution."""
    from convgap import config, models
    from convgap.dynamic import force_density, make_dynamic, set_execution
    from convgap.kernels.triton import tiles
    from test_triton_tiles import CASES
    from tile_cases import case, keep_grid, reference, relative_error
    for args in CASES:
        x, y, kept, body = case(*args)
        want = reference(x, y, kept, args[8], body)
        on = (lambda t: None if t is None else t.to(CUDA))
        body = body._replace(**{f: on(getattr(body, f)) for f in
                                ("w1", "b1", "w2", "b2", "w3", "b3")})
        keep = keep_grid(kept, y, args[8]).to(CUDA)
        with torch.no_grad():
            got = tiles.residual_tiles(x.to(CUDA), y.to(CUDA), keep, args[8], body)
        assert relative_error(got.cpu(), want) <= 1e-4, args
    net = models.create("mobilenet_v2", num_classes=10).eval()
    dyn = make_dynamic(net, "spatial", granularity=4, check=False, quiet=True).to(CUDA)
    x = torch.randn(2, 3, 96, 96, device=CUDA).contiguous(memory_format=torch.channels_last)
    force_density(dyn, 0.5, 1)
    with torch.no_grad():
        set_execution(dyn, "masked")
        want = dyn(x)
        set_execution(dyn, "sparse")
        for kernel in config.SPARSE_CUDA_CHOICES:   # each sparse execution on CUDA
            with config.override(SPARSE_CUDA=kernel):
                assert rel(dyn(x), want) <= 1e-4, kernel


def test_sparse_dynamic_model_replays_in_a_cuda_graph():
    """The Triton sparse path reads nothing back to the host: a dynamic model whose maskers
    decide per input is captured once and replayed on new inputs, each replay equal to the
    masked execution of that input, with masks that differ between inputs."""
    from convgap import config, models
    from convgap.dynamic import dynamic_blocks, make_dynamic, set_execution
    net = models.create("mobilenet_v2", num_classes=10).eval()
    dyn = make_dynamic(net, "spatial", granularity=4, check=False, quiet=True)
    blocks = list(dynamic_blocks(dyn).values())
    torch.manual_seed(0)
    for b in blocks:    # maskers that keep about half of the tiles, depending on the input
        nn.init.normal_(b.masker.conv.weight, std=1.0)
        nn.init.zeros_(b.masker.conv.bias)
    dyn = dyn.to(CUDA, memory_format=torch.channels_last).eval()
    static_x = torch.randn(2, 3, 96, 96, device=CUDA).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad(), config.override(SPARSE_CUDA="triton"):
        set_execution(dyn, "sparse")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):      # compile and choose outside the capture
            for _ in range(2):
                dyn(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = dyn(static_x)
        masks = [b.last_mask for b in blocks]     # the graph's mask tensors
        kept = []
        for _ in range(3):
            x = torch.randn_like(static_x)
            static_x.copy_(x)
            graph.replay()
            got = static_y.clone()
            kept.append(torch.cat([m.flatten() for m in masks]).clone())
            set_execution(dyn, "masked")
            want = dyn(x)
            set_execution(dyn, "sparse")
            assert rel(got, want) <= 1e-4
    share = float(kept[0].mean())
    assert 0.1 < share < 0.9, share
    assert not torch.equal(kept[0], kept[1])


def test_fused_convfirst_measures_its_grouped_conv_on_cuda():
    """A fused ConvFirst block on a GPU times cuDNN's grouped conv against the Triton one
    (the one measured choice, recorded in kernel_choice) and agrees with its torch
    reference whichever it keeps."""
    from convgap.layers import FusedConvFirst
    torch.manual_seed(0)
    convs = [nn.Conv2d(64, 64, 3, 1, 1, groups=8), nn.Conv2d(64, 256, 1),
             nn.Conv2d(256, 64, 1)]
    m = FusedConvFirst(convs, [None, "silu", None], "identity").to(CUDA).eval()
    x = torch.randn(8, 64, 28, 28, device=CUDA).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y, ref = m(x), m.reference(x)
    assert m.kernel_choice in ("cudnn_grouped", "triton_grouped")
    assert rel(y, ref) <= 1e-4, m.kernel_choice


def test_block_kernels_compiled_on_every_interpreter_case():
    """The fused block kernels compiled for the device (autotuned) on
    tests/test_triton_blocks.py's cases, every dtype, layout and weight storage, against
    the float64 reference within the same tolerances as interpreted."""
    import json
    from interpreted import printed_json, run_py
    from test_triton_blocks import _SCRIPT, CF_CASES, IR_CASES, MLP_CASES, _assert_agrees
    out = printed_json(run_py(_SCRIPT, json.dumps(IR_CASES), json.dumps(CF_CASES),
                              json.dumps(MLP_CASES), "cuda", interpret=False, timeout=240))
    assert out["interpreting"] is False
    assert len(out["ir"]) == len(IR_CASES) and len(out["cf"]) == len(CF_CASES)
    for r, case in zip(out["ir"], IR_CASES):
        _assert_agrees(r, case, case[13])
    for r, case in zip(out["cf"], CF_CASES):
        _assert_agrees(r, case, case[7])
    for r, case in zip(out["mlp"], MLP_CASES):
        _assert_agrees(r, case, case[9])
    assert "residual add" in out["refused"]


def test_grouped_conv_compiled_on_every_interpreter_case():
    """convgap's Triton grouped conv compiled for the device (autotuned) on
    tests/test_triton_grouped.py's cases, within the same tolerances as interpreted."""
    import json
    from interpreted import printed_json, run_py
    from test_triton_grouped import CASES, SCRIPT, assert_agrees
    out = printed_json(run_py(SCRIPT, json.dumps(CASES), "cuda", interpret=False,
                              timeout=240))
    assert out["interpreting"] is False
    assert_agrees(out)
