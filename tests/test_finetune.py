"""``convgap.train.finetune``: accuracy before and after factorizing and after distilled
fine-tuning; factorized layers train through their torch path, and afterwards their fused
inference path runs the trained weights (no stale packed weights)."""

from __future__ import annotations

import copy
import importlib
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F

from convgap import data, factorize, models, train
import cli_support
from cli_support import run
from convgap.errors import ConvgapError
from convgap.layers import FlattenedConv2d, TensorialConv2d

FUSED = {"tensorial": ["planar", "nhwc"], "flattened": "nhwc"}


@pytest.fixture(scope="module")
def shapes32():
    return data.shapes(image_size=32, train_size=64, val_size=32)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return models.load("resnet18", num_classes=10).eval()


def _factorized_layers(model):
    return [m for m in model.modules() if isinstance(m, (TensorialConv2d, FlattenedConv2d))]


def _inputs_of(model, layers, x):
    """Each layer's input in ``model(x)``."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.setdefault(m, a[0].detach()))
             for m in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return [seen[m] for m in layers]


@pytest.mark.parametrize("what", ["cp", "tucker", "flattened"])
def test_finetune_trains_the_factors_and_leaves_the_teacher(what, resnet, shapes32, force):
    train_set, val_set = shapes32
    force(FUSED)  # the fused kernels run in inference, chosen without timing
    if what == "flattened":  # (one rank-1 repeat per output channel: slow to decompose)
        fact = factorize(resnet, what, layers=["layer1.0.conv1", "layer1.0.conv2"])
    else:
        fact = factorize(resnet, what, compression=10.0)
    layers = _factorized_layers(fact)
    assert layers
    teacher = copy.deepcopy(resnet.state_dict())
    x = torch.stack([val_set[i][0] for i in range(16)])
    # an inference call first: the fused paths bind (and pack) the factorized weights
    inputs = _inputs_of(fact, layers, x)
    assert {m.kernel_for(i) for m, i in zip(layers, inputs)} & {"planar", "nhwc"}
    factors = [p.detach().clone() for m in layers for p in m.parameters()]

    got = train.finetune(resnet, fact, train_set, val_set, epochs=1, batch_size=16,
                         device="cpu", quiet=True)

    # three real evaluations of the whole validation set; the last one after training
    for stage, ev in got.stages():
        assert ev.images == len(val_set) and 0 <= ev.top1 <= ev.top5 <= 1 and ev.loss > 0
    assert [s for s, _ in got.stages()] == ["original", "factorized", "fine-tuned"]
    assert got.original == train.evaluate(resnet, val_set)
    assert len(got.history.epochs) == 1
    assert got.finetuned.top1 == pytest.approx(got.history.epochs[0].val_top1)
    assert got.finetuned.loss == pytest.approx(got.history.epochs[0].val_loss)
    assert train.History.from_dict(got.to_dict()) == got.history
    # gradients reached every factor; the teacher (and its mode) is as it was
    after = [p.detach() for m in layers for p in m.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(factors, after))
    assert all(torch.equal(v, resnet.state_dict()[k]) for k, v in teacher.items())
    assert not resnet.training and not fact.training

    # the fused inference path runs the trained factors, on the same inputs as before
    # training: each layer agrees with a dense convolution by the kernel its factors make
    # now, and the model with its torch steps (autograd on: every fast path steps aside)
    inputs = _inputs_of(fact, layers, x)
    assert {m.kernel_for(i) for m, i in zip(layers, inputs)} & {"planar", "nhwc"}
    for m, i in zip(layers, inputs):
        with torch.no_grad():
            fast = m(i)
            reference = _dense(m, i)
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        fast = fact(x)
    with torch.enable_grad():
        reference = fact(x.clone().requires_grad_(True)).detach()
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)



def _dense(layer, x):
    """The layer as a dense convolution by the kernel its factors make now."""
    return F.conv2d(x, layer.dense_weight(), getattr(layer, "bias", None), layer.stride,
                    layer.padding, layer.dilation)


def _close(got, want):
    """Equal within 1e-4 of ``want``'s largest magnitude (float32 sums in other orders)."""
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("make", [
    lambda: TensorialConv2d(16, 16, 3, "cp", rank=8, padding=1),
    lambda: TensorialConv2d(16, 24, 3, "tucker", rank=[8, 8], padding=1, stride=2),
    lambda: FlattenedConv2d(16, 16, 3, padding=1, bias=False),
], ids=["cp", "tucker", "flattened"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_steps_of_training_between_fused_inference_calls(make, layout, force):
    """Optimizer steps alternating with inference calls: every forward (the fused kernel in
    inference, the torch steps with autograd) and every gradient is the dense
    convolution's by the factors as they are at that step."""
    force(FUSED)
    layer = make()
    x = torch.randn(2, 16, 10, 10).contiguous(memory_format=layout)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        with torch.no_grad():
            _close(layer(x), _dense(layer, x))
        assert layer.kernel_for(x) in ("planar", "nhwc")
        y = layer(x)
        _close(y.detach(), _dense(layer, x).detach())
        g = torch.randn_like(y)
        params = list(layer.parameters())
        want = torch.autograd.grad((_dense(layer, x) * g).sum(), params)
        opt.zero_grad()
        (y * g).sum().backward()
        for p, w in zip(params, want):
            _close(p.grad, w)
        opt.step()


def test_finetune_without_epochs_evaluates_only(resnet, shapes32, torch_steps):
    train_set, val_set = shapes32
    fact = factorize(resnet, "tucker", compression=10.0)
    state = copy.deepcopy(fact.state_dict())
    got = train.finetune(resnet, fact, train_set, val_set, epochs=0, batch_size=32,
                         device="cpu")
    assert got.finetuned is None and got.history.epochs == []
    assert [s for s, _ in got.stages()] == ["original", "factorized"]
    assert got.factorized == train.evaluate(fact, val_set)
    assert all(torch.equal(v, fact.state_dict()[k]) for k, v in state.items())


def test_finetune_refuses_bad_input(resnet, shapes32):
    train_set, val_set = shapes32
    with pytest.raises(ConvgapError, match="shares parameters"):
        train.finetune(resnet, resnet, train_set, val_set, epochs=1)
    other = copy.deepcopy(resnet)
    with pytest.raises(ConvgapError, match="no teacher"):
        train.finetune(resnet, other, train_set, val_set, epochs=1, teacher=resnet)
    with pytest.raises(ConvgapError, match="non-negative"):
        train.finetune(resnet, other, train_set, val_set, epochs=-1)
    with pytest.raises(ConvgapError, match="unknown optimizer"):
        train.finetune(resnet, other, train_set, val_set, epochs=1, optimizer="lbfgs")
    few = models.load("resnet18", num_classes=4)
    with pytest.raises(ConvgapError):  # labels 0..9 beyond a 4-class model
        train.finetune(few, copy.deepcopy(few), train_set, val_set, epochs=1)


# ---- convgap factorize --data ... --finetune EPOCHS ----

TINY = textwrap.dedent("""
    import torch.nn as nn

    def net(num_classes=4):
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(16, num_classes))
""")
DATA = "shapes:num_classes=4,image_size=16,train_size=64,val_size=32"
FACTORIZE = ["factorize", "-f", "tucker", "--rank", "4", "--keep-slower", "--threads", "1",
             "--quiet"]


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    with cli_support.user_module(tmp_path, monkeypatch, "tinyfinetune", TINY) as name:
        yield name



def test_cli_reports_accuracy_and_writes_the_finetuned_model(capsys, tiny, tmp_path):
    net = importlib.import_module(tiny).net()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "run"
    code, text, err = run(capsys, *FACTORIZE, f"{tiny}:net", "--weights", tmp_path / "w.pt",
                          "--data", DATA, "--finetune", "1", "--batch-size", "16",
                          "--out", out, "--json", tmp_path / "f.json")
    assert code == 0, err
    assert "whole model" in text and "val top-1" in text   # one table, then the accuracies
    for row in ("original", "factorized", "fine-tuned (1 epoch, distilled)"):
        assert row in text
    # the original's row is the user's weights on the validation split
    val = data.shapes(num_classes=4, image_size=16, train_size=64, val_size=32)[1]
    expected = train.evaluate(net, val)
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["accuracy"]["original"]["top1"] == pytest.approx(expected.top1)
    assert report["accuracy"]["original"]["loss"] == pytest.approx(expected.loss)
    assert report["layers"] and report["accuracy"]["finetuned"]["images"] == len(val)
    log = json.loads((out / "log.json").read_text())
    assert log == report["accuracy"] and len(train.History.from_dict(log).epochs) == 1
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert any(".factors." in k for k in weights)
    # with --data alone: the two evaluations, no fine-tuning
    code, text, err = run(capsys, *FACTORIZE, f"{tiny}:net", "--data", DATA)
    assert code == 0, err
    assert "factorized" in text and "fine-tuned" not in text


@pytest.mark.parametrize("argv, match", [
    (["--finetune", "1"], "--finetune trains on a dataset: give --data"),
    (["--data", DATA, "--out", "o"], "--out sets up fine-tuning: give --finetune"),
    (["--data", DATA, "--lr", "0.1", "--optimizer", "adamw"], "--lr, --optimizer set up"),
    (["--data", "shapes:size=3"], "bad --data option 'size=3'"),
    (["--data", DATA, "--dtype", "bfloat16"], "float32"),
    (["--data", DATA, "--image-size", "32"], "disagree"),
    (["--data", "nowhere"], "nowhere"),
    (["--data", DATA, "--num-classes", "2"], "label"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, tiny, tmp_path, argv, match):
    code, _, err = run(capsys, *FACTORIZE, f"{tiny}:net", *argv)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
