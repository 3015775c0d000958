"""swap / AlgoConv2d / auto-tuning: agreement with the original model, gradients, state_dict,
exports, the tuning cache, and every bad argument."""

import io
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from convgap import ConvgapError, allocator, cache, choice, config, models, timing
from convgap.algorithms import (Algorithm, AlgoConv2d, AlgorithmFallbackWarning, ConvSpec,
                                get, names, register, unregister)
from convgap.algorithms import tuner
from convgap.transforms import changes, choices, compare, swap, unswap


def rel(y, ref):
    return ((y - ref).abs().max() / ref.abs().max()).item()


def small_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),                     # depthwise
        nn.Conv2d(8, 16, 1),
        nn.Conv2d(16, 16, 3, stride=2, padding="valid", bias=False),
        nn.Conv2d(16, 16, 4, padding="same", padding_mode="reflect"),  # asymmetric + reflect
        nn.Conv2d(16, 4, 3, padding=2, dilation=2, padding_mode="circular"),
    ).eval()


@pytest.fixture
def plugin():
    """A user plug-in: im2col-like conv via unfold, groups=1 only."""
    @register("test_unfold")
    class Unfold(Algorithm):
        def supports(self, spec):
            return None if spec.groups == 1 else "groups=1 only"

        def run(self, x, state, spec):
            w, b = state
            n, _, h, wd = x.shape
            cols = F.unfold(x, spec.kernel_size, dilation=spec.dilation,
                            padding=spec.padding, stride=spec.stride)
            y = w.flatten(1) @ cols
            if b is not None:
                y = y + b[:, None]
            _, _, oh, ow = spec.output_shape
            return y.view(n, -1, oh, ow)
    yield "test_unfold"
    unregister("test_unfold")


LAYOUTS = {
    "nchw": lambda x: x,
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "sliced": lambda x: torch.cat([x, x], dim=3)[..., ::2],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("algo", ["torch", "channels_last", "prepacked", "test_unfold"])
def test_swapped_equals_original_any_layout(algo, layout, plugin):
    net = small_net()
    x = LAYOUTS[layout](torch.randn(2, 3, 12, 12))
    ref = net(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = swap(net, algo, x)
    with torch.no_grad():
        y = s(x)
    assert rel(y, ref) < 1e-5
    layers = [m for m in s.modules() if isinstance(m, AlgoConv2d)]
    assert len(layers) == 6 and all(m.requested == algo for m in layers)
    if algo == "test_unfold":  # the depthwise layer falls back, with a warning
        fell = [c for c in choices(s) if c.fallback]
        assert [c.name for c in fell] == ["3"] and "groups=1 only" in fell[0].fallback
        assert any(issubclass(w.category, AlgorithmFallbackWarning) for w in caught)


def test_state_dict_unchanged_and_round_trip():
    net = models.create("resnet18", num_classes=10).eval()
    s = swap(net, "channels_last")
    assert list(s.state_dict()) == list(net.state_dict())
    for k, v in net.state_dict().items():
        assert torch.equal(v, s.state_dict()[k])
    fresh = swap(models.create("resnet18", num_classes=10).eval(), "prepacked")
    fresh.load_state_dict(s.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert rel(fresh(x), net(x)) < 1e-5
    back = unswap(fresh)
    assert not any(isinstance(m, AlgoConv2d) for m in back.modules())
    with torch.no_grad():
        assert rel(back(x), net(x)) < 1e-5


def test_weights_change_invalidates_prepared_state():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    s = swap(nn.Sequential(conv), "prepacked")
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        s(x)
        s[0].weight.mul_(2)  # in-place update: the packed weight must be rebuilt
        assert rel(s(x), F.conv2d(x, s[0].weight, s[0].bias, padding=1)) < 1e-5


@pytest.mark.parametrize("algo", ["channels_last", "prepacked", "test_unfold"])
def test_backward_agrees(algo, plugin):
    torch.manual_seed(0)
    net = small_net().double().train()
    s = swap(net, algo)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    net(x).square().sum().backward()
    s(x).square().sum().backward()
    for (n, p), (_, q) in zip(net.named_parameters(), s.named_parameters()):
        assert q.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-8, atol=1e-10), n


@pytest.mark.parametrize("algo", ["channels_last", "prepacked"])
def test_trace_compile_onnx(algo, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    ref = net(x)
    s = swap(net, algo, x)
    with torch.no_grad():
        assert rel(torch.jit.trace(s, x)(x), ref) < 1e-5
        assert rel(torch.compile(s)(x), ref) < 1e-5
    buf = io.BytesIO()
    torch.onnx.export(s, (x,), buf, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    (out,) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})
    assert rel(torch.from_numpy(out), ref) < 1e-5


def test_list_dict_callable_forms():
    net = small_net()
    x = torch.randn(1, 3, 12, 12)
    algos = ["channels_last", "torch", "prepacked", "torch", "channels_last", "prepacked"]
    s = swap(net, algos, x)
    assert [c.algorithm for c in choices(s)] == algos
    s = swap(net, {"0": "prepacked", nn.Conv2d: "channels_last"}, x)
    assert choices(s)[0].algorithm == "channels_last"   # later keys win
    s = swap(net, {"4": "prepacked"}, x)
    assert [c.name for c in choices(s)] == ["4"]        # others left as nn.Conv2d
    seen = []

    def pick(module, shape):
        seen.append(shape)
        return "prepacked" if module.kernel_size == (1, 1) else "torch"
    s = swap(net, pick, x)
    assert seen[0] == (1, 3, 12, 12) and seen[1] == (1, 8, 12, 12)
    assert choices(s)[2].algorithm == "prepacked"
    with torch.no_grad():
        assert rel(s(x), net(x)) < 1e-5


@pytest.mark.parametrize("algos, match", [
    ("winogradd", "unknown algorithm 'winogradd'.*torch"),
    (["torch"] * 5, "list of 5 names but the model has 6 Conv2d"),
    (["torch"] * 5 + [3], r"what\[5\].*expected an algorithm name"),
    ({"nope": "torch"}, "neither a module name"),
    ({"2": "torch"}, "ReLU, not a Conv2d"),
    (lambda m, s: 42, "returned.*expected an algorithm name"),
    (lambda m, s: "fast", "unknown algorithm 'fast'"),
    (3.5, "must be a name, a list"),
])
def test_bad_algos_fail_before_anything_runs(algos, match):
    net = small_net()
    before = [type(m) for m in net.modules()]
    with pytest.raises(ConvgapError, match=match):
        swap(net, algos, torch.randn(1, 3, 12, 12), inplace=True)
    assert [type(m) for m in net.modules()] == before


def test_auto_needs_example_input_and_plugins_register_cleanly(plugin):
    with pytest.raises(ConvgapError, match="example_input"):
        swap(small_net(), "auto")
    with pytest.raises(ConvgapError, match="already registered"):
        register("torch")(type("X", (Algorithm,), {}))
    with pytest.raises(ConvgapError, match="subclass"):
        register("not_an_alg")(int)
    assert "test_unfold" in names() and get("test_unfold").name == "test_unfold"


def fake_tuner(monkeypatch, decide):
    """The conv tuner's decisions come from ``decide(spec_key) -> dict`` (choice, times,
    ...) instead of measurements; other measured choices run as usual."""
    real = choice.choose

    def fake(cands, *, kind, spec_key, **kw):
        if kind != tuner.KIND:
            return real(cands, kind=kind, spec_key=spec_key, **kw)
        return choice.Decision.from_dict(dict(decide(spec_key)), cached=False)
    monkeypatch.setattr(choice, "choose", fake)


class Counter:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = timing.compare

        def counting(fns, *a, **kw):
            self.calls += 1
            return real(fns, *a, **kw)
        monkeypatch.setattr(timing, "compare", counting)


QUICK = timing.TimingConfig(warmup=1, min_repeats=3, max_repeats=3, min_time=0.0)


def test_auto_picks_a_correct_algorithm_and_caches(monkeypatch, plugin):
    monkeypatch.setattr(config, "CHOICE_ROUNDS", QUICK)
    monkeypatch.setattr(config, "CONFIRM_ROUNDS", QUICK)
    monkeypatch.setattr(config, "CHOICE_ROUNDS", QUICK)
    counter = Counter(monkeypatch)
    net = small_net()
    x = torch.randn(2, 3, 12, 12)
    s = swap(net, "auto", x, quiet=True, check=False)
    specs = {c.spec for c in choices(s)}
    confirmed = sum(1 for c in choices(s) if c.tuning["confirm"] is not None)
    # one round-robin per distinct spec, plus a head-to-head confirmation per non-torch win
    assert len(specs) <= counter.calls <= len(specs) + confirmed
    first = counter.calls
    for c in choices(s):
        assert c.requested == "auto" and c.algorithm in c.tuning["times"]
        assert "torch" in c.tuning["times"]
        if c.name == "3":  # the depthwise layer: the groups=1 plug-in is not a candidate
            assert c.tuning["rejected"]["test_unfold"] == "unsupported: groups=1 only"
        else:
            assert "test_unfold" in c.tuning["times"]
    with torch.no_grad():
        assert rel(s(x), net(x)) < 1e-5
    path = cache.cache_dir() / tuner.TUNING_FILE
    entries = json.loads(path.read_text())
    assert len(entries) == len(specs)
    key = next(iter(entries))
    assert f"threads={torch.get_num_threads()}" in key and torch.__version__ in key
    assert "dtype=float32" in key and "layout=" in key
    # a hit re-times nothing, in this process or a new one (memory cleared)
    swap(net, "auto", x, quiet=True, check=False)
    tuner.clear_memory()
    s2 = swap(net, "auto", x, quiet=True, check=False)
    assert counter.calls == first
    assert all(c.tuning["cached"] for c in choices(s2))


@pytest.mark.skipif(not allocator.available(), reason="needs glibc malloc")
def test_auto_tunes_under_the_malloc_policy_and_restores_it(monkeypatch):
    """Tuning measures under the requested policy (restored afterwards); the policy is part
    of the cache key, so a decision made under one does not serve the other."""
    monkeypatch.setattr(config, "CHOICE_ROUNDS", QUICK)
    seen = []
    real = timing.compare

    def spy(*args, **kwargs):
        seen.append(allocator.policy())
        return real(*args, **kwargs)
    monkeypatch.setattr(timing, "compare", spy)
    tuner.clear_memory()
    net, x = nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(1, 3, 8, 8)
    before = allocator.policy()
    for policy in ("retain", "default"):
        s = swap(net, "auto", x, quiet=True, check=False, malloc=policy)
        assert seen and set(seen) == {policy}
        seen.clear()
        assert allocator.policy() == before
        (c,) = choices(s)
        assert c.tuning["malloc"] == policy and not c.tuning["cached"]
    keys = list(json.loads((cache.cache_dir() / tuner.TUNING_FILE).read_text()))
    assert sorted(k.split("|")[3] for k in keys) == ["malloc=default", "malloc=retain"]
    with pytest.raises(ConvgapError, match="unknown malloc policy"):
        swap(net, "auto", x, quiet=True, malloc="huge")


def test_auto_rejects_wrong_results(monkeypatch):
    monkeypatch.setattr(config, "CHOICE_ROUNDS", QUICK)

    @register("test_wrong")
    class Wrong(Algorithm):
        def run(self, x, state, spec):   # fast and wrong: must never be chosen
            n, o, oh, ow = spec.output_shape
            return torch.zeros(n, o, oh, ow)
    try:
        s = swap(nn.Sequential(nn.Conv2d(3, 4, 3)), "auto", torch.randn(1, 3, 8, 8),
                 candidates=["test_wrong"], quiet=True)
        (c,) = choices(s)
        # torch, or eager channels_last where the model-level check measures it faster
        assert c.algorithm in ("torch", "channels_last")
        assert "relative error" in c.tuning["rejected"]["test_wrong"]
    finally:
        unregister("test_wrong")


def test_tolerance_widens_to_the_references_own_rounding(monkeypatch):
    alg = get("torch")
    spec = dict(in_channels=3, out_channels=4, kernel_size=(3, 3), stride=(1, 1),
                padding=(0, 0), dilation=(1, 1), groups=1, bias=False,
                input_shape=(1, 3, 8, 8))
    assert tuner.tolerance(alg, ConvSpec(**spec)) == alg.tolerance
    assert tuner.tolerance(alg, ConvSpec(**spec, dtype="float16")) == 2e-3
    assert tuner.tolerance(alg, ConvSpec(**spec, dtype="bfloat16")) == 1.6e-2
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert tuner.tolerance(alg, ConvSpec(**spec, device="cuda")) == 2e-3
    assert tuner.tolerance(alg, ConvSpec(**spec, device="cpu")) == alg.tolerance
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert tuner.tolerance(alg, ConvSpec(**spec, device="cuda")) == alg.tolerance


@pytest.mark.parametrize("dtype,accepted", [(torch.float32, False), (torch.bfloat16, True)])
def test_auto_accepts_reduced_precision_rounding_only_in_reduced_precision(
        monkeypatch, dtype, accepted):
    monkeypatch.setattr(config, "CHOICE_ROUNDS", QUICK)
    tuner.clear_memory()

    @register("test_off_by_4e3")
    class Off(Algorithm):
        def run(self, x, state, spec):  # within bf16's rounding, far outside fp32's
            weight, bias = state
            return F.conv2d(x, weight, bias) * (1 + 4e-3)
    try:
        net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False)).to(dtype)
        s = swap(net, "auto", torch.randn(1, 3, 8, 8, dtype=dtype),
                 candidates=["test_off_by_4e3"], quiet=True)
        (c,) = choices(s)
        assert ("test_off_by_4e3" in c.tuning["errors"])
        assert ("test_off_by_4e3" in c.tuning["rejected"]) is not accepted
    finally:
        unregister("test_off_by_4e3")


def test_corrupt_tuning_cache_is_reported_and_rebuilt(monkeypatch):
    monkeypatch.setattr(config, "CHOICE_ROUNDS", QUICK)
    tuner.clear_memory()
    path = cache.cache_dir() / tuner.TUNING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{truncated")
    with pytest.warns(cache.CacheWarning, match="corrupt"):
        swap(nn.Sequential(nn.Conv2d(3, 4, 3)), "auto", torch.randn(1, 3, 8, 8), quiet=True)
    assert len(json.loads(path.read_text())) == 1
    assert not list(path.parent.glob(".tuning.json.*"))  # no temporary files left behind


def test_compare_a_tuned_model_reports_layers_and_model(monkeypatch):
    for budget in ("CHOICE_ROUNDS", "CONFIRM_ROUNDS", "MODEL_CHECK", "LAYER_COMPARE",
                   "MODEL_COMPARE"):
        monkeypatch.setattr(config, budget, QUICK)
    net = models.create("resnet18", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    tuned = swap(net, "auto", x, candidates=["channels_last", "prepacked"], quiet=True)
    made = changes(tuned)
    assert len(made) == 21  # 20 convs and the classifier's Linear
    assert made[-1].name == "fc" and made[-1].tuning["spec"].startswith("linear")
    assert all(c.transform == "swap" and c.runs in c.tuning["times"] for c in made)
    result = compare(net, tuned, x, threads=1, quiet=True)
    assert [r.name for r in result.layers] == [c.name for c in made]
    assert all(r.runs == c.runs and r.params[0] == r.params[1] and r.macs[0] == r.macs[1]
               for r, c in zip(result.layers, made))
    assert result.layers[-1].macs == (10 * 512, 10 * 512)
    assert min(result.model_s) > 0 and all(min(r.seconds) > 0 for r in result.layers)
    d = result.to_dict()
    assert len(d["layers"]) == 21 and d["speedup"] == pytest.approx(result.speedup)
    assert [c["name"] for c in d["changes"]] == [c.name for c in made]


def test_model_level_check_reverts_a_slower_tuned_model(monkeypatch):
    """A layer-level 'winner' that makes the whole model slower is reverted to torch."""
    import time as _time
    import importlib
    swap_module = importlib.import_module("convgap.transforms.swap")

    @register("test_slow")
    class Slow(Algorithm):
        def run(self, x, state, spec):
            _time.sleep(0.002)
            w, b = state
            return F.conv2d(x, w, b, spec.stride, spec.padding, spec.dilation, spec.groups)
    fake = {"choice": "test_slow", "times": {"torch": 1.0, "test_slow": 0.5}, "errors": {},
            "rejected": {}, "confirm": None}
    fake_tuner(monkeypatch, lambda spec_key: fake)
    # the whole model: tuned slower than torch everywhere, and eager channels_last too
    calls = _fake_compare(monkeypatch, {"tuned": 2.0, "eager_cl": 1.1})
    try:
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)).eval()
        x = torch.randn(1, 3, 10, 10)
        s = swap(net, "auto", x, quiet=True, check=False)
        assert [c.algorithm for c in choices(s)] == ["test_slow", "test_slow"]
        with pytest.warns(AlgorithmFallbackWarning, match="model-level check"):
            s = swap(net, "auto", x, quiet=True)
        assert all(c.algorithm == "torch" and "model-level" in c.fallback for c in choices(s))
        assert calls == [["tuned", "torch", "eager_cl"]]
    finally:
        unregister("test_slow")


def _fake_compare(monkeypatch, speeds):
    """Make the model-level check read ``speeds[name]`` seconds for its callables ('tuned',
    'torch', 'variant', 'eager_cl'; 1.0 where not given); record which it timed."""
    import importlib
    swap_module = importlib.import_module("convgap.transforms.swap")
    calls = []
    real = timing.compare

    def compare(fns, cfg=None, device="cpu"):
        if cfg is not config.MODEL_CHECK:  # the tuner's per-layer timing
            return real(fns, cfg, device)
        calls.append([f.__name__ for f in fns])
        for f in fns:
            f()  # the models still run (they must work), only the clock is fake
        return [timing.Timing((speeds.get(f.__name__, 1.0),) * 5, 1) for f in fns]
    monkeypatch.setattr(swap_module.timing, "compare", compare)
    return calls


ALL = ["tuned", "torch", "variant", "eager_cl"]


def test_layout_variant_adopted_when_the_whole_model_is_faster(monkeypatch):
    """If the model with its first conv on channels_last (and every layer after it tuned
    for that layout) times fastest, its choices are taken: first conv channels_last, the
    others tuned on channels_last inputs, results unchanged."""
    calls = _fake_compare(monkeypatch, {"variant": 0.5})
    fake = {"choice": "torch", "times": {"torch": 1.0, "channels_last": 1.0}, "errors": {},
            "rejected": {}, "confirm": None}
    fake_tuner(monkeypatch, lambda spec_key: fake)
    net = small_net()
    x = torch.randn(2, 3, 12, 12)
    s = swap(net, "auto", x, quiet=True, candidates=["channels_last", "prepacked"])
    assert calls == [ALL]
    made = choices(s)
    assert made[0].algorithm == "channels_last"
    assert "layout variant" in made[0].tuning["variant"]
    assert all(c.tuning["layout"] == "channels_last" for c in made[1:])
    with torch.no_grad():
        assert rel(s(x), net(x)) < 1e-5


def test_layout_variant_switches_where_channels_last_costs_nothing(monkeypatch):
    """The variant's switch to channels_last skips convs measured slower in that layout
    (a 3-channel stem): it happens at the first conv where it costs nothing."""
    calls = _fake_compare(monkeypatch, {"variant": 0.5})

    def fake(spec_key):
        cl = 1.5 if spec_key.startswith("in_channels=3|") else 1.0  # the stem: slower in CL
        return {"choice": "torch", "times": {"torch": 1.0, "channels_last": cl},
                "errors": {}, "rejected": {}, "confirm": None}
    fake_tuner(monkeypatch, fake)
    net = small_net()
    x = torch.randn(2, 3, 12, 12)
    s = swap(net, "auto", x, quiet=True)
    assert calls == [ALL]
    made = choices(s)
    assert made[0].algorithm == "torch" and made[0].tuning["layout"] == "nchw"
    assert made[1].algorithm == "channels_last" and "variant" in made[1].tuning
    assert all(c.tuning["layout"] == "channels_last" for c in made[2:])
    with torch.no_grad():
        assert rel(s(x), net(x)) < 1e-5


@pytest.mark.parametrize("ratios, head", [
    ([1.2, 0.9], 1),              # the first nominee loses head to head: the next one
    ([1.2, 1.1, 1.05], None),     # three nominees lose: no variant at all
])
def test_layout_variant_head_is_confirmed_head_to_head(monkeypatch, ratios, head):
    """Nominated by the tuner's medians, a head must also be no slower than torch in a
    paired comparison of that layer alone (channels_last probe first, plain conv second)."""
    import importlib
    swap_module = importlib.import_module("convgap.transforms.swap")
    verify_calls = _fake_compare(monkeypatch, {"variant": 0.5})
    faked = swap_module.timing.compare
    seen = []

    def compare(fns, cfg=None, device="cpu"):
        if cfg is not config.CONFIRM_ROUNDS:
            return faked(fns, cfg, device)
        r = ratios[len(seen)]
        seen.append(r)
        for f in fns:
            f()
        return [timing.Timing((r,) * 5, 1), timing.Timing((1.0,) * 5, 1)]
    monkeypatch.setattr(swap_module.timing, "compare", compare)
    fake = {"choice": "torch", "times": {"torch": 1.0, "channels_last": 1.0}, "errors": {},
            "rejected": {}, "confirm": None}
    fake_tuner(monkeypatch, lambda spec_key: fake)
    net, x = small_net(), torch.randn(2, 3, 12, 12)
    s = swap(net, "auto", x, quiet=True)
    made = choices(s)
    assert seen == ratios[:len(seen)] and len(seen) == len(ratios)
    if head is None:
        assert verify_calls == [["tuned", "torch", "eager_cl"]]  # no variant: all torch
        assert not any(c.tuning.get("variant") for c in made)
    else:
        assert verify_calls == [ALL]
        assert made[head].algorithm == "channels_last" and "variant" in made[head].tuning
        assert made[head].tuning["variant_head_ratio"] == pytest.approx(0.9)
        assert all(c.algorithm == "torch" for c in made[:head])
    with torch.no_grad():
        assert rel(s(x), net(x)) < 1e-5


@pytest.mark.parametrize("speeds, expect", [
    ({"tuned": 0.5, "variant": 0.8, "eager_cl": 0.9}, "per_layer"),  # tuned wins: kept
    ({"tuned": 1.2, "variant": 1.1, "eager_cl": 1.05}, "torch"),     # nothing beats torch
    ({"tuned": 0.9, "variant": 0.8, "eager_cl": 0.7}, "eager_cl"),   # eager channels_last
    # plain PyTorch is the incumbent: a tuned model within config.MARGIN of it is not taken
    ({"tuned": 0.69, "variant": 0.8, "eager_cl": 0.7}, "eager_cl"),
    ({"tuned": 0.99, "variant": 1.1, "eager_cl": 1.05}, "torch"),
])
def test_layout_variant_loses(monkeypatch, speeds, expect):
    calls = _fake_compare(monkeypatch, speeds)
    fake = {"choice": "channels_last", "times": {"torch": 1.0, "channels_last": 0.5},
            "errors": {}, "rejected": {}, "confirm": None}
    fake_tuner(monkeypatch, lambda spec_key: fake)  # never all torch
    net = small_net()
    x = torch.randn(2, 3, 12, 12)
    s_plain = swap(net, "auto", x, quiet=True, check=False)  # the per-layer choices
    if expect == "torch":
        with pytest.warns(AlgorithmFallbackWarning, match=r"variant \S+ ms \(1.100\)"):
            s = swap(net, "auto", x, quiet=True)
    else:
        s = swap(net, "auto", x, quiet=True)
    assert calls == [ALL]
    made = choices(s)
    if expect == "eager_cl":  # the first conv switches to channels_last, the rest torch
        assert made[0].algorithm == "channels_last" and "eager channels_last" in \
            made[0].tuning["variant"]
        assert all(c.algorithm == "torch" for c in made[1:])
        # as measured: the 4-D weights in channels_last, the user's model untouched
        convs = [m for m in s.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last)
                             and not m.weight.is_contiguous() for m in convs
                             if m.weight.shape[1] > 1 and m.weight[0, 0].numel() > 1)
        assert all(m.weight.is_contiguous() for m in net.modules() if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            assert rel(s(x), net(x)) < 1e-5
        return
    assert not any((c.tuning or {}).get("variant") for c in made)
    if expect == "torch":
        assert all(c.algorithm == "torch" for c in made)
    else:
        assert [c.algorithm for c in made] == [c.algorithm for c in choices(s_plain)]


@pytest.mark.parametrize("case", ["channels_last_input", "no_check", "candidates"])
def test_layout_variant_only_for_nchw_input_with_check(monkeypatch, case):
    calls = _fake_compare(monkeypatch, {"tuned": 0.5, "variant": 0.1})
    net = small_net()
    x = torch.randn(2, 3, 12, 12)
    kw = {"quiet": True}
    if case == "channels_last_input":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "no_check":
        kw["check"] = False
    else:
        kw["candidates"] = ["prepacked"]
    s = swap(net, "auto", x, **kw)
    assert all("variant" not in names for names in calls)  # never the variant
    # eager channels_last is compared with a plain NCHW input whenever the check runs
    assert calls == {"channels_last_input": [["tuned", "torch"]], "no_check": [],
                     "candidates": [["tuned", "torch", "eager_cl"]]}[case]
    assert not any((c.tuning or {}).get("variant") for c in choices(s))
