"""Shared fixtures: every test gets its own convgap cache dir; cheap roofs. Hypothesis
profiles: 'dev' (default: fresh random examples each run, which is how edge cases are
found) and 'ci' (``HYPOTHESIS_PROFILE=ci``, set by .ci/run: the same examples every run,
so CI's verdict is the code's, not the draw's)."""

import contextlib
import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("dev")
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

from convgap import choice, hardware
from convgap.hardware import Roofs


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVGAP_CACHE", str(tmp_path / "cache"))
    choice.clear_memory()  # decisions made for another test's cache stay there
    torch.manual_seed(0)


@pytest.fixture
def force():
    """``force({kind: name})``: the measured choices of those kinds take that candidate for
    the rest of the test (verified, not timed): :func:`convgap.choice.forced`."""
    stack = contextlib.ExitStack()
    yield lambda table: stack.enter_context(choice.forced(table))
    stack.close()


@pytest.fixture
def fixed_roofs():
    """Roofs with round numbers (100 GFLOP/s, 20 GB/s) so expected latencies are exact."""
    return Roofs(device="cpu", device_name="test-cpu", dtype="float32",
                 threads=torch.get_num_threads(), torch_version=torch.__version__,
                 peak_flops=100e9, bandwidth=20e9)


@pytest.fixture
def small_roofs(monkeypatch):
    """Make roofs() measure small sizes (fast), and record each time it measures."""
    calls = []
    real = hardware.measure_roofs

    def small(device, dtype, **kw):
        calls.append((str(device), dtype))
        return real(device, dtype, gemm_sizes=(128,), stream_mib=4,
                    config=hardware.timing.QUICK)

    monkeypatch.setattr(hardware, "measure_roofs", small)
    return calls


@pytest.fixture
def torch_steps(monkeypatch):
    """Turn convgap's C kernels off (``CONVGAP_NATIVE=0``), for tests of the torch paths
    they would otherwise replace."""
    monkeypatch.setenv("CONVGAP_NATIVE", "0")
