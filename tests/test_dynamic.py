"""Dynamic networks: make_dynamic finds residual blocks by structure; sparse execution
equals masked execution for given masks (random masks, strides, odd sizes, both layouts,
the three modes); forced densities are exact; the budget's costs are counts of what the
masks keep; training moves the maskers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from convgap.kernels.cpu import plan as cplan
from convgap import ConvgapError, models
from convgap.dynamic import (DynamicBlock, dynamic_blocks, force_density, make_dynamic,
                             set_execution)
from convgap.dynamic.budget import Budget, LatencyTable, temperature
from convgap.ops import onednn
from convgap.transforms.changes import LEFT_ATTR
from convgap.transforms.eligible import first_inputs


class Bottleneck(nn.Module):
    """torchvision's style: stride on the 3x3, a projection shortcut in a Sequential."""

    def __init__(self, cin, width, cout, stride=1, groups=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + idt)


class Basic(nn.Module):
    """Functional activations, the shortcut an identity."""

    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, 1, 1)
        self.b = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return F.relu(x + self.b(F.relu(self.a(x))))


class Inverted(nn.Module):
    """An inverted residual as a Sequential body (1x1, depthwise 3x3, 1x1)."""

    def __init__(self, c, e=4):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c * e, 1, bias=False), nn.BatchNorm2d(c * e), nn.ReLU6(),
            nn.Conv2d(c * e, c * e, 3, 1, 1, groups=c * e, bias=False),
            nn.BatchNorm2d(c * e), nn.ReLU6(),
            nn.Conv2d(c * e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _net():
    return _randomize_bn(nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1), Basic(16), Bottleneck(16, 8, 32, stride=2),
        Bottleneck(32, 8, 32), Bottleneck(32, 8, 32, groups=2), Inverted(32),
        Bottleneck(32, 16, 64, stride=2)).eval())


def _random_masks(block: DynamicBlock, x: torch.Tensor, density: float, seed: int):
    block.masker.force(density, seed)
    return block.mask(x)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _sparse_and_masked(dyn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sparse output, masked output) of ``dyn`` for ``x``; leaves it sparse."""
    with torch.no_grad():
        set_execution(dyn, "masked")
        ref = dyn(x)
        set_execution(dyn, "sparse")
        return dyn(x), ref


@pytest.mark.parametrize("mode", ["spatial", "channel", "layer"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sparse_equals_masked_for_random_masks(mode, channels_last):
    torch.manual_seed(0)
    net = _net()
    granularity = 1 if mode != "spatial" else [3, 2, 1]
    grans = granularity if isinstance(granularity, list) else [1]
    for g in grans:
        dyn = make_dynamic(net, mode, granularity=g, check=False, quiet=True)
        blocks = dynamic_blocks(dyn)
        if mode == "channel":   # slicing a grouped conv's channels would break its groups
            assert len(blocks) == 5 and "grouped" in getattr(dyn[4], LEFT_ATTR)
        else:
            assert len(blocks) == 6
        for n, size in ((1, 13), (3, 11), (2, 16)):    # odd sizes, partial tiles
            x = torch.randn(n, 3, size, size)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for density in (1.0, 0.6, 0.3, 0.0):
                for seed in range(2):
                    force_density(dyn, density, seed)
                    got, ref = _sparse_and_masked(dyn, x)
                    assert _rel(got, ref) <= 1e-4, (mode, g, n, size, density, seed)
                    if density == 1.0:
                        with torch.no_grad():
                            assert _rel(got, net(x)) <= 1e-4


def test_sparse_runs_sparse():
    """The sparse path is what runs in eval without autograd (a block whose masked
    path is broken still gives the right answer), and the masked path under autograd."""
    net = _net()
    dyn = make_dynamic(net, "spatial", granularity=2, check=False, quiet=True)
    force_density(dyn, 0.5)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = dyn(x)
    for b in dynamic_blocks(dyn).values():
        b.masked = None   # would raise if called
    with torch.no_grad():
        assert torch.equal(dyn(x), ref)
    with pytest.raises(TypeError):
        dyn(x)            # autograd on: masked


@pytest.mark.parametrize("native", [True, False])
def test_spatial_bodies_run_the_tile_kernel_where_it_is(native, monkeypatch):
    """Basic, bottleneck and inverted residual bodies (dense, depthwise) run the tile
    kernel where it is available, the torch path where it is not; both equal masked
    execution."""
    from convgap.kernels.cpu import tiles
    from convgap.layers import dynamic as layer
    if native and not tiles.available():
        pytest.skip("no AVX-512 CPU or no C compiler here")
    calls = []
    bind = tiles.bind
    monkeypatch.setattr(layer.tile_kernel, "available", lambda: native)
    monkeypatch.setattr(layer.tile_kernel, "bind",
                        lambda *a, **k: calls.append(1) or bind(*a, **k))
    net = _net()
    dyn = make_dynamic(net, "spatial", granularity=2, check=False, quiet=True)
    planned = [b for b in dynamic_blocks(dyn).values() if b._tile_plan is not None]
    # the basic block, the bottlenecks but the grouped one, the inverted residual
    assert len(planned) == 5
    for channels_last in (False, True):
        x = torch.randn(2, 3, 15, 15)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        force_density(dyn, 0.5, 1)
        assert _rel(*_sparse_and_masked(dyn, x)) <= 1e-4
    assert (len(calls) > 0) == native


class ConvFirstDense(nn.Module):
    """ConvFirst's body with one group: a dense 3x3, a 1x1 expanding, a 1x1 projecting
    (the middle conv widens: not the tile kernel's [first, k x k, 1x1])."""

    def __init__(self, c, e=2):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c),
            nn.Conv2d(c, c * e, 1, bias=False), nn.BatchNorm2d(c * e), nn.SiLU(),
            nn.Conv2d(c * e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


def test_a_widening_middle_conv_runs_the_torch_path():
    """A body whose middle conv has more channels out than in runs sparse through torch
    (the tile kernel keeps one width through its middle; it was bound and crashed)."""
    net = _randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), ConvFirstDense(16)).eval())
    dyn = make_dynamic(net, "spatial", granularity=2, check=False, quiet=True)
    (block,) = dynamic_blocks(dyn).values()
    assert block._tile_plan is None
    x = torch.randn(2, 3, 10, 10)
    force_density(dyn, 0.5, 0)
    assert _rel(*_sparse_and_masked(dyn, x)) <= 1e-4


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_tile_kernel_decides_as_the_masker(channels_last):
    """Where the masker decides inside the tile kernel's call (spatial blocks, eval, no
    autograd), its decisions are the torch masker's (average pool to the grid, 1x1 conv,
    logit > 0: uneven and overlapping pooling bins, strided blocks) and the output is the
    masked execution's at those masks."""
    from convgap.kernels.cpu import tiles
    if not tiles.available():
        pytest.skip("no AVX-512 CPU or no C compiler here")
    torch.manual_seed(0)
    net = _net()
    for g in (1, 2, 3):
        dyn = make_dynamic(net, "spatial", granularity=g, check=False, quiet=True)
        blocks = [b for b in dynamic_blocks(dyn).values() if b._tile_plan is not None]
        for b in blocks:     # logits around 0: about half of the tiles kept
            nn.init.normal_(b.masker.conv.weight, std=1.0)
            nn.init.constant_(b.masker.conv.bias, 0.1)
        for n, size in ((1, 13), (2, 16)):
            x = torch.randn(n, 3, size, size)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            inputs, _ = first_inputs({b: b for b in blocks}, lambda: dyn(x))
            kept = []
            for b in blocks:
                xb = inputs[b][0]
                with torch.no_grad():
                    y = b(xb)
                    want = b.mask(xb)                 # the torch masker
                    assert torch.equal(b.last_mask, want)
                    assert _rel(y, b.masked(xb, want)) <= 1e-4
                kept.append(float(want.mean()))
            assert 0.1 < sum(kept) / len(kept) < 0.9


@pytest.mark.parametrize("mode", ["spatial", "channel"])
def test_refresh_after_writes_that_bypass_the_version_counter(mode):
    """The folded and packed weights follow versioned changes; ``p.data.mul_()`` bypasses
    the version counter, and convgap.transforms.refresh drops what the blocks kept: sparse
    execution equals masked execution again."""
    from convgap.transforms import refresh
    torch.manual_seed(0)
    dyn = make_dynamic(_net(), mode, granularity=2, check=False, quiet=True)
    x = torch.randn(2, 3, 15, 15)
    force_density(dyn, 0.5, 3)
    with torch.no_grad():
        dyn(x)                                  # folds and packs
        for p in dyn.parameters():
            p.data.mul_(1.5)                    # no version bump
        set_execution(dyn, "masked")
        want = dyn(x)
        set_execution(dyn, "sparse")
        assert _rel(dyn(x), want) > 1e-3        # the kept weights are stale
        assert refresh(dyn) == len(dynamic_blocks(dyn))
        assert _rel(dyn(x), want) <= 1e-4


def test_force_density_keeps_exact_counts():
    dyn = make_dynamic(_net(), "spatial", granularity=1, check=False, quiet=True)
    force_density(dyn, 0.3, seed=5)
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        dyn(x)
    for b in dynamic_blocks(dyn).values():
        m = b.last_mask
        cells = m[0].numel()
        assert (m.flatten(1).sum(1) == round(0.3 * cells)).all()
    force_density(dyn, None)
    assert all(b.masker.forced is None for b in dynamic_blocks(dyn).values())
    with pytest.raises(ConvgapError, match="density"):
        force_density(dyn, 1.5)


def test_new_maskers_keep_everything():
    """A new masker keeps every position (keep logit +5): the dynamic model computes
    what the static one does, in eval and (almost surely) in training."""
    net = _net()
    dyn = make_dynamic(net, "spatial", granularity=2, check=False, quiet=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _rel(dyn(x), net(x)) <= 1e-5
    dens = [float(b.density().mean()) for b in dynamic_blocks(dyn).values()]
    assert dens == [1.0] * len(dens)


def test_make_dynamic_finds_blocks_by_structure_and_says_what_it_left():
    class NoResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.c2(F.relu(self.c1(x)))

    class WithSE(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
            self.fc = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            h = self.c1(x)
            h = h * torch.sigmoid(self.fc(h.mean((2, 3), keepdim=True)))
            return x + self.c2(h)

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), NoResidual(), WithSE(), Basic(8))
    dyn = make_dynamic(net, "spatial", granularity=2, quiet=True)
    assert list(dynamic_blocks(dyn)) == ["3"]
    assert "squeeze" in getattr(dyn[2], LEFT_ATTR) or "se" in getattr(dyn[2], LEFT_ATTR)
    assert not isinstance(dyn[1], DynamicBlock)
    # the original is untouched; inplace changes it
    assert not isinstance(net[3], DynamicBlock)
    make_dynamic(net, "layer", inplace=True, quiet=True)
    assert isinstance(net[3], DynamicBlock)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "convfirst"])
def test_zoo_models_become_dynamic_and_agree(name):
    torch.manual_seed(0)
    net = _randomize_bn(models.create(name, num_classes=10)).eval()
    x = torch.randn(1, 3, 40, 40)
    dyn = make_dynamic(net, "spatial", x, granularity=2, quiet=True)  # checked
    assert len(dynamic_blocks(dyn)) >= 8
    assert all(b.execution == "sparse" for b in dynamic_blocks(dyn).values())
    force_density(dyn, 0.5)
    with torch.no_grad():
        got = dyn(x)
        set_execution(dyn, "masked")
        assert _rel(got, dyn(x)) <= 1e-4


def test_state_dict_keeps_the_block_names():
    net = _net()
    dyn = make_dynamic(net, "channel", groups=2, check=False, quiet=True)
    static = net.state_dict()
    keys = set(dyn.state_dict())
    assert set(static) <= keys
    assert all(".masker." in k for k in keys - set(static))
    fresh = make_dynamic(_net(), "channel", groups=2, check=False, quiet=True)
    missing, unexpected = fresh.load_state_dict(static, strict=False)
    assert not unexpected and all(".masker." in k for k in missing)


def test_bad_arguments():
    net = _net()
    with pytest.raises(ConvgapError, match="mode"):
        make_dynamic(net, "pixels")
    with pytest.raises(ConvgapError, match="example_input"):
        make_dynamic(net, "spatial")              # granularity='auto' times the blocks
    with pytest.raises(ConvgapError, match="target"):
        make_dynamic(net, "spatial", granularity=2, target=0)
    with pytest.raises(ConvgapError, match="per stage"):
        make_dynamic(net, "spatial", torch.randn(1, 3, 16, 16), granularity=[1, 2])
    with pytest.raises(ConvgapError, match="no residual block"):
        make_dynamic(nn.Sequential(nn.Conv2d(3, 3, 3)), "layer")
    with pytest.raises(ConvgapError, match="execution"):
        set_execution(make_dynamic(net, "layer", quiet=True), "dense")
    with pytest.raises(ConvgapError, match="no dynamic blocks"):
        force_density(net, 0.5)


def test_auto_granularity_picks_a_measured_candidate(force):
    x = torch.randn(1, 3, 32, 32)
    force({"dynamic-granularity": "g2"})
    dyn = make_dynamic(_net(), "spatial", x, quiet=True)
    assert {b.granularity() for b in dynamic_blocks(dyn).values()} == {2}
    dyn = make_dynamic(_net(), "spatial", x, granularity=[1, 2, 4], quiet=True)
    assert [b.granularity() for b in dynamic_blocks(dyn).values()] == [1, 2, 2, 2, 2, 4]


def _count_macs(block: DynamicBlock, x: torch.Tensor) -> float:
    """MACs of the stages over the positions / channels the mask keeps, counted
    independently: each stage run masked, positions whose output is needed counted."""
    m = block.last_mask
    total = 0.0
    convs = block.convs()
    if block.mode == "spatial":
        # a position of stage i is needed if any kept output reads it: differentiate
        h = x.detach().clone().requires_grad_(True)
        outs = []
        t = h
        for i, c in enumerate(convs):
            t = block._stage(i, t)
            t.retain_grad()
            outs.append(t)
        keep = block.pixel_mask(m, tuple(t.shape[-2:]))
        (t * keep).sum().backward()  # the kept outputs' dependencies
        for c, o in zip(convs, outs):
            touched = (o.grad.abs().sum(1) != 0).float()   # (N, H, W)
            # exact zeros of the gradient are possible but not with these weights
            total += float(touched.mean()) * o.shape[-2] * o.shape[-1] * c.out_channels * (
                c.in_channels // c.groups) * c.kernel_size[0] * c.kernel_size[1]
        return total
    raise AssertionError


def test_flops_cost_counts_the_positions_computed():
    torch.manual_seed(0)
    net = nn.Sequential(Basic(8), Bottleneck(8, 4, 8)).eval()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.uniform_(m.weight, 0.5, 1.0)   # positive: no gradient cancels
    dyn = make_dynamic(net, "spatial", granularity=2, check=False, quiet=True)
    force_density(dyn, 0.4, seed=2)
    x = torch.rand(1, 8, 10, 10) + 0.1
    with torch.no_grad():
        dyn(x)
    h = x
    for b in dynamic_blocks(dyn).values():
        cost, dense = b.cost_macs()
        assert float(dense) == sum(b.stage_macs(tuple(h.shape[-2:])))
        expected = _count_macs(b, h)
        assert abs(float(cost) - expected) <= 1e-6 * expected
        with torch.no_grad():
            h = b(h)


def test_budget_moves_the_maskers_toward_the_target():
    """A few steps of the budget loss alone lower the density of every block."""
    torch.manual_seed(0)
    net = _net().train()
    dyn = make_dynamic(net, "spatial", granularity=2, check=False, quiet=True)
    for p in dyn.parameters():
        p.requires_grad_(False)
    maskers = [b.masker for b in dynamic_blocks(dyn).values()]
    params = [p for mk in maskers for p in mk.parameters()]
    for p in params:
        p.requires_grad_(True)
    for mk in maskers:
        nn.init.constant_(mk.conv.bias, 0.5)
    budget = Budget(dyn, 0.25, steps=60, kind="flops", tau=(1.0, 1.0))
    opt = torch.optim.SGD(params, lr=2.0)
    x = torch.randn(8, 3, 16, 16)
    start = None
    for step in range(60):
        out = dyn(x)
        loss = budget(dyn, x, out, step)
        if start is None:
            start = budget.last["network"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert start > 0.5 and budget.last["network"] < 0.4


def test_budget_schedule_and_tables():
    dyn = make_dynamic(_net(), "layer", check=False, quiet=True)
    b = Budget(dyn, 0.5, steps=99, kind="flops")
    assert b.bounds(0) == pytest.approx((0.5, 0.5))
    assert b.bounds(33) == pytest.approx((0.0, 1.0), abs=1e-6)
    assert temperature(0, 10) == pytest.approx(5.0)
    assert temperature(10, 10) == pytest.approx(0.1)
    t = LatencyTable((0.0, 0.5, 1.0), (1.0, 2.0, 4.0))
    d = torch.tensor(0.75, requires_grad=True)
    y = t(d)
    y.backward()
    assert float(y.detach()) == pytest.approx(3.0) and float(d.grad) == pytest.approx(4.0)
    # fractions are of the static block's time where measured, else of the densest point
    assert t.reference == 4.0 and LatencyTable((0.0, 1.0), (1.0, 4.0), 2.5).reference == 2.5
    with pytest.raises(ConvgapError, match="example_input"):
        Budget(dyn, 0.5, steps=10)
    with pytest.raises(ConvgapError, match="kind"):
        Budget(dyn, 0.5, steps=10, kind="energy")
    with pytest.raises(ConvgapError, match="steps"):
        Budget(dyn, 0.5, steps=0, kind="flops")


def test_latency_budget_trains_through_fit():
    """fit with the latency budget as extra_loss: one epoch runs, the masker's
    parameters receive gradients and change."""
    from convgap import data, train
    torch.manual_seed(0)
    net = models.create("resnet18", num_classes=4)
    tr, va = data.shapes(4, 24, 32, 16, 0)
    x = torch.randn(2, 3, 24, 24)
    dyn = make_dynamic(net, "spatial", x, granularity=1, quiet=True)
    budget = Budget(dyn, 0.5, steps=4, example_input=x, quiet=True)
    assert all(t.static_s > 0 for t in budget.tables.values())
    before = [b.masker.conv.weight.detach().clone() for b in dynamic_blocks(dyn).values()]
    train.fit(dyn, tr, va, epochs=1, batch_size=8, lr=1e-2, optimizer="adamw",
              extra_loss=budget, quiet=True)
    after = [b.masker.conv.weight for b in dynamic_blocks(dyn).values()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    # a fraction of the fused static blocks' time: above 1 where a sparse block at this
    # density is slower than its fused static form (tiny blocks here)
    assert 0.0 <= budget.last["network"] < float("inf")


def test_report_and_densities(fixed_roofs):
    from convgap import data
    from convgap.dynamic import densities, report
    net = _net()
    dyn = make_dynamic(net, "spatial", granularity=1, check=False, quiet=True)
    x = torch.randn(1, 3, 16, 16)
    rows = report(dyn, x, density=0.5, roofs=fixed_roofs)
    assert [r.name for r in rows] == list(dynamic_blocks(dyn))
    for r in rows:
        assert 0.45 <= r.density <= 0.55          # forced, exact per cell
        assert 0.0 < r.macs < r.dense_macs
        assert r.ideal_s == pytest.approx(2 * r.macs / fixed_roofs.peak_flops)
        assert r.efficiency == pytest.approx(r.ideal_s / r.dynamic_s)
    assert all(b.masker.forced is None for b in dynamic_blocks(dyn).values())
    _, val = data.shapes(4, 16, 4, 6, 0)
    dens = densities(dyn, val, batch_size=4)
    assert set(dens) == set(dynamic_blocks(dyn))
    assert all(m == 1.0 and s == 0.0 for m, s in dens.values())   # new maskers keep all


def test_train_dynamic_recipe():
    from convgap import data
    from convgap.dynamic import train_dynamic
    torch.manual_seed(0)
    static = models.create("resnet18", num_classes=4).eval()
    before = {k: v.clone() for k, v in static.state_dict().items()}
    tr, va = data.shapes(4, 24, 24, 8, 0)
    res = train_dynamic(static, tr, va, epochs=1, mode="channel", budget="flops",
                        batch_size=8, quiet=True)
    assert all(torch.equal(before[k], v) for k, v in static.state_dict().items())
    assert res.static.images == res.dynamic.images == 8
    assert set(res.density) == set(dynamic_blocks(res.model))
    assert 0.0 <= res.mean_density <= 1.0 and "network" in res.budget
    with pytest.raises(ConvgapError, match="teacher"):
        train_dynamic(static, tr, va, epochs=1, teacher=static)


def test_cli_dynamic(tmp_path, capsys):
    import json
    from convgap.cli import main
    spec = "shapes:num_classes=3,image_size=24,train_size=12,val_size=6"
    st = tmp_path / "st"
    assert main(["train", "resnet18", "--data", spec, "--epochs", "1", "--batch-size", "6",
                 "--lr", "1e-3", "--out", str(st), "--quiet"]) == 0
    out = tmp_path / "dyn"
    assert main(["dynamic", "resnet18", "--weights", str(st / "weights.pt"), "--data", spec,
                 "--epochs", "1", "--batch-size", "6", "--granularity", "2", "--budget",
                 "flops", "--mode", "layer", "--out", str(out), "--quiet"]) == 0
    log = json.loads((out / "log.json").read_text())
    assert log["mode"] == "layer" and 0 <= log["dynamic_top1"] <= 1
    net = make_dynamic(models.create("resnet18", num_classes=3), "layer", quiet=True)
    net.load_state_dict(torch.load(out / "weights.pt", weights_only=True))
    capsys.readouterr()
    assert main(["dynamic", "resnet18", "--weights", str(st / "weights.pt"), "--data", spec,
                 "--epochs", "1", "--target", "2", "--out", str(out / "x")]) == 2
    assert "target" in capsys.readouterr().err


def test_dense_from_switches_to_the_dense_body():
    from convgap.dynamic.budget import _crossover
    assert _crossover((0.0, 0.5, 1.0), (1.0, 2.0, 4.0), 3.0) == pytest.approx(0.75)
    assert _crossover((0.0, 1.0), (1.0, 2.0), 5.0) == 2.0
    assert _crossover((0.0, 1.0), (3.0, 4.0), 2.0) == 0.0
    dyn = make_dynamic(_net(), "spatial", granularity=2, check=False, quiet=True)
    force_density(dyn, 0.5)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = dyn(x)
        for b in dynamic_blocks(dyn).values():
            b.dense_from = 0.4          # 0.5 >= 0.4: the dense body runs
            b.sparse = None
        assert _rel(dyn(x), ref) <= 1e-5
        for b in dynamic_blocks(dyn).values():
            b.dense_from = 0.6          # 0.5 < 0.6: sparse (broken here)
        with pytest.raises(TypeError):
            dyn(x)


def test_measure_latency_sets_crossovers(monkeypatch):
    """Crossovers set, and the static time includes each block truly fused (fuse never
    takes the model it is given as one block: a lone block must go in a container)."""
    from convgap.dynamic import budget, measure_latency
    import copy
    from convgap.layers.fused_blocks import FusedBlock
    given = []
    real = budget.fuse
    monkeypatch.setattr(budget, "fuse", lambda m, *a, **k: given.append(m) or real(m, *a, **k))
    dyn = make_dynamic(_net(), "spatial", granularity=2, check=False, quiet=True)
    tables = measure_latency(dyn, torch.randn(1, 3, 16, 16), densities=(0.0, 1.0),
                             quiet=True)
    assert set(tables) == set(dynamic_blocks(dyn))
    for b in dynamic_blocks(dyn).values():
        assert 0.0 <= b.dense_from <= 2.0 and b.masker.forced is None
    assert all(len(t.seconds) == 2 and min(t.seconds) > 0 for t in tables.values())
    assert len(given) == len(tables)
    # what fuse was given holds a block it fuses (unmeasured: every block it matches)
    assert sum(any(isinstance(f, FusedBlock) for f in real(copy.deepcopy(m),
                                                           quiet=True).modules())
               for m in given) >= 4


def test_granularity_changed_after_a_run():
    """A block run at one granularity and then another (as granularity='auto' does) runs
    the new one (a bound kernel call kept for the first must not be reused)."""
    dyn = make_dynamic(_net(), "spatial", granularity=1, check=False, quiet=True)
    x = torch.randn(1, 3, 24, 24)
    force_density(dyn, 0.5, seed=1)
    with torch.no_grad():
        for g in (1, 4, 2, 1):
            for b in dynamic_blocks(dyn).values():
                b.masker.granularity = g
            got = dyn(x)
            set_execution(dyn, "masked")
            ref = dyn(x)
            set_execution(dyn, "sparse")
            assert _rel(got, ref) <= 1e-4, g


class NoExpand(nn.Module):
    """An inverted residual without expansion: depthwise 3x3 first (channel mode slices
    the block input's channels for it)."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn2(self.pw(F.relu6(self.bn1(self.dw(x)))))


@pytest.mark.parametrize("mode", ["channel", "layer"])
def test_channel_and_layer_blocks_run_bound_plans(mode, monkeypatch):
    """Channel and layer blocks run as oneDNN plans bound per pattern of kept groups (the
    batch split by pattern; kept samples through the whole block, skipped ones through the
    shortcut), equal to masked execution; with oneDNN off, the torch path, equal too."""
    torch.manual_seed(0)
    net = _randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), NoExpand(16), Basic(16),
                                      Bottleneck(16, 8, 32, stride=2), Inverted(32)).eval())
    dyn = make_dynamic(net, mode, check=False, quiet=True)
    assert len(dynamic_blocks(dyn)) == 4
    for n, density in ((1, 0.5), (5, 0.5), (4, 0.75), (3, 0.0), (2, 1.0), (1, 1.0)):
        x = torch.randn(n, 3, 11, 11)
        force_density(dyn, density, seed=n)
        with torch.no_grad():
            set_execution(dyn, "masked")
            ref = dyn(x)
            set_execution(dyn, "sparse")
            got = dyn(x)
            with monkeypatch.context() as patch:
                patch.setattr(onednn, "AVAILABLE", False)
                plain = dyn(x)
        assert _rel(got, ref) <= 1e-4, (n, density)
        assert _rel(plain, ref) <= 1e-4, (n, density)
    plans = [k for b in dynamic_blocks(dyn).values() for k in b._fold
             if isinstance(k, tuple) and k[0] == "plan"]
    if onednn.AVAILABLE:
        assert len(plans) >= 4
        if mode == "channel":   # several patterns of kept groups were bound
            assert len({k[1] for k in plans}) > 2
    if cplan.unavailable() is None:   # single samples ran whole blocks as one oneDNN plan
        fulls = [v[2].full for b in dynamic_blocks(dyn).values() for k, v in b._fold.items()
                 if isinstance(k, tuple) and k[0] == "plan"]
        assert any(getattr(f, "plans", None) for f in fulls)


def test_timed_densities_are_densities_a_block_can_have():
    """A block of few mask cells is timed at densities it can have: a layer block (one
    cell) skipping and computing, not at 0.5 (which would keep round(0.5) = 0 cells), and
    'auto' granularity times the two around the target in proportion."""
    from convgap.dynamic import measure_latency
    from convgap.dynamic.transform import _mix
    assert _mix(1, 0.5) == [1.0, 1.0, 0.0, 0.0]
    assert _mix(4, 0.5) == [0.5] * 4
    assert sum(_mix(3, 0.5)) / 4 == pytest.approx(0.5)
    assert _mix(2, 1.0) == [1.0] * 4 and _mix(5, 0.0) == [0.0] * 4
    dyn = make_dynamic(_net(), "layer", check=False, quiet=True)
    assert all(b.cells((16, 16)) == 1 for b in dynamic_blocks(dyn).values())
    tables = measure_latency(dyn, torch.randn(1, 3, 16, 16), quiet=True)
    assert all(t.densities == (0.0, 1.0) for t in tables.values())
    dyn = make_dynamic(_net(), "spatial", granularity=8, check=False, quiet=True)
    tables = measure_latency(dyn, torch.randn(1, 3, 16, 16), quiet=True)
    # 16x16 blocks at granularity 8: 4 tiles; the stride-2 blocks' 8x8 / 4x4 outputs: 1
    assert {t.densities for t in tables.values()} == {(0.0, 0.25, 0.5, 0.75, 1.0),
                                                       (0.0, 1.0)}


def test_gumbel_noise_shrinks_with_the_temperature():
    """Training decisions: logistic noise at full scale while the temperature is >= 1
    (keep rate sigmoid(logit)), shrinking with it below 1, so training ends on eval's
    decisions (logit > 0); the straight-through gradient flows."""
    from convgap.layers.dynamic import gumbel_keep
    torch.manual_seed(0)
    logits = torch.full((20000,), 0.5, requires_grad=True)
    hot = gumbel_keep(logits, 5.0, True)
    want = torch.sigmoid(torch.tensor(0.5)).item()
    assert float(hot.detach().mean()) == pytest.approx(want, abs=0.02)
    cold = gumbel_keep(logits, 0.1, True)
    assert float(cold.detach().mean()) > 0.98
    c = cold.detach()
    assert bool(((c - c.round()).abs() < 1e-6).all())      # hard (straight-through)
    cold.sum().backward()
    assert float(logits.grad.abs().sum()) > 0
    assert torch.equal(gumbel_keep(logits, 0.1, False), torch.ones(20000))


def test_sparse_cuda_switch_picks_the_gpu_kernel_by_body():
    """config.SPARSE_CUDA: 'auto' takes the Triton tile kernels for a depthwise body only
    (measured faster there on an H200, the gather path for dense bodies), the others
    force one; a value it does not know is an error, not a silent default."""
    from convgap import config
    dyn = make_dynamic(_net(), "spatial", granularity=2, check=False, quiet=True)
    blocks = [b for b in dynamic_blocks(dyn).values() if b._tile_plan is not None]
    depthwise = [any(c.groups > 1 for c in b.convs()) for b in blocks]
    assert any(depthwise) and not all(depthwise)
    assert [b._cuda_triton() for b in blocks] == depthwise
    for kernel, want in (("triton", True), ("gather", False)):
        with config.override(SPARSE_CUDA=kernel):
            assert all(b._cuda_triton() is want for b in blocks)
    with config.override(SPARSE_CUDA="cudnn"), pytest.raises(ConvgapError, match="one of"):
        blocks[0]._cuda_triton()
