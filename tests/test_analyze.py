"""analyze(): rows agree with count(), latencies follow the definitions, JSON round-trips."""

import json

import pytest
import torch
import torch.nn as nn

from convgap import ConvgapError, Report, allocator, analyze, count, models, timing

SHAPE = (1, 3, 64, 64)


@pytest.fixture(scope="module")
def resnet18_report():
    roofs = __import__("convgap").hardware.Roofs(
        device="cpu", device_name="test-cpu", dtype="float32", threads=1,
        torch_version=torch.__version__, peak_flops=100e9, bandwidth=20e9)
    model = models.create("resnet18", num_classes=10)
    return model, analyze(model, SHAPE, roofs=roofs, timing_config=timing.QUICK, quiet=True,
                          name="resnet18")


def test_rows_match_count_and_definitions(resnet18_report):
    model, report = resnet18_report
    (run,) = report.runs
    c = count(model.eval(), SHAPE)
    assert [r.name for r in run.layers] == [r.name for r in c.layers]
    assert [r.macs for r in run.layers] == [r.macs for r in c.layers]
    assert [b.name for b in run.blocks] == [b.name for b in c.blocks] and len(run.blocks) == 8
    assert run.total.macs == c.macs and run.total.params == c.params
    for row in run.layers + run.blocks + [run.total]:
        assert row.ideal_s == pytest.approx(2 * row.macs / 100e9)
        assert row.roofline_s == pytest.approx(max(2 * row.macs / 100e9, row.bytes / 20e9))
        assert row.measured_s > 0
        assert row.efficiency == pytest.approx(row.ideal_s / row.measured_s)
        assert row.bound == ("compute" if 2 * row.macs / 100e9 >= row.bytes / 20e9
                             else "memory")
    assert sum(r.share for r in run.layers) == pytest.approx(1.0)
    assert run.layers_ratio == pytest.approx(run.layers_sum_s / run.total.measured_s)
    for b in run.blocks:
        inner = [r for r in run.layers if r.block == b.name]
        assert b.layerwise_roofline_s == pytest.approx(sum(r.roofline_s for r in inner))
        assert b.layerwise_roofline_s >= b.roofline_s  # fusion never adds traffic
    assert run.threads == torch.get_num_threads() and run.layout == "nchw"


def test_json_fields_and_round_trip(resnet18_report, tmp_path):
    _, report = resnet18_report
    path = report.to_json(tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["schema"] == "convgap.report/1" and data["meta"]["torch"] == torch.__version__
    run = data["runs"][0]
    for key in ("model", "batch", "layout", "dtype", "device", "threads", "peak_flops",
                "bandwidth", "layers_ratio", "total", "layers", "blocks"):
        assert key in run
    for key in ("name", "macs", "flops", "params", "bytes", "intensity", "measured_s",
                "ideal_s", "roofline_s", "efficiency", "roofline_efficiency", "bound", "share"):
        assert key in run["layers"][0] and key in run["blocks"][0] and key in run["total"]
    back = Report.from_json(path)
    assert back.runs[0].total == report.runs[0].total
    assert back.runs[0].allocation == report.runs[0].allocation
    assert back.runs[0].faults_per_call == report.runs[0].faults_per_call
    assert [r.name for r in back.runs[0].layers] == [r.name for r in report.runs[0].layers]


@pytest.mark.skipif(not allocator.available(), reason="needs glibc malloc")
def test_allocation_cost_of_the_whole_model(resnet18_report):
    """On CPU the run carries what glibc's default malloc costs per call, measured under
    both policies, and the policy it was measured under."""
    _, report = resnet18_report
    (run,) = report.runs
    a = run.allocation
    assert a["current_s"] > 0 and a["retain_s"] > 0
    assert a["overhead_s"] == pytest.approx(a["current_s"] - a["retain_s"])
    assert a["share"] == pytest.approx(a["overhead_s"] / a["current_s"])
    assert a["faults_retain"] <= a["faults_current"]
    assert run.malloc == allocator.policy() and run.faults_per_call >= 0
    assert run.allocation_overhead_s == a["overhead_s"]


def test_allocation_cost_can_be_skipped_and_policy_chosen(fixed_roofs):
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    before = allocator.policy()
    report = analyze(net, (1, 3, 16, 16), roofs=fixed_roofs, timing_config=timing.QUICK,
                     quiet=True, allocation=False, malloc="retain", per_layer=False)
    (run,) = report.runs
    assert run.allocation is None and run.allocation_overhead_s is None
    assert run.malloc == ("retain" if allocator.available() else before)
    assert allocator.policy() == before  # restored


def test_channels_last_and_callers_model_untouched(fixed_roofs):
    model = models.create("mobilenet_v2", num_classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = analyze(model, (2, 3, 32, 32), layout="channels_last", roofs=fixed_roofs,
                     timing_config=timing.QUICK, quiet=True, per_layer=False)
    run = report.runs[0]
    assert run.layout == "channels_last" and run.batch == 2 and run.total.measured_s > 0
    assert all(r.measured_s == 0 for r in run.layers)   # per_layer=False times no layers
    assert model.training
    assert model.features[0][0].weight.is_contiguous()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_zoo_name_and_combine(fixed_roofs):
    a = analyze("resnet18", (1, 3, 32, 32), roofs=fixed_roofs, timing_config=timing.QUICK,
                quiet=True, per_layer=False)
    b = analyze("resnet18", (2, 3, 32, 32), roofs=fixed_roofs, timing_config=timing.QUICK,
                quiet=True, per_layer=False)
    both = Report.combine([a, b])
    assert [r.batch for r in both.runs] == [1, 2]
    assert both.run("resnet18", batch=2).total.macs == 2 * both.run("resnet18", 1).total.macs


@pytest.mark.parametrize("kwargs, match", [
    (dict(layout="nhwc"), "unknown layout"),
    (dict(dtype="float64x"), "unknown dtype"),
    (dict(input_shape=(1, 1, 32, 32)), "channels"),
    (dict(input_shape=(3, 32, 32)), "rank"),
    (dict(device="cuda:0" if not torch.cuda.is_available() else "tpu"), "cuda|device"),
    (dict(malloc="huge"), "unknown malloc policy"),
])
def test_bad_arguments(kwargs, match, fixed_roofs):
    kwargs.setdefault("input_shape", (1, 3, 32, 32))
    with pytest.raises(ConvgapError, match=match):
        analyze(nn.Sequential(nn.Conv2d(3, 4, 3)), roofs=fixed_roofs, quiet=True, **kwargs)


def test_unknown_model_name_lists_the_zoo():
    with pytest.raises(ConvgapError, match="resnet50"):
        analyze("resnet5")
