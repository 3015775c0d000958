"""transforms.trace: leaves by the one policy, and the largest traceable submodules."""

import torch
import torch.nn as nn

from convgap.algorithms import AlgoConv2d
from convgap.transforms.trace import is_leaf, roots, trace


class Branchy(nn.Module):
    """Control flow on a value: not symbolically traceable."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y) if y.sum() > 0 else y


def test_leaves():
    assert is_leaf(nn.Conv2d(3, 4, 1)) and is_leaf(nn.ReLU())
    assert is_leaf(AlgoConv2d(nn.Conv2d(3, 4, 1)))
    assert not is_leaf(nn.Sequential(nn.ReLU())) and not is_leaf(Branchy())


def test_trace_keeps_leaves_and_functions():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = AlgoConv2d(nn.Conv2d(4, 4, 3, padding=1))

        def forward(self, x):
            return torch.relu(x + self.conv(x))

    gm = trace(Res())
    ops = [(n.op, str(n.target)) for n in gm.graph.nodes]
    assert ("call_module", "conv") in ops  # a leaf, not traced into
    assert any(op == "call_function" and "add" in t for op, t in ops)
    assert any("relu" in t for op, t in ops)
    x = torch.randn(1, 4, 5, 5)
    ref = Res()
    gm = trace(ref)
    torch.testing.assert_close(gm(x), ref(x))
    assert trace(Branchy()) is None


def test_roots_descend_where_the_whole_does_not_trace():
    net = nn.Sequential(nn.Conv2d(3, 3, 1), Branchy())
    found = [(n, type(m).__name__) for n, m, _ in roots(net)]
    # the whole fails (Branchy), so its children: the conv is a leaf (not yielded), Branchy
    # does not trace, so its traceable children (the Sequential 'a'; 'b' is a leaf)
    assert found == [("1.a", "Sequential")]
    x = torch.randn(1, 3, 6, 6)
    name, module, gm = next(iter(roots(net)))
    torch.testing.assert_close(gm(net[0](x)), module(net[0](x)))
