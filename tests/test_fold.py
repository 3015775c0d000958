"""fold_batchnorm: BatchNorm folded into the conv / linear before it, found by what the model
computes (fx traces), exact against the original with randomized statistics, checked when
applied, and readable afterwards through changes()."""

import re
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

import convgap
from convgap import ConvgapError, config, timing
from convgap.algorithms import AlgoConv2d
import convgap.transforms.fold as fold
from batchnorm import randomize
from convgap.transforms import changes, compare, fold_batchnorm, swap

X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))


def rel(y, ref) -> float:
    return ((y - ref).abs().max() / ref.abs().max()).item()


def bns(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def folds(model: nn.Module) -> dict[str, str]:
    return {c.name: c.into for c in changes(model) if c.transform == "fold"}


def left(model: nn.Module) -> dict[str, str]:
    return {c.name: c.reason for c in changes(model) if c.transform == "left"}


def agree(original: nn.Module, folded: nn.Module, x, tol: float = 1e-5) -> None:
    with torch.no_grad():
        err = rel(folded(x), original(x))
    assert err <= tol, err


def convs_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),   # depthwise
        nn.Conv2d(8, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16, affine=False),  # grouped
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6)), seed)


# -- the zoo --------------------------------------------------------------------------------
# BatchNorm modules that stay, and why: ConvFirst's downsampling norms follow a residual
# addition, its head norm follows the global pool
ZOO_LEFT = {"resnet18": {}, "mobilenet_v2": {}, "efficientnet_b0": {},
            "convfirst": {"features.2.0": "operation add", "features.4.0": "operation add",
                          "features.6.0": "operation add", "norm": "follows avgpool"}}


@pytest.mark.parametrize("name", list(ZOO_LEFT))
def test_zoo_models_fold_exactly(name):
    torch.manual_seed(0)
    model = randomize(convgap.models.create(name))
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unfolded by the check
        folded = fold_batchnorm(model, x)
    agree(model, folded, x, 1e-4)
    assert set(bns(folded)) == set(ZOO_LEFT[name])
    reasons = left(folded)
    assert set(reasons) == set(ZOO_LEFT[name])
    for n, why in ZOO_LEFT[name].items():
        assert why in reasons[n]
    assert len(folds(folded)) == len(bns(model)) - len(ZOO_LEFT[name])
    # every folded BatchNorm is now an Identity, and what it folded into is a conv
    for n, into in folds(folded).items():
        assert type(folded.get_submodule(n)) is nn.Identity
        assert isinstance(folded.get_submodule(into), nn.Conv2d)


# -- layer kinds ----------------------------------------------------------------------------
def test_conv_with_and_without_bias_depthwise_grouped_affine_false_and_linear():
    model = convs_bn()
    before = {n: (m.weight, m.bias) for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))}
    folded = fold_batchnorm(model, X, inplace=True)
    assert folded is model and bns(folded) == []
    assert folds(folded) == {"1": "0", "4": "3", "7": "6", "9": "8", "13": "12"}
    for n, (w, b) in before.items():
        layer = folded.get_submodule(n)
        assert layer.weight is w  # the Parameter objects are kept
        assert layer.bias is not None and (b is None or layer.bias is b)
        assert layer.bias.dtype == layer.weight.dtype
    agree(convs_bn(), folded, X)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d(dims):
    conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv3d, nn.BatchNorm3d)
    torch.manual_seed(0)
    model = randomize(nn.Sequential(conv(3, 6, 3, padding=1, bias=False), bn(6), nn.ReLU()))
    x = torch.randn(2, 3, *([6] * dims))
    folded = fold_batchnorm(model, x)
    assert bns(folded) == [] and folds(folded) == {"1": "0"}
    agree(model, folded, x)


def test_linear_with_batchnorm1d_needs_a_2d_input_and_an_example_to_show_it():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)))
    x = torch.randn(3, 5)
    folded = fold_batchnorm(model, x)
    assert folds(folded) == {"1": "0"}
    agree(model, folded, x)
    # without example_input the input's rank is unknown: left, with the reason
    assert "rank is unknown without example_input" in left(fold_batchnorm(model))["1"]
    # a 3-D input (N, L=4, F=4): BatchNorm1d normalizes L, not the Linear's features
    x3 = torch.randn(3, 4, 5)
    unfolded = fold_batchnorm(model, x3)
    assert "3-D input" in left(unfolded)["1"] and bns(unfolded) == ["1"]
    agree(model, unfolded, x3, 0.0)


def test_without_example_input_convs_still_fold():
    model = convs_bn()
    folded = fold_batchnorm(model)
    assert set(folds(folded)) == {"1", "4", "7", "9"}
    agree(model, folded, X)


def test_reduced_precision_uses_the_wider_tolerance():
    model = convs_bn().to(torch.bfloat16)
    x = X.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = fold_batchnorm(model, x)
    assert bns(folded) == [] and folded[0].weight.dtype == torch.bfloat16
    agree(model, folded, x, 3e-2)


def test_into_a_swapped_conv_with_prepared_weights():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(8), nn.ReLU()))
    swapped = swap(model, "im2col", X)
    swapped(X)  # prepares (packs) the weights of the old values
    folded = fold_batchnorm(swapped, X, inplace=True)
    assert isinstance(folded[0], AlgoConv2d) and folded[0].algorithm == "im2col"
    assert folds(folded) == {"1": "0"}
    agree(model, folded, X)
    assert {c.transform for c in changes(folded)} == {"swap", "fold"}


# -- what is left as it is ------------------------------------------------------------------
class Shared(nn.Module):
    """A conv whose output feeds its BatchNorm and the residual; a BatchNorm after an add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)
        self.bn3 = nn.BatchNorm2d(3, track_running_stats=False)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + y
        return self.bn3(self.bn2(z + self.conv2(z)))


def test_what_stays_and_why():
    torch.manual_seed(0)
    model = randomize(Shared())
    folded = fold_batchnorm(model, X)
    assert bns(folded) == ["bn", "bn2", "bn3"] and folds(folded) == {}
    reasons = left(folded)
    assert "conv's output is also used elsewhere (add)" in reasons["bn"]
    assert "follows the operation add" in reasons["bn2"]
    assert "track_running_stats=False" in reasons["bn3"]
    agree(model, folded, X, 0.0)


class Twice(nn.Module):
    """One conv called twice (its BatchNorm's fold would change the other call)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


def test_shared_modules_are_not_folded():
    model = randomize(Twice())
    folded = fold_batchnorm(model, X)
    assert "follows conv, which is called more than once" in left(folded)["bn"]
    agree(model, folded, X, 0.0)
    conv = nn.Conv2d(3, 3, 1)
    tied = nn.Conv2d(3, 3, 1)
    tied.weight = conv.weight
    bn = nn.BatchNorm2d(3)
    model = randomize(nn.Sequential(conv, nn.BatchNorm2d(3), tied, bn, nn.ReLU(), bn))
    reasons = left(fold_batchnorm(model, X))
    assert "follows 0, which shares its parameters" in reasons["1"]
    assert reasons["3"].startswith("it is registered under more than one name")


class Branchy(nn.Module):
    """Control flow on a value at the top: fx cannot trace it, its children trace."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                               nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.a(x)
        y = self.bn(self.conv(y))  # called by the untraceable forward itself
        return y if y.sum() > 0 else -y


def test_an_untraceable_top_folds_inside_its_traceable_children():
    torch.manual_seed(0)
    model = randomize(Branchy())
    folded = fold_batchnorm(model, X)
    assert folds(folded) == {"a.1": "a.0"}
    assert "not called where the model traces" in left(folded)["bn"]
    agree(model, folded, X)


# -- the transform's contract ---------------------------------------------------------------
def test_training_mode_is_an_error_naming_the_fix():
    with pytest.raises(ConvgapError, match=r"training mode: call model\.eval\(\)"):
        fold_batchnorm(convs_bn().train(), X)
    model = convs_bn()
    model[4].train()
    with pytest.raises(ConvgapError, match=re.escape("4 (1 in all) is in training mode")):
        fold_batchnorm(model, X)


def test_inplace_false_leaves_the_original_alone():
    model = convs_bn()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model, X)
    assert folded is not model and bns(model) == ["1", "4", "7", "9", "13"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert changes(model) == []
    assert folded[0].weight is not model[0].weight


def test_state_dict_round_trip_into_a_fresh_folded_copy():
    folded = fold_batchnorm(convs_bn(), X)
    state = folded.state_dict()
    assert "1.running_mean" not in state and "3.bias" in state
    fresh = fold_batchnorm(convs_bn(seed=1), X)
    with torch.no_grad():
        assert rel(fresh(X), folded(X)) > 1e-2  # other weights: the load below matters
    fresh.load_state_dict(state)
    agree(folded, fresh, X, 0.0)


def test_layers_selects_batchnorms():
    model = convs_bn()
    assert set(folds(fold_batchnorm(model, X, layers="4"))) == {"4"}
    assert set(folds(fold_batchnorm(model, X, layers=["7", "1"]))) == {"1", "7"}
    assert set(folds(fold_batchnorm(model, X, layers=nn.BatchNorm1d))) == {"13"}
    assert set(folds(fold_batchnorm(model, X, layers=lambda n, m: not m.affine))) == {"9"}
    assert set(bns(fold_batchnorm(model, X, layers="4"))) == {"1", "7", "9", "13"}
    with pytest.raises(ConvgapError, match="'0' is a Conv2d, not a BatchNorm"):
        fold_batchnorm(model, X, layers="0")
    with pytest.raises(ConvgapError, match="no module 'bn1'"):
        fold_batchnorm(model, X, layers="bn1")


def test_changes_lists_folds_and_what_was_left():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                                    nn.BatchNorm2d(4)))
    made = changes(fold_batchnorm(model, X))
    assert [(c.name, c.transform, c.into) for c in made] == [("1", "fold", "0"),
                                                             ("3", "left", None)]
    assert made[1].reason == "follows 2, not a convolution or linear layer"
    assert made[0].to_dict()["into"] == "0"


# -- the check when applied -----------------------------------------------------------------
def _wrong_fold(real, shapes, factor):
    """_fold, but the weight of the layers of these weight shapes is off by ``factor``."""
    def wrong(layer, bn, keep):
        before = real(layer, bn, keep)
        if tuple(layer.weight.shape) in shapes:
            with torch.no_grad():
                layer.weight.mul_(factor)
        return before
    return wrong


def test_a_pair_that_fails_its_check_is_unfolded_with_a_warning(monkeypatch):
    model = convs_bn()
    monkeypatch.setattr(fold, "_fold", _wrong_fold(fold._fold, {(8, 8, 3, 3)}, 1.01))  # "3"
    with pytest.warns(UserWarning, match=r"4: folded into 3 it differed by \S+ > 1e-04"):
        folded = fold_batchnorm(model, X)
    assert bns(folded) == ["4"] and "differed by" in left(folded)["4"]
    assert folded[3].bias is None  # the bias it gained is gone again
    assert set(folds(folded)) == {"1", "7", "9", "13"}
    agree(model, folded, X)


def test_the_whole_model_check_unfolds_everything(monkeypatch):
    model = convs_bn()
    monkeypatch.setattr(fold, "_fold", _wrong_fold(fold._fold, {(8, 8, 3, 3)}, 2.0))
    real = fold.relative_error  # pass every pair's check, so only the model-level one sees it
    monkeypatch.setattr(fold, "relative_error",
                        lambda y, ref: 0.0 if isinstance(y, torch.Tensor) else real(y, ref))
    with pytest.warns(UserWarning, match="every BatchNorm is left as it is"):
        folded = fold_batchnorm(model, X)
    assert bns(folded) == bns(model) and folds(folded) == {}
    assert all("output differed" in r for r in left(folded).values())
    agree(model, folded, X, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(folded.state_dict().values(),
                                                 model.state_dict().values()))


def test_compare_on_a_folded_model(monkeypatch):
    quick = timing.TimingConfig(warmup=1, min_repeats=3, max_repeats=3, min_time=0.0)
    monkeypatch.setattr(config, "LAYER_COMPARE", quick)
    monkeypatch.setattr(config, "MODEL_COMPARE", quick)
    model = convs_bn()
    result = compare(model, fold_batchnorm(model, X), X, quiet=True)
    assert result.layers == [] and "fold x5" in result.summary()
