"""convgap.predict: operators recorded without running the model (against the real forward
pass and an independent MAC counter), replayed on real tensors, profiled inside a real run,
their reuse distances, a tiny calibration fitted and cached, predictions per layer and
model, the CLI, and the errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convgap
from convgap import cli, predict
from convgap.count import count
from convgap.errors import ConvgapError
from convgap.predict import calibration, features, synthetic, units
from convgap.predict.profile import align, by_module, profile, with_densities
from convgap.predict.record import record, replay


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn(self.conv(x)))   # functional ops: the block's own


def small():
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), Block(8), Block(8),
                         nn.Conv2d(8, 16, 1, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 5)).eval()


class MakesCpuTensors(nn.Module):
    """A forward that makes a CPU tensor: meta recording fails, fake tensors do not."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + torch.ones(1, 4, 1, 1)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_record_sees_what_the_forward_pass_runs(layout):
    """Every conv's input and output shapes and strides as in a real run (hooks on the real
    forward pass), the functional add and relu attributed to their block, the linear."""
    model = small().to(memory_format=torch.channels_last if layout != "nchw" else
                       torch.contiguous_format)
    ops = record(model, (2, 3, 17, 17), layout=layout)
    seen = {}

    def hook(m, args, out):
        seen[m] = (args[0].shape, args[0].stride(), out.shape, out.stride())

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_hook(hook) for m in convs]
    x = torch.randn(2, 3, 17, 17).contiguous(memory_format=convgap.ops.layouts.memory_format(
        layout))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    names = {m: n for n, m in model.named_modules()}
    conv_ops = [o for o in ops if features.kind(o) == "conv"]
    assert [o.module for o in conv_ops] == [names[m] for m in convs]
    for op, m in zip(conv_ops, convs):
        xin, out = op.inputs[0], op.outputs[0]
        shape, stride, oshape, ostride = seen[m]
        assert xin.shape == tuple(shape) and out.shape == tuple(oshape)
        if math.prod(oshape[2:]) > 1:
            assert xin.stride == tuple(stride) and out.stride == tuple(ostride)
    in_block = {o.name for o in ops if o.module == "2"}
    assert {"aten.add.Tensor", "aten.relu.default"} <= in_block
    assert any(features.kind(o) == "matmul" and o.module == "7" for o in ops)


class _Acts(nn.Module):
    """Every activation, in place and not, a same-shape add in place, a broadcast
    multiply, a LayerNorm over a non-contiguous last dimension, a 3-d linear and a 2-d one
    without bias."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 5)
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        h = self.bn(self.conv(x))
        a = F.relu(h, inplace=True) + F.hardtanh(h, 0.0, 6.0)
        a = a + F.gelu(h) + F.silu(h) + torch.sigmoid(h) + F.hardswish(h) + F.hardsigmoid(h)
        F.hardtanh_(a, -1.0, 1.0)
        F.silu(a, inplace=True)
        F.hardswish(a, inplace=True)
        F.hardsigmoid(a, inplace=True)
        a.add_(h)
        a = a * a.mean((2, 3), keepdim=True)
        return self.head(self.fc(self.ln(a.permute(0, 2, 3, 1))).mean((1, 2)))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_outputs_made_without_meta_kernels_are_the_kernels(layout, monkeypatch):
    """The operators record makes outputs for without their (slow) meta kernels record
    exactly what the kernels give: names, arguments, outputs, tensor identities."""
    import sys
    from convgap.models import create
    rec = sys.modules["convgap.predict.record"]
    models = [(_Acts().eval(), (2, 3, 12, 10))] + [
        (create(n).eval(), (1, 3, 64, 64)) for n in ("mobilenet_v2", "convnext_tiny")]

    def fields(ops):
        return [(op.name, op.module, op.leaves, op.outputs, op.reads, op.writes)
                for op in ops]

    fast = [fields(record(m, s, layout=layout)) for m, s in models]
    monkeypatch.setattr(rec, "_outputs", lambda func, args: None)
    slow = [fields(record(m, s, layout=layout)) for m, s in models]
    assert fast == slow
    names = {f[0] for ops in fast for f in ops}
    assert {"aten.relu_.default", "aten.native_layer_norm.default", "aten.addmm.default",
            "aten.mm.default", "aten.add_.Tensor", "aten.hardsigmoid_.default"} <= names


def test_fake_tensors_when_meta_fails():
    ops = record(MakesCpuTensors(), (1, 3, 8, 8))
    assert [features.kind(o) for o in ops].count("conv") == 1
    assert any(o.name == "aten.add.Tensor" for o in ops)


def test_conv_and_gemm_flops_equal_the_counter():
    """2 x the MACs counted by convgap.count (closed formulas on a real run) equal the
    recorded convs' and GEMMs' FLOPs."""
    model = small()
    ops = record(model, (2, 3, 17, 17))
    flops = sum(features.work(o)[0] for o in ops)
    assert flops == 2 * count(model, (2, 3, 17, 17)).macs


def test_replay_runs_the_op_on_real_tensors():
    model = small()
    ops = record(model, (1, 3, 16, 16))
    for op in ops:
        out = replay(op, torch.Generator().manual_seed(0))()
        outs = [t for t in (out if isinstance(out, (tuple, list)) else [out])
                if isinstance(t, torch.Tensor)]
        # the first output (batch norm's saved statistics are empty in eval, not on meta)
        assert tuple(outs[0].shape) == op.outputs[0].shape


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_profile_times_the_recorded_ops_in_a_real_run(layout):
    """The profiled run dispatches exactly the recorded operators, in order; each op's time
    is positive and the ops' sum fits inside the profiled runs' wall time; per module sums
    add up to the whole."""
    fmt = torch.channels_last if layout != "nchw" else torch.contiguous_format
    model = small().to(memory_format=fmt)
    x = torch.randn(2, 3, 17, 17).contiguous(memory_format=fmt)
    ops = record(model, x.shape, layout=layout)
    t = profile(model, x, repeats=3, warmup=1)
    assert t.names == [op.name for op in ops] and len(t.wholes) == 3
    assert all(s > 0 for s in t) and sum(t) < max(t.wholes)
    rows = by_module(ops, t, ["", "0", "2", "3"])
    assert math.isclose(sum(rows.values()), sum(t)) and rows["2"] > 0


class Alternates(nn.Module):
    """Runs a different operator on every other call."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x.relu() if self.calls % 2 else x.sigmoid()


def test_profile_errors():
    with pytest.raises(ConvgapError, match="different operators"):
        profile(Alternates(), torch.randn(4), repeats=2, warmup=0)
    with pytest.raises(ConvgapError, match="repeats"):
        profile(small(), torch.randn(1, 3, 8, 8), repeats=0)


def test_context_reuse_distances():
    """Reuse distances by hand: conv(x, w, b) reads three tensors no op wrote (one pass
    ago), relu reads what conv just wrote (0 bytes since), the add reads x again after relu
    moved its bytes."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + torch.relu(self.conv(x))

    ops = record(Net().eval(), (1, 4, 8, 8))
    assert [features._short(o) for o in ops] == ["convolution", "relu", "add"]
    conv, relu, add = ops
    moved = [features.work(o)[1] for o in ops]
    cold = 4 * (1 * 4 * 8 * 8 + 4 * 4 * 3 * 3 + 4)
    where = features.context(ops)
    lg = math.log
    assert where[0] == pytest.approx((lg(sum(moved)), lg(sum(moved)), lg(cold)))
    assert where[1] == pytest.approx((0.0, 0.0, 0.0))
    # add: x last touched by conv (relu's bytes since), relu's output just written
    nx = 4 * 4 * 8 * 8
    assert where[2] == pytest.approx(((nx * lg(moved[1]) + nx * 0.0) / (2 * nx),
                                      lg(moved[1]), 0.0))


@pytest.mark.parametrize("family", range(len(synthetic.FAMILIES)))
def test_synthetic_networks_run(family):
    net, side = synthetic.network(family, 32)
    assert side == 32 and synthetic.network(family)[1] >= 32
    with torch.no_grad():
        out = net(torch.randn(1, 3, 32, 32))
    assert out.shape[0] == 1 and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def tiny_calibration(tmp_path_factory):
    """A calibration on two small random networks at batch 1, each also fused, dynamic,
    factorized and swapped (seconds, not minutes), and the cache directory it is in."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONVGAP_CACHE", str(cache))
        mp.setitem(calibration.NETWORKS, True, 2)
        mp.setattr(calibration, "BATCHES", (1,))
        real = synthetic.network
        mp.setattr(calibration, "network", lambda seed: real(seed, 32))
        cal = predict.calibrate(quick=True, refresh=True, quiet=True)
    return cal, cache


def test_quick_calibration_stops_starting_networks_after_its_time(tiny_calibration,
                                                                   tmp_path):
    """quick: once QUICK_MIN networks have run, none starts after QUICK_S seconds."""
    full, _ = tiny_calibration
    assert full.stats["networks_run"] == 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONVGAP_CACHE", str(tmp_path))
        mp.setitem(calibration.NETWORKS, True, 2)
        mp.setattr(calibration, "BATCHES", (1,))
        mp.setattr(calibration, "QUICK_S", 0.0)
        mp.setattr(calibration, "QUICK_MIN", 1)
        real = synthetic.network
        mp.setattr(calibration, "network", lambda seed: real(seed, 32))
        cal = predict.calibrate(quick=True, refresh=True, quiet=True)
    assert cal.stats["networks_run"] == 1
    assert 0 < len(cal.stats["networks"]) < len(full.stats["networks"])
    assert len(cal.stats["plans"]) < len(full.stats["plans"])


@pytest.fixture
def tiny(tiny_calibration, monkeypatch):
    """The tiny calibration, its cache this test's."""
    cal, cache = tiny_calibration
    monkeypatch.setenv("CONVGAP_CACHE", str(cache))
    return cal


def test_calibration_fits_caches_and_predicts(tiny):
    cal = tiny
    assert cal.overhead_s > 0 and set(cal.weights) == set(calibration.TERMS)
    assert all(w >= 0 for w in cal.weights.values())
    assert cal.stats["conv"]["samples"] >= 8 and cal.models["conv"] is not None
    again = predict.load()
    assert again is not None and again.key == cal.key
    model = small()
    p = convgap.predict_latency(model, (1, 3, 32, 32), calibration=cal)
    assert p.total_s > 0
    assert p.op_seconds == pytest.approx(list(cal.op_seconds(p.ops)), rel=1e-12)
    w = cal.weights   # the whole model: the ops' sum, their count and the module count
    assert math.isclose(p.total_s, w["ops"] * p.ops_s + w["op"] * len(p.ops)
                        + w["module"] * len(list(model.modules())), rel_tol=1e-9)
    # rows: the blocks' ops include their functional ones; leaves only their own
    assert math.isclose(sum(r.seconds for r in p.blocks), p.ops_s)
    assert p.layer("2").ops > p.layer("2.conv").ops + p.layer("2.bn").ops
    assert {r.name for r in p.layers} >= {"0", "1", "2.conv", "2.bn", "7"}
    # the cached calibration is used without arguments
    q = convgap.predict_latency(model, (1, 3, 32, 32))
    assert math.isclose(q.total_s, p.total_s)


def test_cli_calibrate_and_predict(tiny, tmp_path, capsys):
    assert cli.main(["calibrate", "--quiet"]) == 0       # the cached one
    assert "per module" in capsys.readouterr().out
    out = tmp_path / "p.json"
    assert cli.main(["predict", "resnet18", "--image-size", "32", "--batch", "1",
                     "--top", "99", "--json", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "(whole model)" in text and "layer1.0.conv1" in text
    assert out.exists()
    assert cli.main(["predict", "resnet18", "--image-size", "32", "--density", "0.5",
                     "--quiet"]) == 2     # not a dynamic model


def test_errors(tiny):
    cal = tiny
    with pytest.raises(ConvgapError, match="unknown layout"):
        convgap.predict_latency(small(), (1, 3, 16, 16), layout="nhwc", calibration=cal)
    with pytest.raises(ConvgapError, match="density"):
        convgap.predict_latency(small(), (1, 3, 16, 16), density=0.5, calibration=cal)
    dyn = convgap.make_dynamic(convgap.models.create("resnet18", num_classes=4), "spatial",
                               granularity=2, check=False, quiet=True)
    with pytest.raises(ConvgapError, match="give density"):
        convgap.predict_latency(dyn, (1, 3, 32, 32), calibration=cal)
    with pytest.raises(ConvgapError, match=r"in \[0, 1\]"):
        convgap.predict_latency(dyn, (1, 3, 32, 32), density=1.5, calibration=cal)
    with pytest.raises(ConvgapError, match="no such dynamic block"):
        convgap.predict_latency(dyn, (1, 3, 32, 32), density={"fc": 0.5}, calibration=cal)
    with pytest.raises(ConvgapError, match="have none"):
        convgap.predict_latency(dyn, (1, 3, 32, 32), density={"layer1.0": 0.5},
                                calibration=cal)
    with pytest.raises(ConvgapError, match="cannot record"):
        record(small(), (1, 5, 16, 16))    # 5 channels into a 3-channel conv


def _resnet(**kw):
    torch.manual_seed(0)
    return convgap.models.create("resnet18", num_classes=4, **kw).eval()


def test_fused_blocks_are_one_op_each():
    """Each fused block is one unit op: it reads the op before it's output first, then
    its weights; its FLOPs are the original block's (an independent count); a real run
    times the same ops (the fast path running: one call per block)."""
    import warnings
    model = _resnet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the blocks only (the classifier head, pattern pool_linear, is a unit too)
        from convgap.transforms.patterns import PATTERNS
        fused = convgap.fuse(model, quiet=True, patterns=list(PATTERNS))
    x = torch.randn(1, 3, 32, 32)
    ops = record(fused, x.shape)
    blocks = {n: m for n, m in fused.named_modules() if units.is_unit(m)}
    unit_ops = [op for op in ops if op.unit]
    # the 8 blocks and the stem's conv + ReLU (fused outside any block)
    assert [op.module for op in unit_ops] == list(blocks) and len(blocks) == 9
    assert units.unit_type(blocks["conv1"]) == "FusedConvAct"
    for op in unit_ops:
        i = ops.index(op)
        if i == 0:          # the stem reads the model's input
            assert op.inputs[0].shape == x.shape
            continue
        assert op.reads[0] in ops[i - 1].writes
        assert op.inputs[0].shape == ops[i - 1].outputs[0].shape
        orig = model.get_submodule(op.module)
        assert op.detail[0] == 2 * count(orig, op.inputs[0].shape).macs
        assert op.detail[3:] == (1.0, 0.0, 1.0)
    t = profile(fused, x, repeats=2, warmup=1)
    assert [n for n in t.names if n.startswith("unit.")] == [op.name for op in unit_ops]
    assert None not in align(ops, t)    # (a real run adds an as_strided_ after the pool)


def test_sparse_fixed_cost_is_recovered():
    """fit_sparse finds the fixed cost c of measured = c + k x work (relative errors,
    c and k >= 0), and never less than one call."""
    from convgap.predict.calibration import fit_sparse
    rng = np.random.default_rng(0)
    work = rng.uniform(1e-5, 2e-3, 200)
    measured = (40e-6 + 1.3 * work) * rng.uniform(0.97, 1.03, 200)
    assert fit_sparse(work, measured, 2e-6) == pytest.approx(40e-6, rel=0.1)
    assert fit_sparse(work, 1.3 * work, 2e-6) == 2e-6     # no fixed cost: one call's


def test_dynamic_blocks_at_a_density():
    """A sparse dynamic block is one unit op at the density given (one for all, per block,
    or forced), with the share of its dense MACs it computes there (above the density: the
    kept tiles' halo); the profiled run reports the density its masks kept and the share
    they computed, the recorded one where the masks are the same."""
    dyn = convgap.make_dynamic(_resnet(), "spatial", granularity=1, check=False, quiet=True)
    names = [n for n, m in dyn.named_modules() if units.is_unit(m)]
    shape = (1, 3, 64, 64)      # every block's output 2 x 2 or more: even cell counts
    ops = record(dyn, shape, density=0.25)
    assert [op.detail[3:5] for op in ops if op.unit] == [(0.25, 1.0)] * len(names)
    # 3x3 convs read their neighbours: at 1 x 1 tiles the first one computes more
    assert all(0.25 < op.detail[5] < 1.0 for op in ops if op.unit)
    assert all(op.detail[5] == 1.0 for op in record(dyn, shape, density=1.0) if op.unit)
    per = {n: 0.1 * (i + 1) for i, n in enumerate(names)}
    ops = record(dyn, shape, density=per)
    assert [op.detail[3] for op in ops if op.unit] == pytest.approx(list(per.values()))
    convgap.dynamic.force_density(dyn, 0.5)
    ops = record(dyn, shape)
    assert all(op.detail[3] == 0.5 for op in ops if op.unit)
    t = profile(dyn, torch.randn(shape), repeats=1, warmup=1)
    kept = with_densities(record(dyn, shape, density=1.0), t)
    # forced: exactly round(0.5 x cells) per sample, the masks the record assumed
    assert [op.detail[3] for op in kept if op.unit] == [0.5] * len(names)
    assert [op.detail[5] for op in kept if op.unit] == pytest.approx(
        [op.detail[5] for op in ops if op.unit])
    assert None not in align(kept, t)


def test_dynamic_units_are_typed_by_the_path_they_run():
    """A spatial dynamic block's unit type names the kernel its body runs: the tile kernel
    with a dense middle conv ('DynamicBlock') or a depthwise one ('DynamicBlock-depthwise'),
    or torch ('DynamicBlock-torch': a grouped conv, or no tile kernel on this CPU): they
    run at different speeds for the same work."""
    from convgap.kernels.cpu import tiles
    cba = synthetic._cba
    bottleneck = nn.Sequential(cba(16, 8, 1), cba(8, 8, 3), cba(8, 16, 1, act=None))
    inverted = nn.Sequential(cba(16, 32, 1), cba(32, 32, 3, groups=32), cba(32, 16, 1, act=None))
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1),
                        synthetic._ConvFirst(16, 3, 2, 4, "relu"),     # grouped 3x3 first
                        synthetic._Residual(bottleneck, None, "relu"),
                        synthetic._Residual(inverted, None, None)).eval()
    dyn = convgap.make_dynamic(net, "spatial", granularity=2, check=False, quiet=True)
    kinds = [units.unit_type(m) for m in dyn.modules() if units.is_unit(m)]
    torch_path = "DynamicBlock-torch"
    assert kinds == [torch_path] + (["DynamicBlock", "DynamicBlock-depthwise"]
                                    if tiles.available() else [torch_path] * 2)
    assert set(kinds) <= set(units.UNIT_TYPES)


class _Seen(torch.utils._python_dispatch.TorchDispatchMode):
    """The (batch, M, N, K) of every GEMM a real run dispatches."""

    def __init__(self):
        super().__init__()
        self.gemms = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) in features._MATMUL:
            self.gemms.append((func, args, out))
        return out


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("batch,density", [(1, 0.5), (2, 0.25), (2, 1.0)])
def test_torch_path_units_carry_the_operators_they_run(layout, batch, density):
    """A spatial dynamic block on the torch path is recorded with its body: the operators
    that path dispatches at the unit's masks. Its GEMMs are those a real run of the path
    dispatches at the same masks (rows = the positions kept, their halo included); units
    of the C kernels have no body."""
    from convgap.predict.record import TensorSpec
    cba = synthetic._cba
    inverted = nn.Sequential(cba(16, 32, 1), cba(32, 32, 3, groups=32), cba(32, 16, 1, act=None))
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1),
                        synthetic._ConvFirst(16, 3, 2, 4, "relu"),     # torch path
                        synthetic._Residual(inverted, None, None)).eval()
    dyn = convgap.make_dynamic(net, "spatial", granularity=2, check=False, quiet=True)
    shape = (batch, 3, 13, 11)
    ops = record(dyn, shape, layout=layout, density=density)
    blocks = [m for m in dyn.modules() if units.is_unit(m)]
    for op, block in zip([op for op in ops if op.unit], blocks):
        if units.unit_type(block) not in units.TORCH_UNITS:
            assert op.body == ()
            continue
        assert op.body
        x = torch.randn(batch, 16, 13, 11)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        mask = block.seeded_mask(density, batch, (13, 11), units.seed(block))
        with torch.no_grad(), _Seen() as seen:
            y = block.sparse(x, mask)
        assert torch.allclose(y, block.masked(x, mask), atol=1e-5)
        real = [(func, [TensorSpec.of(a) if isinstance(a, torch.Tensor) else a for a in args],
                 out) for func, args, out in seen.gemms]
        recorded = [features._matmul_mnk(r) for r in op.body
                    if features.kind(r) == "matmul"]
        expected = []
        for func, specs, out in real:
            from convgap.predict.record import Op
            leaves = tuple(specs)
            fake = Op(str(func), "", leaves, None, (TensorSpec.of(out),))
            expected.append(features._matmul_mnk(fake))
        assert recorded == expected and len(recorded) == 3   # grouped kxk, 1x1, 1x1
        kept = int(block.pixel_mask(mask, (13, 11)).sum())
        assert recorded[-1][1] == kept                       # the last GEMM: kept rows
        assert recorded[0][1] >= kept
    assert any(op.body for op in ops if op.unit)


def test_torch_path_units_are_their_bodies_predicted(tiny):
    """A torch-path unit's prediction is its type's fixed cost plus its body's operators
    as the other kinds predict them in the body's own pass (no factor of its own), so it
    grows with the rows its masks keep; other units keep their factor."""
    cal = tiny
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1),
                        synthetic._ConvFirst(16, 3, 2, 4, "relu")).eval()
    dyn = convgap.make_dynamic(net, "spatial", granularity=2, check=False, quiet=True)
    seconds = {}
    for density in (0.25, 1.0):
        ops = record(dyn, (1, 3, 24, 24), density=density)
        unit = next(op for op in ops if op.unit)
        assert unit.body
        got = cal.op_seconds(ops)[ops.index(unit)]
        fixed = cal.sparse_s.get("DynamicBlock-torch", cal.overhead_s)
        assert got == pytest.approx(fixed + cal.op_seconds(list(unit.body)).sum(), rel=1e-9)
        seconds[density] = got
    assert seconds[0.25] < seconds[1.0]


def test_factorized_layers_with_kernels_are_units():
    model = nn.Sequential(convgap.TensorialConv2d(8, 16, 3, "tucker", rank=4, padding=1),
                          nn.ReLU()).eval()
    ops = record(model, (1, 8, 12, 12))
    assert ops[0].name == "unit.TensorialConv2d-tucker" and ops[0].module == "0"
    assert ops[0].detail[0] == 2 * model[0].macs((1, 8, 12, 12))   # its own path count
    assert profile(model, torch.randn(1, 8, 12, 12), 1, 1).names == [op.name for op in ops]


def test_swapped_layers_leave_out_weight_preparation():
    """AlgoConv2d transforms its weights once: no recorded op inside one reads only
    tensors computed without the model's input."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convgap.swap(small(), "winograd_f2", quiet=True)
    ops = record(model, (1, 3, 16, 16))
    from_input = {ops[0].reads[0]}
    for op in ops:
        if any(r in from_input for r in op.reads):
            from_input.update(op.writes)
        elif op.module in ("2.conv", "3.conv"):
            pytest.fail(f"{op.name} in {op.module} computes from weights only")
    t = profile(model, torch.randn(1, 3, 16, 16), repeats=1, warmup=1)
    assert sum(v is None for v in align(ops, t)) <= len(ops) / 10


def test_granularity_and_budget_from_predictions(tiny):
    """granularity='predict' keeps, per stage, the granularity the predictor puts fastest;
    the 'predicted' budget's tables come from predictions at each density."""
    x = torch.randn(1, 3, 32, 32)
    dyn = convgap.make_dynamic(_resnet(), "spatial", x, granularity="predict", check=False,
                               quiet=True)
    block = dyn.get_submodule("layer1.0")
    chosen = block.granularity()
    times = {}
    for g in (1, 2, 4, 8):
        block.masker.granularity = g
        times[g] = convgap.predict_latency(block, (1, 64, 8, 8), density=0.5).total_s
    assert times[chosen] == min(times.values())
    block.masker.granularity = chosen
    from convgap.dynamic.budget import Budget, DENSITIES, predict_tables
    tables = predict_tables(dyn, x)
    assert set(tables) == set(convgap.dynamic.dynamic_blocks(dyn))
    t = tables["layer1.0"]
    assert t.densities == DENSITIES and all(s > 0 for s in t.seconds) and t.static_s > 0
    b = Budget(dyn, 0.5, steps=10, kind="predicted", example_input=x, quiet=True)
    assert set(b.tables) == set(tables)


def test_analyze_with_predictions(tiny, capsys):
    """analyze(predict=True): the model's and each layer call's predicted seconds beside the
    measured ones (a module called twice: half its time each), in the tables and the CLI."""
    from rich.console import Console
    from convgap.analysis.render import tables

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(self.conv(x))

    model = Twice().eval()
    run = convgap.analyze(model, (1, 3, 16, 16), predict=True, quiet=True,
                          allocation=False).runs[0]
    p = convgap.predict_latency(model, (1, 3, 16, 16))
    assert run.total.predicted_s == pytest.approx(p.total_s)
    assert [r.name for r in run.layers] == ["conv", "conv#2"]
    assert all(r.predicted_s == pytest.approx(p.layer("conv").seconds / 2) for r in run.layers)
    console = Console(width=250, record=True)
    console.print(tables(convgap.analysis.Report([run])))
    assert "predicted ms" in console.export_text()
    assert cli.main(["analyze", "resnet18", "--image-size", "32", "--batch", "1",
                     "--predict", "--no-malloc-cost", "--quiet"]) == 0
    assert "predicted ms" in capsys.readouterr().out


needs_plan = pytest.mark.skipif(
    __import__("convgap.kernels.cpu.plan", fromlist=["x"]).unavailable() is not None,
    reason="no oneDNN plan here")


@needs_plan
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_a_whole_network_plan_is_predicted_step_by_step(tiny, layout):
    """fuse's whole-network plan: its steps as ops (FLOPs equal an independent count of
    the model; each reads what the step before wrote, or a weight), and the prediction
    is the faster of the plan and the fused blocks, each as predicted alone."""
    import dataclasses
    import warnings
    from convgap.predict.plan import plan_ops, plan_times
    cal = tiny
    assert cal.stats["plans"] and cal.stats["plan_conv"]["samples"] >= 8   # plans calibrated
    assert all(p["whole_s"] > 0 and p["steps_s"] > 0 for p in cal.stats["plans"])
    model = _resnet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = convgap.fuse(model, quiet=True)
    shape = (2, 3, 32, 32)
    steps = plan_ops(net, shape, layout)
    kinds = [features.kind(op) for op in steps]
    assert kinds.count("plan_conv") == 20 and kinds.count("plan_matmul") == 1
    assert kinds[-1] == "plan_memory" and steps[-1].outputs[0].shape == (2, 4)
    assert (steps[0].name == "plan.reorder") == (layout == "nchw")
    flops = sum(features.work(op)[0] for op in steps)
    assert flops == 2 * count(model, shape).macs
    assert steps[1 if layout == "nchw" else 0].module == "model.conv1"
    for before, op in zip(steps, steps[1:]):
        assert op.reads[0] in before.writes or any(op.reads[0] in s.writes for s in steps)
    # the faster of the two forms, each predicted on its own
    plan_s = cal.plan_total(cal.op_seconds(steps))
    never = dataclasses.replace(cal, plan_overhead_s=float("inf"))
    blocks = convgap.predict_latency(net, shape, layout=layout, calibration=never)
    assert blocks.path == "blocks" and not any(op.name.startswith("plan.") for op in
                                                 blocks.ops)
    p = convgap.predict_latency(net, shape, layout=layout, calibration=cal)
    assert p.total_s == pytest.approx(min(plan_s, blocks.total_s), rel=1e-9)
    assert p.path == ("plan" if plan_s < blocks.total_s else "blocks")
    always = dataclasses.replace(cal, plan_overhead_s=-1.0)   # a plan always faster
    q = convgap.predict_latency(net, shape, layout=layout, calibration=always)
    assert q.path == "plan" and len(q.ops) == len(steps)
    # a calibration made without plans (no oneDNN wheel then) never predicts one
    none = dataclasses.replace(always, stats={**cal.stats, "plans": []})
    assert convgap.predict_latency(net, shape, layout=layout, calibration=none).path == \
        "blocks"
    assert q.layer("model.layer1.0.conv1").ops == 1
    assert {r.name for r in q.blocks} >= {"model.layer1", "model.fc"}
    assert math.isclose(sum(r.seconds for r in q.blocks), q.ops_s)
    # the steps timed inside a real run: one time per predicted op
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last
                                      if layout == "channels_last" else
                                      torch.contiguous_format)
    t = plan_times(net, x, repeats=2, warmup=1)
    assert len(t) == len(steps) and min(t) > 0
    assert net.bound(x) is None        # timed on a plan of its own: nothing bound, chosen
    with pytest.raises(ConvgapError, match="float32"):
        plan_ops(net, shape, layout, torch.float64)
    # where the network has measured its choice for this input, that is what it runs
    from convgap import choice
    from convgap.layers import FusedNetwork
    assert net.stored_choice(shape, layout) is None
    key = choice.cache_key(f"{FusedNetwork.KIND}|{net.choice_key(shape, layout)}")
    for stored, calib in (("blocks", always), ("plan", never)):
        choice.store(key, {"choice": stored}, persist=False)
        assert net.stored_choice(shape, layout) == stored
        assert convgap.predict_latency(net, shape, layout=layout,
                                       calibration=calib).path == stored
    with torch.no_grad():
        net(x)            # bound now: it runs the stored choice
    assert net.kernel_choice == "plan"
    choice.clear_memory()
