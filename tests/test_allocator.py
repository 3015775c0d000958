"""The malloc policy: setting and restoring it, and its effect counted as page faults.

Page faults come from getrusage, an independent counter kept by the kernel: under glibc's
default policy a 40 MiB buffer is mmapped afresh on every allocation (one fault per 4 KiB
page touched), under 'retain' it is reused from the heap and touches nothing new."""

import statistics

import pytest
import torch

from convgap import ConvgapError, allocator, timing

needs_glibc = pytest.mark.skipif(not allocator.available(), reason="needs glibc malloc")

BIG = 10 * 2**20  # float32 elements: 40 MiB, above glibc's 32 MiB mmap ceiling
PAGES = BIG * 4 // 4096


def _alloc_touch():
    torch.empty(BIG).fill_(1.0)


def _faults_per_call(calls: int = 5) -> list[int]:
    out = []
    for _ in range(calls):
        f0 = timing.page_faults()
        _alloc_touch()
        out.append(timing.page_faults() - f0)
    return out


@pytest.fixture
def restore_policy():
    before = allocator.policy()
    yield
    if allocator.available():
        allocator.set_policy(before if before in allocator.POLICIES else "default")


# In a process with a history the default policy's cost varies: a 40 MiB request is served
# without faults whenever a big enough free chunk happens to lie in the heap. A fresh process
# has none, so the default's behaviour is checked there.
_FRESH = """
import json, sys, torch
from convgap import allocator, timing
BIG = %d
def alloc_touch():
    torch.empty(BIG).fill_(1.0)
def faults(calls=5):
    out = []
    for _ in range(calls):
        f0 = timing.page_faults(); alloc_touch(); out.append(timing.page_faults() - f0)
    return out
cfg = timing.TimingConfig(warmup=1, min_repeats=3, max_repeats=3, min_time=0.0)
res = {"start": allocator.policy()}
if sys.argv[1] == "start-up":   # the cost measured in glibc's start-up state
    res["cost"] = allocator.allocation_cost(alloc_touch, cfg, blocks=2).to_dict()
    res["after_cost"] = allocator.policy()
else:
    res["startup"] = faults(3)
    allocator.set_policy("default")
    res["default"] = faults()
    with allocator.use("default"):
        t = timing.measure(alloc_touch, cfg)
    res["timing"] = [list(t.faults), len(t.samples), t.faults_per_call]
    res["cost"] = allocator.allocation_cost(alloc_touch, cfg, blocks=2).to_dict()
    res["after_cost"] = allocator.policy()
    allocator.set_policy("retain")
    res["retain"] = faults(9)
print(json.dumps(res))
""" % BIG


def _fresh(mode: str) -> dict:
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", _FRESH, mode], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fresh_process():
    return _fresh("steady")


@needs_glibc
def test_default_policy_faults_every_call_and_retain_few(fresh_process):
    r = fresh_process
    assert r["start"] == "default"
    assert min(r["startup"]) >= 0.9 * PAGES  # start-up: above 32 MiB is always mmapped
    assert min(r["default"]) >= 0.9 * PAGES  # every call touches fresh pages
    assert sum(r["retain"]) < 5 * PAGES  # the heap grows, then is reused


@needs_glibc
def test_allocation_cost_counts_faults_under_each_policy(fresh_process):
    cost = fresh_process["cost"]
    assert cost["faults_current"] >= 0.9 * PAGES
    assert cost["faults_retain"] < 0.02 * PAGES
    assert cost["overhead_s"] == pytest.approx(cost["current_s"] - cost["retain_s"])
    assert cost["share"] == pytest.approx(cost["overhead_s"] / cost["current_s"])
    assert cost["policy"] == "default" and fresh_process["after_cost"] == "default"


@needs_glibc
def test_allocation_cost_in_the_start_up_state():
    """glibc's start-up state cannot be restored once left: it is timed first, the
    result says so, and the process stays at the fixed default afterwards."""
    r = _fresh("start-up")
    assert r["start"] == "default"
    assert r["cost"]["policy"] == allocator.START_UP
    assert r["cost"]["faults_current"] >= 0.9 * PAGES
    assert r["cost"]["faults_retain"] < 0.02 * PAGES
    assert r["after_cost"] == "default"


@needs_glibc
def test_timing_records_faults_per_sample(fresh_process):
    faults, n, per_call = fresh_process["timing"]
    assert len(faults) == n == 3
    assert per_call == statistics.median(faults) >= 0.9 * PAGES


@needs_glibc
def test_retain_bounds_faults_in_this_process(restore_policy):
    """Under 'retain' a buffer faults only where it lands on heap pages never touched
    before (the 40 MiB block moves around a fragmented heap for a while), so the faults
    over many calls stay bounded; the default policy faults on every one of them."""
    allocator.set_policy("retain")
    assert sum(_faults_per_call(30)) < 10 * PAGES
    cfg = timing.TimingConfig(warmup=1, min_repeats=5, max_repeats=5, min_time=0.0)
    t = timing.measure(_alloc_touch, cfg)
    assert len(t.faults) == len(t.samples) == 5
    with pytest.raises(ValueError):
        allocator.allocation_cost(_alloc_touch, cfg, blocks=0)


@needs_glibc
def test_set_policy_returns_previous_and_use_restores(restore_policy):
    allocator.set_policy("default")
    assert allocator.set_policy("retain") == "default"
    assert allocator.policy() == "retain"
    with allocator.use("default") as p:
        assert p == "default" and allocator.policy() == "default"
    assert allocator.policy() == "retain"
    with allocator.use(None) as p:
        assert p == "retain"


@needs_glibc
def test_use_restores_after_an_error(restore_policy):
    allocator.set_policy("default")
    with pytest.raises(RuntimeError):
        with allocator.use("retain"):
            raise RuntimeError("boom")
    assert allocator.policy() == "default"


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ConvgapError, match="unknown malloc policy 'huge'.*default, retain"):
        allocator.set_policy("huge")


def test_preloaded_allocator_cannot_be_set(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert allocator.policy() == "preloaded:jemalloc"
    assert not allocator.available()
    with pytest.raises(ConvgapError, match="cannot set the malloc policy"):
        allocator.set_policy("retain")
    with allocator.use("retain") as p:  # runs as is
        assert p == "preloaded:jemalloc"
    assert allocator.allocation_cost(lambda: None) is None


@needs_glibc
def test_start_up_environment_is_reported(monkeypatch):
    monkeypatch.setattr(allocator, "_current", None)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert allocator.policy() == "default"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "2147483647")
    assert allocator.policy() == "env"
