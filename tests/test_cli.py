"""The command line: a real run writes its report; every bad input is one line and exit 2."""

import subprocess
import sys
import textwrap

import pytest
import torch

from convgap import models
from convgap.cli import main
import cli_support
from cli_support import run

TINY = textwrap.dedent("""
    import torch.nn as nn

    def factory():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def big_kernel():
        return nn.Conv2d(3, 4, 5)

    def not_a_model():
        return 42

    class Scaled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    def with_subclass(num_classes=4):
        return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                             Scaled(32, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    with cli_support.user_module(tmp_path, monkeypatch, "tinynet", TINY) as name:
        yield name



def test_models_lists_the_zoo(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and out.split() == models.names()


def test_analyze_user_model_writes_html_and_json(capsys, user_module, small_roofs, tmp_path):
    code, out, err = run(capsys, "analyze", f"{user_module}:factory", "--batch", "1", "2",
                         "--image-size", "16", "--layout", "nchw", "channels_last",
                         "--threads", "1", "--out", str(tmp_path / "rep"),
                         "--json", str(tmp_path / "r.json"), "--quiet", "--blocks")
    assert code == 0, err
    assert "factory" in out and "report:" in out
    html = (tmp_path / "rep" / "index.html").read_text()
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*.png"))
    assert "gap.png" in pngs and len(pngs) >= 3
    assert all(name in html for name in pngs)
    import json
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert [(r["batch"], r["layout"]) for r in runs] == [
        (1, "nchw"), (1, "channels_last"), (2, "nchw"), (2, "channels_last")]
    assert all(r["threads"] == 1 for r in runs)
    from convgap import allocator
    if allocator.available():  # what glibc's default malloc costs each run, both policies
        assert all(r["allocation"]["current_s"] > 0 and r["allocation"]["retain_s"] > 0
                   for r in runs)


def test_weights_round_trip(capsys, user_module, small_roofs, tmp_path):
    from tinynet import factory
    path = tmp_path / "w.pt"
    torch.save(factory().state_dict(), path)
    code, out, err = run(capsys, "analyze", f"{user_module}:factory", "--weights", str(path),
                         "--image-size", "16", "--quiet", "--no-per-layer")
    assert code == 0, err
    # layers counted but not timed: no per-layer table, no layer-sum ratio
    assert "top 10 layers" not in out and "0.00x" not in out


@pytest.mark.parametrize("argv, match", [
    (["analyze", "resnet5"], "unknown model 'resnet5'.*resnet50"),
    (["analyze", "resnet18", "--channels", "1"], "1 channels.*expects 3"),
    (["analyze", "tinynet:big_kernel", "--image-size", "3"], "failed on an input"),
    (["analyze", "tinynet:nope"], "nope"),
    (["analyze", "tinynet:not_a_model"], "nn.Module"),
    (["analyze", "no_such_pkg.mod:f"], "no_such_pkg"),
    (["analyze", "resnet18", "resnet50", "--weights", "w.pt"], "one model"),
])
def test_bad_input_is_one_line_exit_2(capsys, user_module, argv, match):
    import re
    code, out, err = run(capsys, *argv, "--quiet")
    assert code == 2
    assert err.startswith("convgap: error: ") and err.count("\n") == 1
    assert re.search(match, err), err
    assert "Traceback" not in err


def test_bad_malloc_policy_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tune", "resnet18", "--malloc", "huge"])
    assert exc.value.code == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu(capsys):
    code, _, err = run(capsys, "analyze", "resnet18", "--device", "cuda", "--quiet")
    assert code == 2 and "no CUDA GPU" in err


@pytest.mark.parametrize("content, match", [
    (b"\x00garbage\xff" * 10, "cannot read|not a valid|could not"),
    (None, "not found|no such|does not exist"),
])
def test_unreadable_weights(capsys, user_module, tmp_path, content, match):
    import re
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    code, _, err = run(capsys, "analyze", f"{user_module}:factory", "--weights", str(path),
                       "--quiet")
    assert code == 2 and re.search(match, err, re.I), err


def test_mismatched_weights_name_a_key(capsys, user_module, tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(models.create("resnet18").state_dict(), path)
    code, _, err = run(capsys, "analyze", f"{user_module}:factory", "--weights", str(path),
                       "--quiet")
    assert code == 2 and ("conv1.weight" in err or "0.weight" in err), err


def test_console_script_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "convgap.cli", "analyze", "nonet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown model 'nonet'" in proc.stderr


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "convgap", "models"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == models.names()
    bad = subprocess.run([sys.executable, "-m", "convgap", "analyze", "no_such_model"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown model 'no_such_model'" in bad.stderr


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "resnet18", "--batch", "0"])
    assert exc.value.code == 2


def test_roofs_command_uses_cache(capsys, small_roofs):
    code, out, _ = run(capsys, "roofs", "--threads", "1", "--quiet")
    assert code == 0 and "GFLOP/s" in out and "GB/s" in out
    run(capsys, "roofs", "--threads", "1", "--quiet")
    assert len(small_roofs) == 1
    run(capsys, "roofs", "--threads", "1", "--quiet", "--refresh")
    assert len(small_roofs) == 2


def test_tune_prints_layers_and_writes_json(capsys, user_module, tmp_path):
    import json
    code, out, err = run(capsys, "tune", f"{user_module}:factory", "--image-size", "16",
                         "--batch", "2", "--algos", "channels_last", "prepacked", "--threads",
                         "1", "--quiet", "--json", str(tmp_path / "t.json"))
    assert code == 0, err
    assert "whole model: original" in out and "replaced layers" in out
    data = json.loads((tmp_path / "t.json").read_text())
    layer, head = data["changes"]  # the conv, then the classifier's Linear
    times = layer["tuning"]["times"]
    assert layer["transform"] == "swap" and layer["runs"] in times
    assert set(times) <= {"torch", "channels_last", "prepacked"}
    assert head["tuning"]["spec"].startswith("linear 8->4")
    assert head["runs"] in head["tuning"]["times"]
    assert [r["name"] for r in data["layers"]] == ["0", "5"]  # both timed against the original
    assert data["threads"] == 1 and data["input_shape"] == [2, 3, 16, 16]
    from convgap import allocator
    assert data["malloc"] == ("retain" if allocator.available() else None)
    code, out, _ = run(capsys, "tune", f"{user_module}:factory", "--image-size", "16",
                       "--batch", "2", "--algos", "channels_last", "prepacked", "--threads",
                       "1", "--quiet")
    assert code == 0 and "(2 decided from the tuning cache)" in out   # second run


def test_factorize_and_tune_list_subclasses_left_as_they_are(capsys, user_module, tmp_path):
    import json
    code, out, err = run(capsys, "factorize", f"{user_module}:with_subclass", "-f", "tucker",
                         "--rank", "8", "--image-size", "16", "--threads", "1", "--quiet",
                         "--num-classes", "3", "--keep-slower", "--json",
                         str(tmp_path / "f.json"))
    assert code == 0, err
    assert "left as it is: 2: Scaled overrides Conv2d.forward()" in out
    data = json.loads((tmp_path / "f.json").read_text())
    assert [r["name"] for r in data["layers"]] == ["0", "3"]
    assert [c["name"] for c in data["changes"] if c["transform"] == "left"] == ["2"]
    code, out, err = run(capsys, "tune", f"{user_module}:with_subclass", "--image-size", "16",
                         "--algos", "channels_last", "--threads", "1", "--quiet")
    assert code == 0, err
    assert "left as it is: 2: Scaled overrides" in out
    code, _, err = run(capsys, "factorize", f"{user_module}:factory", "--num-classes", "3",
                       "--quiet")
    assert code == 2 and "does not take num_classes" in err


def test_tune_unknown_algorithm_lists_them(capsys):
    code, _, err = run(capsys, "tune", "resnet18", "--algos", "winogradd", "--quiet")
    assert code == 2 and "unknown algorithm 'winogradd'" in err and "prepacked" in err


def test_fuse_prints_blocks_and_writes_json(capsys, user_module, small_roofs, tmp_path):
    import json
    from convgap import choice
    with choice.forced({"fuse": "fused"}):
        code, out, err = run(capsys, "fuse", "mobilenet_v2", "--image-size", "32",
                             "--threads", "1", "--quiet", "--layers", "features.2",
                             "features.3", "--json", str(tmp_path / "f.json"))
    assert code == 0, err
    assert "inverted_residual" in out and "whole model:" in out and "2 blocks fused" in out
    data = json.loads((tmp_path / "f.json").read_text())
    assert [b["name"] for b in data["blocks"]] == ["features.2", "features.3"]
    assert all(b["flops"] > 0 and b["roofline_s"] > 0 for b in data["blocks"])
    code, _, err = run(capsys, "fuse", "mobilenet_v2", "--patterns", "nope", "--quiet",
                       "--image-size", "32")
    assert code == 2 and "unknown block patterns" in err


def test_fuse_prints_the_network_plan(capsys, small_roofs, monkeypatch):
    """With oneDNN's wheel the network's plan is a row; without it, fuse says why."""
    from convgap import choice
    from convgap.kernels.cpu import plan

    def fuse_resnet18():
        with choice.forced({"fuse": "fused", "fused_network": "plan"}):
            code, out, err = run(capsys, "fuse", "resnet18", "--image-size", "32",
                                 "--threads", "1", "--quiet")
        assert code == 0, err
        assert "basic" in out
        return out
    out = fuse_resnet18()
    if plan.unavailable() is None:
        assert "(whole network)" in out and "one oneDNN plan" in out
    monkeypatch.setattr(plan, "unavailable", lambda: "none in this test")
    out = fuse_resnet18()
    assert "(whole network)" not in out
    assert "left as it is: : network: the oneDNN plan is unavailable: none in this test" in out
