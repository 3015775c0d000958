"""The one transform shape: the layer selector, swap's and factorize's signatures, changes()
read from the modules (never stale), and compare() on any transformed model."""

import inspect

import pytest
import torch
import torch.nn as nn

import convgap
from convgap import ConvgapError, config, timing
from convgap.algorithms import AlgoConv2d
from convgap.layers import TensorialConv2d
from convgap.transforms import changes, choices, compare, factorize, select, swap

QUICK = timing.TimingConfig(warmup=1, min_repeats=3, max_repeats=3, min_time=0.0)


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    for budget in ("CHOICE_ROUNDS", "CONFIRM_ROUNDS", "MODEL_CHECK", "LAYER_COMPARE",
                   "MODEL_COMPARE"):
        monkeypatch.setattr(config, budget, QUICK)
    yield
    torch.set_num_threads(old)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def rel(y, ref):
    return ((y - ref).abs().max() / ref.abs().max()).item()


X = torch.randn(2, 3, 12, 12)
CONV = lambda m: isinstance(m, nn.Conv2d)  # noqa: E731
ALL = lambda n, m: True  # noqa: E731


# -- the selector ---------------------------------------------------------------------------
@pytest.mark.parametrize("layers, expect", [
    (None, ["0", "2.0", "2.1", "3"]),
    ("2.1", ["2.1"]),
    (["3", "0"], ["3", "0"]),                       # names in the order given
    (nn.Conv2d, ["0", "2.0", "2.1", "3"]),
    ((nn.Linear, nn.Conv2d), ["0", "2.0", "2.1", "3"]),  # only what the transform accepts
    (lambda n, m: m.kernel_size == (3, 3), ["0", "2.1", "3"]),
    (lambda n, m: n.startswith("2."), ["2.0", "2.1"]),
])
def test_selector_kinds(layers, expect):
    assert select(net(), layers, CONV, ALL, "Conv2d") == expect


def test_selector_default_and_errors():
    assert select(net(), None, CONV, lambda n, m: m.groups == 1, "Conv2d") == ["0", "2.0", "2.1"]
    with pytest.raises(ConvgapError, match=r"no module '2\.2'; closest: 2\.1, 2\.0"):
        select(net(), ["0", "2.2"], CONV, ALL, "Conv2d")
    with pytest.raises(ConvgapError, match="'1' is a ReLU, not a Conv2d"):
        select(net(), "1", CONV, ALL, "Conv2d")
    with pytest.raises(ConvgapError, match="expected module names"):
        select(net(), [0], CONV, ALL, "Conv2d")


def test_swap_and_factorize_take_the_one_selector():
    s = swap(net(), "channels_last", X, layers=lambda n, m: n.startswith("2."))
    assert [c.name for c in changes(s)] == ["2.0", "2.1"]
    assert type(s[0]) is nn.Conv2d and type(s[3]) is nn.Conv2d
    s = swap(net(), "torch", X, layers=["6"], linear="torch")  # a Linear, by name
    assert [(c.name, c.runs) for c in changes(s)] == [("6", "torch")]
    with pytest.raises(ConvgapError, match="'6' is a Linear, not a Conv2d"):
        swap(net(), "torch", X, layers=["6"])  # linear='keep' by default
    with pytest.raises(ConvgapError, match="no module 'conv1'"):
        swap(net(), "torch", X, layers="conv1")
    f = factorize(net(), "tucker", X, layers="2.1", rank=4, keep="all", quiet=True)
    assert [c.name for c in changes(f)] == ["2.1"]


def test_signatures_share_the_transform_shape():
    shared = ["model", "what", "example_input", "layers", "inplace", "check", "quiet"]
    for fn in (swap, factorize):
        params = inspect.signature(fn).parameters
        assert list(params)[:len(shared)] == shared, fn.__name__
        assert [params[p].default for p in shared[2:]] == [None, None, False, True, False]
        assert all(params[p].kind is inspect.Parameter.KEYWORD_ONLY for p in shared[3:])
    assert convgap.changes is changes and convgap.compare is compare


# -- check= ---------------------------------------------------------------------------------
def test_swap_check_false_applies_a_wrong_request_unchecked():
    """A request that disagrees with the original runs torch under the check; unchecked,
    the user gets what they asked for."""
    from convgap.algorithms import Algorithm, register, unregister

    @register("test_wrong")
    class Wrong(Algorithm):
        def run(self, x, state, spec):
            w, b = state
            return 2 * torch.nn.functional.conv2d(x, w, b, spec.stride, spec.padding,
                                                  spec.dilation, spec.groups)
    try:
        with pytest.warns(UserWarning, match="differs by"):
            checked = swap(net(), {"0": "test_wrong"}, X)
        assert checked[0].algorithm == "torch"
        unchecked = swap(net(), {"0": "test_wrong"}, X, check=False)
        assert unchecked[0].algorithm == "test_wrong"
    finally:
        unregister("test_wrong")


def test_factorize_check_measures_only_when_asked():
    checked = factorize(net(), "cp", X, rank=2, keep="all", quiet=True)
    unchecked = factorize(net(), "cp", X, rank=2, keep="all", quiet=True, check=False)
    errors = {c.name: c.error for c in changes(checked)}
    assert set(errors) == {"0", "2.1"} and all(0 < e < 2 for e in errors.values())
    y, ref = checked[0](X), net()[0](X)
    assert errors["0"] == pytest.approx(rel(y, ref), rel=1e-4)
    assert all(c.error is None for c in changes(unchecked))


# -- changes() ------------------------------------------------------------------------------
def test_changes_after_swap_factorize_both_and_a_later_edit():
    base = net()
    s = swap(base, {"0": "channels_last", "3": "im2col"}, X)
    assert [(c.name, c.transform, c.runs, c.requested) for c in changes(s)] == [
        ("0", "swap", "channels_last", "channels_last"), ("3", "swap", "im2col", "im2col")]
    assert all(c.params == c.dense_params for c in changes(s))

    f = factorize(base, "tucker", X, rank=4, keep="all", quiet=True)
    (c0, c1) = changes(f)
    assert (c0.name, c0.transform, c0.runs) == ("0", "factorize", "tucker")
    assert c0.ranks == tuple(f[0].ranks) and c0.error is not None
    assert c0.params == f[0].weight_params and c0.dense_params == 8 * 3 * 9
    assert c1.name == "2.1" and c1.compression == pytest.approx(8 * 8 * 9 / c1.params)

    both = swap(f, {"3": "im2col"}, X)
    assert [(c.name, c.transform) for c in changes(both)] == [
        ("0", "factorize"), ("2.1", "factorize"), ("3", "swap")]
    # later edits: one layer put back, another replaced by hand: the list follows
    both[0] = base[0]
    both[3] = base[3]
    both.get_submodule("2")[1] = nn.Conv2d(8, 8, 3, padding=1)
    assert changes(both) == []
    both[3] = AlgoConv2d(base[3], "torch")
    assert [(c.name, c.transform, c.runs) for c in changes(both)] == [("3", "swap", "torch")]


def test_changes_lists_layers_left_as_they_are():
    class Scaled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), Scaled(8, 8, 3))
    (left,) = changes(m)  # nothing transformed yet: the layer no transform may rebuild
    assert left.name == "1" and left.transform == "left" and "overrides" in left.reason


def test_a_layer_factorize_kept_dense_is_listed_until_replaced(monkeypatch):
    monkeypatch.setattr(timing, "paired_ratio", lambda a, b: 1.5)  # every layer "slower"
    f = factorize(net(), "cp", X, rank=2, quiet=True)
    left = {c.name: c.reason for c in changes(f)}
    assert set(left) == {"0", "2.1"} and all("1.50x its time" in r for r in left.values())
    assert all(type(m) is not TensorialConv2d for m in f.modules())
    s = swap(f, "torch", X, layers=["0"])  # a later transform replaces one of them
    assert [(c.name, c.transform) for c in changes(s)] == [("0", "swap"), ("2.1", "left")]


# -- compare() ------------------------------------------------------------------------------
def test_compare_a_swapped_model():
    base = net()
    s = swap(base, {"2.1": "im2col", "3": "channels_last"}, X)
    res = compare(base, s, X, quiet=True)
    assert [(r.name, r.transform, r.runs) for r in res.layers] == [
        ("2.1", "swap", "im2col"), ("3", "swap", "channels_last")]
    r = res.layers[0]
    assert r.macs == (2 * 8 * 12 * 12 * 8 * 9,) * 2 and r.params == (8 * 8 * 9,) * 2
    assert min(r.seconds) > 0 and min(res.model_s) > 0 and res.threads >= 1
    assert res.params[0] == res.params[1] == sum(p.numel() for p in base.parameters())
    d = res.to_dict()
    assert [x["name"] for x in d["layers"]] == ["2.1", "3"] and d["layout"] == "nchw"
    assert "whole model: original" in res.summary() and "swap im2col x1" in res.summary()
    assert base.training is False and s.training is False


def test_compare_a_factorized_and_swapped_model(tmp_path):
    import json
    base = net().train()
    f = factorize(base, "cp", X, rank=3, keep="all", quiet=True)
    both = swap(f, {"3": "im2col"}, X)
    res = compare(base, both, X, quiet=True)
    assert [(r.name, r.transform) for r in res.layers] == [
        ("0", "factorize"), ("2.1", "factorize"), ("3", "swap")]
    first = res.layers[0]
    assert first.macs == (2 * 8 * 12 * 12 * 3 * 9, both[0].macs((2, 3, 12, 12)))
    assert first.params == (8 * 3 * 9, both[0].weight_params)
    assert res.params[1] < res.params[0]
    assert base.training and both.training  # modes restored
    data = json.loads(res.to_json(tmp_path / "c.json").read_text())
    assert [c["transform"] for c in data["changes"]] == ["factorize", "factorize", "swap"]
    assert data["layers"][0]["macs"] == list(first.macs)
    # a transformed model compared with itself has nothing replaced
    assert compare(both, both, X, quiet=True).layers == []
    with pytest.raises(ConvgapError, match="malloc"):
        compare(base, both, X, quiet=True, malloc="jemalloc")


def test_choices_still_lists_swapped_layers():
    s = swap(net(), "torch", X)
    assert [c.name for c in choices(s)] == ["0", "2.0", "2.1", "3"]
