"""The whole-network oneDNN plan: its steps against torch ops, the lowering of traced models
(what folds, what is refused and why), FusedNetwork against the model it runs, and fuse
choosing it."""

from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convgap
from convgap import models
from convgap.errors import ConvgapError
from convgap.ops import activations
from convgap.kernels.cpu import plan as cplan
from convgap.layers import network as netmod
from convgap.layers.network import FusedNetwork, PlanWarning
from convgap.transforms.fold import fold_batchnorm
from convgap.transforms.lower import lower
from convgap.transforms.trace import trace

needs_plan = pytest.mark.skipif(cplan.unavailable() is not None,
                                reason=f"no oneDNN plan here: {cplan.unavailable()}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _run_one(build, x: torch.Tensor, out_shape, layout: str = "nhwc") -> torch.Tensor:
    p = cplan.Plan(layout)
    y = build(p, p.input(x.shape, x.stride()))
    out = torch.empty(out_shape)
    p.output(y, out.shape, out.stride())
    p.finalize()
    return p.run(x, out)


# ---------------------------------------------------------------- the plan's steps


@needs_plan
@pytest.mark.parametrize("cin,cout,k,stride,pad,dil,groups", [
    (3, 8, 3, 1, 1, 1, 1), (16, 24, 3, 2, 1, 1, 1), (16, 16, 3, 1, 1, 1, 16),
    (12, 18, 5, 1, 2, 2, 3), (8, 32, 1, 1, 0, 1, 1), (7, 5, 3, 2, 0, 1, 1)])
@pytest.mark.parametrize("act", [None, "relu", "relu6", "silu", "gelu", "sigmoid",
                                 "hardswish", "tanh", "hardsigmoid", "leaky_relu:0.1"])
def test_conv_step_matches_torch(cin, cout, k, stride, pad, dil, groups, act):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, pad, dil, groups)
    x = torch.randn(2, cin, 13, 11)
    ref = conv(x).detach()
    ref = {"hardsigmoid": F.hardsigmoid, "leaky_relu:0.1": lambda t: F.leaky_relu(t, 0.1)
           }.get(act, lambda t: activations.apply(act, t))(ref)
    got = _run_one(lambda p, i: p.conv(i, conv.weight, conv.bias, stride=(stride,) * 2,
                                       padding=(pad,) * 4, dilation=(dil,) * 2,
                                       groups=groups, act=act), x, ref.shape)
    assert rel(got, ref) < 1e-5


@needs_plan
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv_binary_post_op_reads_the_input_without_writing_it(layout):
    torch.manual_seed(8)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 16, 7, 9)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    keep = x.clone()
    ref = F.relu6(torch.tanh(conv(x)) + x).detach()
    got = _run_one(lambda p, i: p.conv(i, conv.weight, conv.bias, stride=(1, 1),
                                       padding=(1,) * 4, dilation=(1, 1), groups=1,
                                       act="tanh", add_from=i, act_after="relu6"),
                   x, ref.shape)
    assert rel(got, ref) < 1e-5 and torch.equal(x, keep)


@needs_plan
@pytest.mark.parametrize("plan_layout", ["nhwc", "any"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv_sum_post_op_adds_in_place_then_activates(layout, plan_layout):
    torch.manual_seed(1)
    a, b = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
    x = torch.randn(1, 16, 9, 9)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.relu(torch.relu(b(x)) + a(x)).detach()

    def build(p, i):
        s = p.conv(i, b.weight, b.bias, stride=(1, 1), padding=(0,) * 4, dilation=(1, 1),
                   groups=1, act="relu")
        return p.conv(i, a.weight, a.bias, stride=(1, 1), padding=(1,) * 4,
                      dilation=(1, 1), groups=1, add_into=s, act_after="relu")
    assert rel(_run_one(build, x, ref.shape, plan_layout), ref) < 1e-5


@needs_plan
@pytest.mark.parametrize("kind,k,s,pad,module", [
    ("max", 3, 2, 1, nn.MaxPool2d(3, 2, 1)),
    ("avg", 3, 2, 1, nn.AvgPool2d(3, 2, 1, count_include_pad=False)),
    ("avg_pad", 3, 2, 1, nn.AvgPool2d(3, 2, 1)), ("avg", 2, 2, 0, nn.AvgPool2d(2))])
def test_pool_step_matches_torch(kind, k, s, pad, module):
    x = torch.randn(2, 8, 11, 10)
    ref = module(x)
    got = _run_one(lambda p, i: p.pool(i, kind, (k, k), (s, s), (pad,) * 4), x, ref.shape)
    assert rel(got, ref) < 1e-6


@needs_plan
def test_global_pool_binary_and_linear_steps():
    torch.manual_seed(2)
    x = torch.randn(3, 16, 7, 5)
    fc = nn.Linear(16 * 7 * 5, 10)
    gate = torch.sigmoid(x.mean((2, 3), keepdim=True))
    ref_mul = x * gate
    got = _run_one(lambda p, i: p.binary(i, p.eltwise(p.pool(i, "avg", (0, 0), (1, 1),
                                                             (0,) * 4), "sigmoid"), "mul"),
                   x, x.shape)
    assert rel(got, ref_mul) < 1e-6
    ref_fc = F.relu(fc(x.flatten(1))).detach()
    got = _run_one(lambda p, i: p.linear(i, fc.weight, fc.bias, act="relu"), x, ref_fc.shape)
    assert rel(got, ref_fc) < 1e-5
    got = _run_one(lambda p, i: p.binary(i, p.copy(i), "add", act="relu6"), x, x.shape)
    assert rel(got, F.relu6(2 * x)) < 1e-6


@needs_plan
def test_plan_errors_name_the_step():
    with pytest.raises(ConvgapError, match="layout"):
        cplan.Plan("nchw")
    p = cplan.Plan()
    i = p.input((1, 8, 5, 5), (200, 25, 5, 1))
    with pytest.raises(ConvgapError, match="does not take"):  # for 4 input channels
        p.conv(i, torch.randn(4, 4, 3, 3), None, stride=(1, 1), padding=(1,) * 4,
               dilation=(1, 1), groups=1)
    with pytest.raises(ConvgapError, match="convolution"):  # the sum's dims differ
        p.conv(i, torch.randn(4, 8, 3, 3), None, stride=(1, 1), padding=(1,) * 4,
               dilation=(1, 1), groups=1, add_into=p.copy(i))
    with pytest.raises(ConvgapError, match="does not take"):
        p.linear(i, torch.randn(3, 8), None)
    with pytest.raises(ConvgapError, match="no post-op"):
        p.eltwise(i, "mish")


def test_unavailable_says_why(monkeypatch):
    monkeypatch.setattr(cplan, "root", lambda: None)
    assert "convgap[onednn]" in cplan.unavailable()
    with pytest.raises(ConvgapError, match="unavailable"):
        cplan.Plan()


# ---------------------------------------------------------------- lowering


def _count(model: nn.Module, targets) -> int:
    gm = trace(model)
    return sum(n.op in ("call_function", "call_method") and n.target in targets
               for n in gm.graph.nodes)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2",
                                  "efficientnet_b0", "convfirst"])
def test_lowered_zoo_models_count_their_layers(name):
    model = fold_batchnorm(models.create(name, num_classes=10).eval(), quiet=True)
    program = lower(model)
    assert not isinstance(program, str), program
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert sum(s.kind == "conv" for s in program.steps) == convs
    adds = _count(model, {operator.add, operator.iadd, torch.add, "add"})
    assert sum(s.add_into is not None for s in program.steps) == adds  # every sum folded
    assert not any(s.kind in ("add", "act") for s in program.steps)


class _Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x) * 0.5


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, y):
        return self.conv(x) + y


@pytest.mark.parametrize("model,why", [
    (models.create("convnext_tiny", num_classes=10).eval(), "permute"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4)), "LayerNorm"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2)), "Upsample"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
     "running statistics"),
    (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")), "reflect"),
    (nn.Sequential(nn.AvgPool2d(2, ceil_mode=True)), "ceil_mode"),
    (_Scalar(), "operand"),
    (_Two(), "more than one input"),
])
def test_lower_refuses_with_the_reason(model, why):
    model = fold_batchnorm(model.eval(), quiet=True)
    got = lower(model)
    assert isinstance(got, str) and why in got


# ---------------------------------------------------------------- FusedNetwork


class _Net(nn.Module):
    """Functional activations, a shortcut read again after its first sum (the sum must not
    write over it), a sum into the network's input, a squeeze-excitation written with
    mean, pooling with padding both ways, flatten + linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.avg = nn.AvgPool2d(3, 1, 1)
        self.fc = nn.Linear(16 * 3 * 3, 5)

    def forward(self, x):
        y = F.relu(self.a(x) + x)          # the input: read by a binary post-op
        z = self.b(y) + y                  # y is read again below: not summed into
        w = torch.relu(z) + y
        v = F.silu(self.bn(self.c(w)))
        g = torch.sigmoid(self.se2(F.relu(self.se1(v.mean((2, 3), keepdim=True)))))
        v = self.avg(self.pool(v * g))
        v = v.mean((2, 3), keepdim=True) + v      # a broadcast operand first in an add
        return self.fc(torch.flatten(v, 1))


class _Tricky(nn.Module):
    """A conv output read before and after its activation; two activations in a row; a
    sum whose other operand is an activation's output read again later."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(6, 6, 3, padding=1) for _ in range(3))

    def forward(self, x):
        y = self.a(x)
        z = F.relu(y)
        w = torch.sigmoid(F.relu(self.b(z)))
        v = self.c(w) + z
        return F.relu6(v) + y + z


class _Joins(nn.Module):
    """A concat along the channels, a leaky ReLU, a hard-sigmoid gate, ceil-mode pooling
    (max, and average without its padding) and functional pooling."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(5, 6, 3, padding=1), nn.Conv2d(5, 4, 1)
        self.gate = nn.Conv2d(10, 10, 1)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.avg = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
        self.c = nn.Conv2d(10, 7, 3, padding=1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.leaky_relu(self.b(x), 0.2)], dim=1)
        y = y * nn.functional.hardsigmoid(self.gate(F.adaptive_avg_pool2d(y, 1)))
        y = self.avg(self.pool(y))
        return F.avg_pool2d(self.c(y), 3, 1, 1) + F.max_pool2d(self.c(y), 3, 1, 1)


def _network(model: nn.Module) -> FusedNetwork:
    folded = fold_batchnorm(copy.deepcopy(model), quiet=True)
    program = lower(folded)
    assert not isinstance(program, str), program
    return FusedNetwork(folded, program).eval()


@needs_plan
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_network_matches_the_model(layout, batch):
    torch.manual_seed(3)
    model = _Net().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    net = _network(model)
    x = torch.randn(batch, 8, 11, 12)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    keep = x.clone()
    with torch.no_grad():
        got, ref = net(x), model(x)
    assert net.kernel_choice == "plan"
    assert rel(got, ref) < 1e-5
    assert torch.equal(x, keep)            # the input is never written


@needs_plan
def test_folds_keep_values_read_elsewhere():
    torch.manual_seed(9)
    model = _Tricky().eval()
    net = _network(model)
    kinds = [s.kind for s in net.program.steps]
    assert kinds.count("conv") == 3 and "act" in kinds     # relu(y) stays: y is read again
    x = torch.randn(2, 6, 9, 10)
    with torch.no_grad():
        assert rel(net(x), model(x)) < 1e-5
    assert net.kernel_choice == "plan"


@needs_plan
@pytest.mark.parametrize("size", [(12, 13), (15, 16), (9, 9)])
def test_concat_gates_and_ceil_pooling_match_the_model(size):
    torch.manual_seed(10)
    model = _Joins().eval()
    net = _network(model)
    kinds = [s.kind for s in net.program.steps]
    assert "cat" in kinds and sum(k == "pool" for k in kinds) == 5
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(1, 5, *size).contiguous(memory_format=layout)
        with torch.no_grad():
            assert rel(net(x), model(x)) < 1e-5
        assert net.kernel_choice == "plan"


def _net_input_reference(seed: int):
    """_Net lowered, an input and the model's output on it."""
    torch.manual_seed(seed)
    model = _Net().eval()
    x = torch.randn(2, 8, 11, 12)
    with torch.no_grad():
        return _network(model), x, model(x)


@needs_plan
def test_both_activation_layouts_bind_the_same_network():
    net, x, ref = _net_input_reference(7)
    for layout in ("nhwc", "any"):
        plan = netmod.bind(net.program, net.model, x, tuple(ref.shape), tuple(ref.stride()),
                           layout)
        assert rel(plan.run(x, torch.empty_like(ref)), ref) < 1e-5


@needs_plan
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0",
                                  "convfirst"])
def test_fused_network_matches_zoo_models(name):
    torch.manual_seed(4)
    model = models.create(name, num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    net = _network(model)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel(net(x), model(x)) < 1e-5
    assert net.kernel_choice == "plan"


@needs_plan
def test_fused_network_follows_weights_and_state_dict():
    torch.manual_seed(5)
    model = _Net().eval()
    net = _network(model)
    x = torch.randn(1, 8, 11, 12)
    with torch.no_grad():
        net(x)
    state = net.state_dict()
    assert set(state) == set(net.model.state_dict())     # no 'model.' prefix
    changed = {k: v + 0.1 if v.is_floating_point() else v for k, v in state.items()}
    net.load_state_dict(changed)
    other = copy.deepcopy(net.model)
    with torch.no_grad():
        assert rel(net(x), other(x)) < 1e-5            # the plan was rebuilt
        net.model.fc.weight.mul_(2)
        assert rel(net(x), net.model(x)) < 1e-5


class _LooseNorm(nn.Module):
    """A batch-norm after a pooling: a step of its own (not folded into a conv)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 5, 1)
        self.pool, self.bn = nn.MaxPool2d(2), nn.BatchNorm2d(6)

    def forward(self, x):
        return self.b(self.bn(self.pool(F.relu(self.a(x)))))


@needs_plan
def test_fused_network_follows_batch_norm_statistics():
    """A batch-norm step's running statistics are read by the plan: changing them in
    place, or loading new ones, rebinds it (only the tensors the plan reads are checked:
    not the blocks' copies)."""
    torch.manual_seed(8)
    net = _network(_LooseNorm().eval())
    assert [s.kind for s in net.program.steps].count("bn") == 1
    read = net._params()
    assert any(t is net.model.bn.running_var for t in read)
    assert len(read) == 2 + 2 + 4 and all(t.is_floating_point() for t in read)
    x = torch.randn(2, 4, 10, 10)
    with torch.no_grad():
        net(x)
        net.model.bn.running_var.mul_(3)        # statistics only: no parameter changes
        net.model.bn.running_mean.add_(0.5)
        assert rel(net(x), net.model(x)) < 1e-5
        state = net.state_dict()
        state["bn.running_mean"] = state["bn.running_mean"] + 0.5
        state["bn.running_var"] = state["bn.running_var"] * 3
        net.load_state_dict(state)
        assert rel(net(x), net.model(x)) < 1e-5
    assert net.kernel_choice == "plan"


@needs_plan
def test_alternating_shapes_bind_once_each(monkeypatch):
    model = _Net().eval()
    net = _network(model)
    binds = []
    real = FusedNetwork._bind
    monkeypatch.setattr(FusedNetwork, "_bind",
                        lambda self, x: binds.append(tuple(x.shape)) or real(self, x))
    xs = [torch.randn(n, 8, 11, 12) for n in (1, 3, 1, 3, 2)]
    with torch.no_grad():
        for x in xs:
            assert rel(net(x), model(x)) < 1e-5
    assert binds == [(1, 8, 11, 12), (3, 8, 11, 12), (2, 8, 11, 12)]
    monkeypatch.setattr(FusedNetwork, "MAX_SHAPES", 2)
    with torch.no_grad():
        net(torch.randn(4, 8, 11, 12))             # a fourth shape drops the oldest
        net(xs[0])
    assert binds[-2:] == [(4, 8, 11, 12), (1, 8, 11, 12)]


@needs_plan
def test_fused_network_takes_torch_for_gradients_and_tracing():
    model = _Net().eval()
    net = _network(model)
    x = torch.randn(1, 8, 11, 12, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None and net.kernel_choice is None   # never bound
    traced = torch.jit.trace(net, x.detach())
    with torch.no_grad():
        assert rel(traced(x.detach()), model(x.detach())) < 1e-5


@needs_plan
def test_a_plan_that_disagrees_is_not_used(monkeypatch):
    model = _Net().eval()
    net = _network(model)
    real = netmod.bind

    def wrong(program, m, x, shape, strides):
        bad = copy.deepcopy(m)
        with torch.no_grad():
            bad.fc.bias.add_(1.0)
        return real(program, bad, x, shape, strides)
    monkeypatch.setattr(netmod, "bind", wrong)
    x = torch.randn(1, 8, 11, 12)
    with pytest.warns(PlanWarning, match="disagrees"), torch.no_grad():
        got = net(x)
    assert net.kernel_choice == "torch"
    with torch.no_grad():
        assert rel(got, model(x)) < 1e-6


# ---------------------------------------------------------------- fuse


@needs_plan
@pytest.mark.parametrize("pick", ["plan", "blocks"])
def test_fuse_measures_the_plan_against_the_fused_blocks(force, pick):
    force({"fused_network": pick, "fuse": "fused"})
    torch.manual_seed(6)
    model = models.create("resnet18", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanWarning)
        fused = convgap.fuse(model, x, quiet=True)
    assert isinstance(fused, FusedNetwork) and fused.kernel_choice == pick
    kinds = {type(m).__name__ for m in fused.blocks.modules()}
    assert "FusedBasicBlock" in kinds
    with torch.no_grad():
        assert rel(fused(x), model(x)) < 1e-5
    runs = {c.runs for c in convgap.changes(fused)}
    assert "network" in runs
    loaded = copy.deepcopy(fused)
    loaded.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert rel(loaded(x), model(x)) < 1e-5


def test_fuse_without_onednn_keeps_the_blocks_and_says_why(monkeypatch, force):
    force({"fuse": "fused"})
    monkeypatch.setattr(cplan, "unavailable", lambda: "no oneDNN here (test)")
    model = models.create("resnet18", num_classes=10).eval()
    fused = convgap.fuse(model, torch.randn(1, 3, 32, 32), quiet=True)
    assert not isinstance(fused, FusedNetwork)
    assert any(c.name == "" and "no oneDNN here (test)" in (c.reason or "")
               for c in convgap.changes(fused))


def test_fuse_without_the_network_pattern_keeps_the_model_class():
    model = models.create("resnet18", num_classes=10).eval()
    fused = convgap.fuse(model, patterns=["basic"], quiet=True)
    assert not isinstance(fused, FusedNetwork)


# ---------------------------------------------------------------- the sketch (prediction)


@needs_plan
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "_Joins",
                                  "_Net"])
def test_sketch_lays_out_the_steps_the_plan_runs(name):
    """The sketch (no oneDNN, meta input) has the real plan's primitives, in order, each
    marked with the same module, and every tensor's dims; both input layouts (an NCHW
    input is reordered before the first conv), batch 1 and 3, a flattened output."""
    torch.manual_seed(5)
    if name.startswith("_"):
        model = globals()[name]().eval()
        c, size = (5, (15, 16)) if name == "_Joins" else (8, (11, 12))
    else:
        model, c, size = models.create(name, num_classes=10).eval(), 3, (48, 40)
    net = _network(model)
    for fmt in (torch.contiguous_format, torch.channels_last):
        for batch in (1, 3):
            x = torch.randn(batch, c, *size).contiguous(memory_format=fmt)
            with torch.no_grad():
                ref = net.model(x)
            plan = netmod.bind(net.program, net.model, x, tuple(ref.shape),
                               tuple(ref.stride()))
            sk = netmod.bind(net.program, net.model, x.to("meta"), into=cplan.PlanSketch())
            assert sk.kinds() == plan.kinds() and sk.modules() == plan.modules()
            assert [sk.dims(t) for t in range(len(sk.tensors))] == [
                plan.dims(t) for t in range(len(sk.tensors))]
            assert sk.dims(sk.steps_[-1].output) == tuple(ref.shape)
            assert (plan.kinds()[0] == "reorder") == (fmt == torch.contiguous_format)
            convs = [s for s in sk.steps_ if s.op == "convolution"]
            assert len(convs) == sum(s.kind in ("conv", "bn") for s in net.program.steps)
            assert sum(s.post_ops for s in convs) == sum(
                (s.act is not None) + (s.add_into is not None) + (s.act_after is not None)
                for s in net.program.steps if s.kind in ("conv", "bn"))


@needs_plan
def test_plan_runs_timed_and_marked():
    """A timed run gives every step a positive time and the same output as a plain run;
    steps are marked with their program step's module."""
    net, x, ref = _net_input_reference(6)
    plan = netmod.bind(net.program, net.model, x, tuple(ref.shape), tuple(ref.stride()))
    out = torch.empty_like(ref)
    times = plan.run_timed(x, out, repeats=3)
    assert len(times) == 3 and all(len(t) == plan.steps and min(t) > 0 for t in times)
    assert rel(out, ref) < 1e-5
    named = {s.module for s in net.program.steps if s.module}
    assert set(plan.modules()) - {None} == named
    assert plan.modules()[-1] is None        # the output's reorder
    with pytest.raises(ConvgapError, match="'nhwc'"):
        cplan.PlanSketch("any")


@needs_plan
def test_counts_take_the_network_weights_once():
    """A FusedNetwork holds its weights twice (the folded model and the block-fused copy):
    counts, the analysis and comparisons take them once, as the folded model has them."""
    from convgap.count import count
    torch.manual_seed(2)
    model = models.create("resnet18", num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = convgap.fuse(model, quiet=True)
    assert isinstance(net, FusedNetwork) and net.blocks is not None
    folded = count(net.model, (1, 3, 32, 32))
    got = count(net, (1, 3, 32, 32))
    assert got.params == sum(p.numel() for p in net.model.parameters()) == folded.params
    assert got.weight_bytes == folded.weight_bytes
    assert got.params < sum(p.numel() for p in net.parameters())   # the copy not counted
    assert got.macs == count(model, (1, 3, 32, 32)).macs
    cmp = convgap.compare(model, net, torch.randn(1, 3, 32, 32), quiet=True)
    assert cmp.params == (sum(p.numel() for p in model.parameters()), folded.params)
