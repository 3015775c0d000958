"""``convgap train`` / ``convgap evaluate``: a real run writes its checkpoint, weights and log
and resumes; every bad input is one line, exit code 2, and nothing written."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

import cli_support
from cli_support import run

TINY = textwrap.dedent("""
    import torch.nn as nn

    def net(num_classes=4, width=8):
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(width, num_classes))

    def wide(num_classes=4):
        return net(num_classes, width=16)

    def four():
        return net(4)

    def six():
        return net(6)
""")
DATA = "shapes:num_classes=4,image_size=16,train_size=64,val_size=32"
TRAIN = ["--data", DATA, "--batch-size", "16", "--lr", "0.05", "--quiet", "--device", "cpu"]


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    with cli_support.user_module(tmp_path, monkeypatch, "tinytrain", TINY) as name:
        yield name



def test_train_writes_resumes_and_evaluate_agrees(capsys, tiny, tmp_path):
    out = tmp_path / "run"
    code, text, err = run(capsys, "train", f"{tiny}:net", "--epochs", "1", "--out", out, *TRAIN)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "log.json", "weights.pt"]
    assert "val top-1" in text and "weights:" in text
    # without --resume an existing run is left alone
    before = (out / "checkpoint.pt").read_bytes()
    code, _, err = run(capsys, "train", f"{tiny}:net", "--epochs", "2", "--out", out, *TRAIN)
    assert code == 2 and "pass --resume" in err and len(err.strip().splitlines()) == 1
    assert (out / "checkpoint.pt").read_bytes() == before
    code, _, err = run(capsys, "train", f"{tiny}:net", "--epochs", "2", "--out", out,
                       "--resume", *TRAIN)
    assert code == 0, err
    log = json.loads((out / "log.json").read_text())["epochs"]
    assert [r["epoch"] for r in log] == [1, 2]
    # the saved weights are the state_dict, and evaluate reports what the log says
    import tinytrain
    model = tinytrain.net()
    model.load_state_dict(torch.load(out / "weights.pt", weights_only=True))
    code, text, err = run(capsys, "evaluate", f"{tiny}:net", "--weights", out / "weights.pt",
                          "--data", DATA, "--device", "cpu")
    assert code == 0, err
    assert f"top-1 {log[-1]['val_top1']:.2%}" in text and "32 images" in text
    # the checkpoint holds the same weights under "model"
    code, again, err = run(capsys, "evaluate", f"{tiny}:net", "--weights",
                           out / "checkpoint.pt", "--data", DATA, "--device", "cpu")
    assert code == 0 and again.splitlines()[-1] == text.splitlines()[-1], err


def test_train_distils_from_a_teacher(capsys, tiny, tmp_path):
    import tinytrain
    torch.save(tinytrain.net().state_dict(), tmp_path / "teacher.pt")
    code, _, err = run(capsys, "train", f"{tiny}:net", "--epochs", "1", "--out",
                       tmp_path / "kd", "--teacher", f"{tiny}:net", "--teacher-weights",
                       tmp_path / "teacher.pt", "--kd-alpha", "0.7", *TRAIN)
    assert code == 0, err
    assert (tmp_path / "kd" / "weights.pt").exists()


def _folder_without_images(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        (tmp_path / "images" / name / "notes.txt").write_text("no image here")
    return ["--data", tmp_path / "images"]


def _other_weights(tmp_path):
    import tinytrain
    torch.save(tinytrain.wide().state_dict(), tmp_path / "wide.pt")
    return ["--weights", tmp_path / "wide.pt"]


@pytest.mark.parametrize("extra, message", [
    (_folder_without_images, "hold no readable"),
    (lambda tmp: ["--num-classes", "3"], "label 3 is outside the model's 3 classes"),
    (_other_weights, "do not fit"),
    (lambda tmp: ["--teacher", "tinytrain:net"], "go together"),
    (lambda tmp: ["--data", "shapes:colours=3"], "bad --data option"),
])
def test_bad_train_input_is_one_line_and_writes_nothing(capsys, tiny, tmp_path, extra,
                                                        message):
    args = [*TRAIN, *extra(tmp_path)]  # a later --data replaces the first
    code, out, err = run(capsys, "train", f"{tiny}:net", "--epochs", "1", "--out",
                         tmp_path / "out", *args)
    assert code == 2 and message in err, err
    assert err.startswith("convgap: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_teacher_of_other_classes_is_refused(capsys, tiny, tmp_path):
    import tinytrain
    torch.save(tinytrain.four().state_dict(), tmp_path / "four.pt")
    code, _, err = run(capsys, "train", f"{tiny}:six", "--epochs", "1", "--out",
                       tmp_path / "out", *TRAIN, "--data", DATA.replace("=4", "=6"),
                       "--teacher", f"{tiny}:four", "--teacher-weights", tmp_path / "four.pt")
    assert code == 2 and "teacher gives 4 class scores" in err and "student 6" in err, err
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_folder_is_refused(capsys, tiny, tmp_path):
    (tmp_path / "taken").write_text("a file")
    code, _, err = run(capsys, "train", f"{tiny}:net", "--epochs", "1", "--out",
                       tmp_path / "taken" / "run", *TRAIN)
    assert code == 2 and "is a file, not a folder" in err


def test_resuming_with_another_model_keeps_the_checkpoint(capsys, tiny, tmp_path):
    out = tmp_path / "run"
    assert run(capsys, "train", f"{tiny}:net", "--epochs", "1", "--out", out, *TRAIN)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run(capsys, "train", f"{tiny}:wide", "--epochs", "2", "--out", out,
                       "--resume", *TRAIN)
    assert code == 2 and "the checkpoint" in err and "do not fit" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_evaluate_refuses_weights_of_another_model(capsys, tiny, tmp_path):
    code, _, err = run(capsys, "evaluate", f"{tiny}:net", "--data", DATA, "--device", "cpu",
                       *_other_weights(tmp_path))
    assert code == 2 and "do not fit" in err


def test_train_and_evaluate_on_an_image_folder(capsys, tiny, tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(("dark", "light")):
        (tmp_path / "pics" / name).mkdir(parents=True)
        for i in range(10):
            pixels = (torch.rand(20, 24, 3, generator=g) * 100 + 120 * c).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(tmp_path / "pics" / name / f"{i}.png")
    data = ["--data", tmp_path / "pics", "--image-size", "16"]
    code, text, err = run(capsys, "train", f"{tiny}:net", "--epochs", "2", "--out",
                          tmp_path / "run", "--num-classes", "2", *TRAIN, *data)
    assert code == 0, err
    assert "(18 train, 2 val images, 2 classes)" in " ".join(text.split())
    code, text, err = run(capsys, "evaluate", f"{tiny}:net", "--num-classes", "2", "--weights",
                          tmp_path / "run" / "weights.pt", "--split", "all", *data)
    assert code == 0 and "20 images" in text, err
