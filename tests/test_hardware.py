"""Roofs: measured values are sane, the cache is hit, keyed, and rebuilt when corrupt."""

import json

import pytest
import torch

from convgap import ConvgapError, cache, hardware


def test_measured_roofs_are_plausible(small_roofs):
    r = hardware.roofs("cpu", torch.float32)
    assert 1e8 < r.peak_flops < 1e14          # between 0.1 GFLOP/s and 100 TFLOP/s
    assert 1e8 < r.bandwidth < 1e13
    assert r.threads == torch.get_num_threads() and r.dtype == "float32"
    assert r.ridge == pytest.approx(r.peak_flops / r.bandwidth)
    assert r.roofline_latency(1e9, 0) == pytest.approx(1e9 / r.peak_flops)
    assert r.roofline_latency(0, 1e9) == pytest.approx(1e9 / r.bandwidth)


def test_cache_hit_measures_nothing(small_roofs):
    first = hardware.roofs("cpu", torch.float32)
    second = hardware.roofs("cpu", torch.float32)
    assert len(small_roofs) == 1 and first == second
    path = cache.cache_dir() / hardware.CACHE_FILE
    entries = json.loads(path.read_text())
    (key,) = entries
    assert f"threads={torch.get_num_threads()}" in key and "float32" in key
    assert torch.__version__ in key and hardware.device_name("cpu") in key


def test_cache_is_keyed_by_threads_and_dtype_and_refresh_remeasures(small_roofs):
    hardware.roofs("cpu", torch.float32, threads=1)
    hardware.roofs("cpu", torch.float32, threads=2)
    hardware.roofs("cpu", torch.bfloat16, threads=1)
    hardware.roofs("cpu", torch.float32, threads=1)
    assert len(small_roofs) == 3
    hardware.roofs("cpu", torch.float32, threads=1, refresh=True)
    assert len(small_roofs) == 4
    assert len(json.loads((cache.cache_dir() / hardware.CACHE_FILE).read_text())) == 3


@pytest.mark.parametrize("garbage", ["{not json", "[1, 2]", ""])
def test_corrupt_cache_is_reported_and_rebuilt(small_roofs, garbage):
    path = cache.cache_dir() / hardware.CACHE_FILE
    path.parent.mkdir(parents=True)
    path.write_text(garbage)
    with pytest.warns(cache.CacheWarning, match="corrupt"):
        r = hardware.roofs("cpu")
    assert len(small_roofs) == 1
    assert json.loads(path.read_text())  # rewritten as valid JSON
    assert hardware.roofs("cpu") == r and len(small_roofs) == 1


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVGAP_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("CONVGAP_CACHE")
    assert cache.cache_dir() == tmp_path / "x" / "convgap"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "convgap"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ConvgapError, match="no CUDA GPU"):
        hardware.roofs("cuda")
    with pytest.raises(ConvgapError, match="unknown device"):
        hardware.check_device("gpu7")
