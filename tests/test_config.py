"""convgap.config: budgets and switches read at call time, so override() reaches every
module that measures."""

import pytest
import torch
import torch.nn as nn

from convgap import allocator, analyze, config, hardware, timing
from convgap.errors import ConvgapError


def exactly(n: int) -> timing.TimingConfig:
    """A budget of exactly ``n`` timed samples, no warm-up."""
    return timing.TimingConfig(warmup=0, min_repeats=n, max_repeats=n, min_time=0.0)


@pytest.fixture
def sample_counts(monkeypatch):
    """The number of samples of every timing.measure result, in call order."""
    counts = []
    real = timing.measure

    def spy(*args, **kw):
        result = real(*args, **kw)
        counts.append(len(result.samples))
        return result

    monkeypatch.setattr(timing, "measure", spy)
    return counts


def test_config_override_restores_and_rejects_unknown_settings():
    before = config.CHOICE_ROUNDS
    with config.override(CHOICE_ROUNDS=timing.QUICK, MARGIN=0.1):
        assert config.CHOICE_ROUNDS is timing.QUICK and config.MARGIN == 0.1
    assert config.CHOICE_ROUNDS is before and config.MARGIN == 0.03
    with pytest.raises(ConvgapError, match="no setting"):
        with config.override(NOPE=1):
            pass
    with pytest.raises(ConvgapError, match="takes a TimingConfig"):
        with config.override(CHOICE_ROUNDS=3):
            pass


def test_override_reaches_analyze(sample_counts, fixed_roofs):
    """The whole model takes ANALYZE_MODEL's samples, each layer and block call
    ANALYZE_CALL's, and each 'retain' block of the allocation cost ALLOCATION's."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with config.override(ANALYZE_MODEL=exactly(3), ANALYZE_CALL=exactly(4),
                         ALLOCATION=exactly(2)):
        report = analyze(net, (1, 3, 8, 8), roofs=fixed_roofs, quiet=True)
    run = report.runs[0]
    calls = len(run.layers) + len(run.blocks)
    retain = [2] * 3 if allocator.available() else []  # analyze times 3 'retain' blocks
    assert calls == 2
    assert sample_counts == [3] + [4] * calls + retain


def test_override_reaches_the_roofs(sample_counts):
    with config.override(ROOFS=exactly(2)):
        hardware.measure_roofs("cpu", torch.float32, gemm_sizes=(64,), stream_mib=1)
    paths = hardware._gemm_paths(64, torch.device("cpu"), torch.float32)
    assert sample_counts == [2] * (len(paths) + 3)  # each GEMM path, 3 streaming kernels


def test_roof_gemm_sizes_stop_at_the_call_budget(sample_counts):
    """A GEMM size whose one call would take longer than ROOF_GEMM_CALL_S at the best rate
    measured is not tried: with a budget of 1 ns only the first size is."""
    paths = hardware._gemm_paths(64, torch.device("cpu"), torch.float32)
    with config.override(ROOFS=exactly(1), ROOF_GEMM_CALL_S=1e-9):
        roofs = hardware.measure_roofs("cpu", torch.float32, gemm_sizes=(64, 128),
                                       stream_mib=1)
    assert sorted(roofs.details["gemm_flops_by_n"]) == sorted(f"{p}64" for p in paths)
    assert len(sample_counts) == len(paths) + 3
