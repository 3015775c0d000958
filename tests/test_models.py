"""Tests for the model zoo (convgap.models): counts, shapes, registry, user specs, weights."""

from __future__ import annotations

import random
import sys
import textwrap
from functools import lru_cache

import pytest
import torch
import torch.nn as nn

from convgap import models
from convgap.errors import ConvgapError

PUBLISHED_PARAMS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "mobilenet_v2": 3_504_872,
    "efficientnet_b0": 5_288_548,
    "convnext_tiny": 28_589_128,
}

BLOCKS = {
    "resnet18": ("basic", 8),
    "resnet26": ("bottleneck", 8),
    "resnet50": ("bottleneck", 16),
    "resnet101": ("bottleneck", 33),
    "mobilenet_v2": ("inverted_residual", 17),
    "efficientnet_b0": ("mbconv", 16),
    "convnext_tiny": ("convnext", 18),
    "convfirst": ("convfirst", 18),
}

ALL = sorted(BLOCKS)


@lru_cache(maxsize=None)
def _model(name: str, num_classes: int = 1000) -> nn.Module:
    torch.manual_seed(0)
    return models.create(name, num_classes=num_classes)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _convfirst_params_by_hand(num_classes: int = 1000) -> int:
    """ConvFirst parameter count from the architecture formula (not from the code)."""
    widths, depths, gw = (96, 192, 384, 768), (3, 3, 9, 3), 8
    bn = lambda c: 2 * c  # noqa: E731  (gamma, beta)
    total = 3 * widths[0] * 4 * 4 + bn(widths[0])  # stem: 4x4/4 conv, no bias + BN
    for i, (c, d) in enumerate(zip(widths, depths)):
        grouped = c * gw * 3 * 3  # each output channel sees gw input channels through 3x3
        expand = c * 4 * c
        project = 4 * c * c
        block = grouped + bn(c) + expand + bn(4 * c) + project + bn(c)
        total += d * block
        if i + 1 < len(widths):  # BN + 2x2/2 conv, no bias
            total += bn(c) + c * widths[i + 1] * 2 * 2
    total += bn(widths[-1]) + widths[-1] * num_classes + num_classes  # head norm + linear
    return total


# ---------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_published(name):
    assert _n_params(_model(name)) == PUBLISHED_PARAMS[name]


def test_convfirst_parameter_count_matches_formula():
    assert _convfirst_params_by_hand() == 28_759_912  # sanity of the formula itself
    assert _n_params(_model("convfirst")) == _convfirst_params_by_hand()
    assert _n_params(models.create("convfirst", num_classes=10)) == _convfirst_params_by_hand(10)


def test_convfirst_docstring_cites_paper():
    from convgap.models import convfirst

    assert "2404.03617" in convfirst.__doc__
    assert "Lavin" in convfirst.__doc__


@pytest.mark.parametrize("name", ALL)
def test_forward_shape_eval(name):
    model = _model(name, 10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        y2 = model(x)
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()
    assert torch.equal(y, y2)  # dropout / stochastic depth are off in eval mode


@pytest.mark.parametrize("name", ALL)
def test_forward_train_mode_small_input_and_backward(name):
    model = _model(name, 10)
    model.train()
    try:
        y = model(torch.randn(2, 3, 32, 32))
        assert y.shape == (2, 10)
        y.sum().backward()
        assert any(p.grad is not None for p in model.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


@pytest.mark.parametrize("name", ALL)
def test_block_kind_and_block_count(name):
    kind, count = BLOCKS[name]
    model = _model(name)
    blocks = [m for m in model.modules() if hasattr(type(m), "block_kind")]
    assert len(blocks) == count
    assert {type(m).block_kind for m in blocks} == {kind}
    assert kind in models.BLOCK_KINDS


@pytest.mark.parametrize("name", ALL)
def test_blocks_are_single_tensor_modules_with_leaf_compute(name):
    model = _model(name, 10).eval()
    seen = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp, out)))
        for m in model.modules()
        if hasattr(type(m), "block_kind")
    ]
    leaf_types = set()
    leaf_hooks = [
        m.register_forward_hook(lambda mod, inp, out: leaf_types.add(type(mod)))
        for m in model.modules()
        if not list(m.children())
    ]
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
    finally:
        for h in hooks + leaf_hooks:
            h.remove()
    assert len(seen) == BLOCKS[name][1]
    for _, inp, out in seen:
        assert len(inp) == 1 and isinstance(inp[0], torch.Tensor)
        assert isinstance(out, torch.Tensor)
    # every parameter lives in a leaf module that actually ran (so hooks see all compute),
    # apart from ConvNeXt's layer-scale vector, which is applied as glue inside its block
    ran = {id(m) for m in model.modules() if type(m) in leaf_types}
    for mod_name, mod in model.named_modules():
        own = [n for n, _ in mod.named_parameters(recurse=False)]
        if own and list(mod.children()):
            assert own == ["layer_scale"], mod_name
        elif own:
            assert id(mod) in ran, mod_name
    assert nn.Conv2d in leaf_types and nn.Linear in leaf_types


# ---------------------------------------------------------------------------- registry


def test_names_exactly_the_zoo():
    assert models.names() == ALL


def test_unknown_name_lists_close_match():
    with pytest.raises(ConvgapError) as e:
        models.create("resnet5")
    assert "resnet50" in str(e.value)
    assert "mobilenet_v2" in str(e.value)  # the full list is shown too


def test_bad_num_classes_and_kwargs():
    with pytest.raises(ConvgapError, match="num_classes"):
        models.create("resnet18", num_classes=0)
    with pytest.raises(ConvgapError, match="width"):
        models.create("resnet18", width=2)


def test_register_decorator(monkeypatch):
    from convgap.models import _registry

    monkeypatch.setattr(_registry, "_FACTORIES", dict(_registry._FACTORIES))

    @models.register("tiny_test_net")
    def tiny(num_classes=1000):
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    assert "tiny_test_net" in models.names()
    assert isinstance(models.create("tiny_test_net", num_classes=3), nn.Sequential)
    with pytest.raises(ConvgapError, match="already registered"):
        models.register("tiny_test_net")(lambda num_classes=1000: nn.Identity())


# ---------------------------------------------------------------------------- load(spec)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "convgap_user_nets.py").write_text(
        textwrap.dedent(
            """
            import torch.nn as nn

            def factory():
                return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

            class Builders:
                @staticmethod
                def build():
                    return nn.Linear(2, 2)

            instance = nn.Linear(3, 3)

            def not_a_model():
                return 42

            def needs_args(depth):
                return nn.Identity()

            def with_classes(num_classes=1000):
                return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(4, num_classes))

            NUMBER = 7
            """
        )
    )
    (tmp_path / "convgap_broken_nets.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "convgap_user_nets"
    for mod in ("convgap_user_nets", "convgap_broken_nets"):
        sys.modules.pop(mod, None)


def test_load_zoo_name():
    model = models.load("resnet18", num_classes=7)
    assert model.fc.out_features == 7


def test_load_user_spec(user_module):
    model = models.load(f"{user_module}:factory")
    assert isinstance(model, nn.Sequential)
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 4)
    assert isinstance(models.load(f"{user_module}:Builders.build"), nn.Linear)
    assert isinstance(models.load(f"{user_module}:instance"), nn.Linear)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("convgap_no_such_module_xyz:factory", "cannot import"),
        ("convgap_user_nets:missing", "no attribute"),
        ("convgap_user_nets:not_a_model", "not a torch.nn.Module"),
        ("convgap_user_nets:needs_args", "no arguments"),
        ("convgap_user_nets:NUMBER", "not a callable"),
        ("convgap_broken_nets:factory", "boom"),
        ("convgap_user_nets:", "package.module:factory"),
        ("", "package.module:factory"),
        ("not_a_zoo_model", "Available models"),
    ],
)
def test_load_bad_specs(user_module, spec, fragment):
    with pytest.raises(ConvgapError) as e:
        models.load(spec)
    assert fragment in str(e.value)


def test_num_classes_reaches_a_factory_that_takes_it_and_is_never_ignored(user_module):
    assert models.load(f"{user_module}:with_classes", num_classes=7)[-1].out_features == 7
    assert models.load(f"{user_module}:with_classes")[-1].out_features == 1000
    for spec in ("factory", "instance"):
        with pytest.raises(ConvgapError, match="cannot be applied"):
            models.load(f"{user_module}:{spec}", num_classes=7)


# ---------------------------------------------------------------------------- load_weights


def _small():
    torch.manual_seed(1)
    return models.create("resnet18", num_classes=10)


def test_load_weights_round_trip(tmp_path):
    src = _small()
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    dst = models.create("resnet18", num_classes=10)
    assert models.load_weights(dst, path) is dst
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module_prefix"])
def test_load_weights_wrappers(tmp_path, wrap):
    src = _small()
    sd = src.state_dict()
    if wrap == "module_prefix":
        obj = {f"module.{k}": v for k, v in sd.items()}
    else:
        obj = {wrap: sd, "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    dst = models.load_weights(models.create("resnet18", num_classes=10), str(path))
    assert torch.equal(dst.fc.weight, src.fc.weight)


def test_load_weights_corrupt_file(tmp_path):
    path = tmp_path / "junk.pt"
    rng = random.Random(0)
    path.write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    with pytest.raises(ConvgapError, match="cannot read weights"):
        models.load_weights(_small(), path)


def test_load_weights_missing_file(tmp_path):
    with pytest.raises(ConvgapError, match="does not exist"):
        models.load_weights(_small(), tmp_path / "nope.pt")


def test_load_weights_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ConvgapError, match="state_dict"):
        models.load_weights(_small(), path)


def test_load_weights_shape_mismatch_names_key(tmp_path):
    path = tmp_path / "w5.pt"
    torch.save(models.create("resnet18", num_classes=5).state_dict(), path)
    with pytest.raises(ConvgapError) as e:
        models.load_weights(_small(), path)
    assert "fc.weight" in str(e.value) and "shape mismatch" in str(e.value)


def test_load_weights_other_architecture_names_keys(tmp_path):
    path = tmp_path / "mbv2.pt"
    torch.save(models.create("mobilenet_v2", num_classes=10).state_dict(), path)
    with pytest.raises(ConvgapError) as e:
        models.load_weights(_small(), path)
    msg = str(e.value)
    assert "missing key" in msg and "unexpected key" in msg
    assert "conv1.weight" in msg  # a named key
    assert "more" in msg  # at most five keys are listed, with a count of the rest
