"""The report model of ``convgap analyze``: rows per layer, block and model, grouped in runs.

Units everywhere: latencies in seconds (``*_s``), MACs and FLOPs as counts, bytes in bytes,
intensity in FLOP/byte, efficiencies and shares as fractions (1.0 = 100 %).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Row", "Run", "Report"]


@dataclass
class Row:
    """One layer call, block call or whole model, measured against the device's roofs.

    bytes: minimum DRAM traffic (for a block: fused, input + weights + output).
    measured_s: median latency run in isolation on its real input (model: whole forward).
    ideal_s: FLOPs / peak. roofline_s: max(FLOPs / peak, bytes / bandwidth).
    efficiency: ideal_s / measured_s (computational efficiency).
    roofline_efficiency: roofline_s / measured_s (how close to the nearer roof).
    bound: 'compute' or 'memory' by the roofline. share: fraction of the total time (layers:
    of the sum of isolated layer times; blocks: of the whole-model time).
    predicted_s: with ``analyze(predict=True)``, the latency predictor's (model: whole
    forward; layer: its time inside the model's pass, a call's share of its module's).
    """

    name: str
    kind: str                 # 'layer' | 'block' | 'model'
    type: str
    input_shape: Any
    output_shape: Any
    macs: int
    params: int
    bytes: int
    measured_s: float
    ideal_s: float
    roofline_s: float
    bound: str
    share: float = 0.0
    block: str | None = None               # layers: the enclosing block
    block_kind: str | None = None          # blocks: 'bottleneck', 'inverted_residual', ...
    layerwise_bytes: int | None = None     # blocks/model: sum of the layers' minimum bytes
    layerwise_roofline_s: float | None = None  # blocks/model: sum of the layers' rooflines
    layers_measured_s: float | None = None     # blocks/model: sum of isolated layer times
    predicted_s: float | None = None           # layers/model: convgap.predict_latency's

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def intensity(self) -> float:
        """FLOP per byte of minimum traffic."""
        return self.flops / self.bytes if self.bytes else 0.0

    @property
    def efficiency(self) -> float:
        """Computational efficiency: ideal latency / measured latency."""
        return self.ideal_s / self.measured_s if self.measured_s > 0 else 0.0

    @property
    def roofline_efficiency(self) -> float:
        """Roofline latency / measured latency."""
        return self.roofline_s / self.measured_s if self.measured_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(flops=self.flops, intensity=self.intensity, efficiency=self.efficiency,
                 roofline_efficiency=self.roofline_efficiency)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Row":
        keys = cls.__dataclass_fields__
        row = cls(**{k: v for k, v in d.items() if k in keys})
        row.input_shape, row.output_shape = _shape(row.input_shape), _shape(row.output_shape)
        return row


def _shape(value: Any) -> Any:
    """A shape read back from JSON: a list of ints is a tuple; a list of shapes a list."""
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):
            return tuple(value)
        return [_shape(v) for v in value]
    return value


@dataclass
class Run:
    """One model analysed at one batch size, layout, dtype and device."""

    model: str
    batch: int
    input_shape: tuple[int, ...]
    layout: str
    dtype: str
    device: str
    device_name: str
    threads: int
    peak_flops: float          # FLOP/s
    bandwidth: float           # bytes/s
    total: Row
    layers: list[Row] = field(default_factory=list)
    blocks: list[Row] = field(default_factory=list)
    unattributed_macs: int = 0
    malloc: str | None = None              # CPU: the malloc policy measured under
    faults_per_call: float | None = None   # CPU: median minor page faults per forward pass
    allocation: dict | None = None         # CPU: convgap.allocator.AllocationCost.to_dict()
    unclassified: list[str] = field(default_factory=list)  # top-level modules with no block

    @property
    def allocation_overhead_s(self) -> float | None:
        """What the process's malloc policy costs per forward pass against retaining
        freed memory (seconds; None if not measured)."""
        return self.allocation["overhead_s"] if self.allocation else None

    @property
    def label(self) -> str:
        return f"{self.model} b{self.batch} {self.layout}"

    @property
    def layers_timed(self) -> bool:
        """False when the layers were counted but not timed (``per_layer=False``)."""
        return any(r.measured_s > 0 for r in self.layers)

    @property
    def layers_sum_s(self) -> float:
        """Sum of the isolated per-layer latencies (seconds)."""
        return sum(r.measured_s for r in self.layers)

    @property
    def layers_ratio(self) -> float:
        """Sum of isolated per-layer latencies / whole-model latency."""
        return self.layers_sum_s / self.total.measured_s if self.total.measured_s else 0.0

    def to_dict(self) -> dict:
        return {
            "model": self.model, "batch": self.batch, "input_shape": list(self.input_shape),
            "layout": self.layout, "dtype": self.dtype, "device": self.device,
            "device_name": self.device_name, "threads": self.threads,
            "peak_flops": self.peak_flops, "bandwidth": self.bandwidth,
            "unattributed_macs": self.unattributed_macs,
            "malloc": self.malloc, "faults_per_call": self.faults_per_call,
            "allocation": self.allocation, "unclassified": self.unclassified,
            "layers_sum_s": self.layers_sum_s, "layers_ratio": self.layers_ratio,
            "total": self.total.to_dict(),
            "blocks": [r.to_dict() for r in self.blocks],
            "layers": [r.to_dict() for r in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Run":
        return cls(
            model=d["model"], batch=d["batch"], input_shape=tuple(d["input_shape"]),
            layout=d["layout"], dtype=d["dtype"], device=d["device"],
            device_name=d["device_name"], threads=d["threads"], peak_flops=d["peak_flops"],
            bandwidth=d["bandwidth"], total=Row.from_dict(d["total"]),
            layers=[Row.from_dict(r) for r in d["layers"]],
            blocks=[Row.from_dict(r) for r in d["blocks"]],
            unattributed_macs=d.get("unattributed_macs", 0), malloc=d.get("malloc"),
            faults_per_call=d.get("faults_per_call"), allocation=d.get("allocation"),
            unclassified=d.get("unclassified", []))


@dataclass
class Report:
    """Result of :func:`convgap.analyze`: one :class:`Run` per (model, batch, layout)."""

    runs: list[Run] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @classmethod
    def combine(cls, reports: list["Report"]) -> "Report":
        """One report holding the runs of all ``reports`` (meta of the first)."""
        return cls([r for rep in reports for r in rep.runs],
                   dict(reports[0].meta) if reports else {})

    def run(self, model: str, batch: int | None = None, layout: str | None = None) -> Run:
        """The first run matching ``model`` (and ``batch``/``layout`` when given)."""
        for r in self.runs:
            if r.model == model and batch in (None, r.batch) and layout in (None, r.layout):
                return r
        raise KeyError(f"no run for model={model!r} batch={batch} layout={layout}")

    def to_dict(self) -> dict:
        return {"schema": "convgap.report/1", "meta": self.meta,
                "runs": [r.to_dict() for r in self.runs]}

    def to_json(self, path: str | Path) -> Path:
        """Write the whole report as JSON; return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=_jsonable))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> "Report":
        d = json.loads(Path(path).read_text())
        return cls([Run.from_dict(r) for r in d["runs"]], d.get("meta", {}))

    def table(self, top: int = 10):
        """A rich renderable: the model summary, then per run the ``top`` layers by share of
        time and the blocks. Print it with ``rich.print(report.table())``."""
        from .render import tables
        return tables(self, top=top)

    def save_html(self, directory: str | Path) -> Path:
        """Write ``index.html`` with its PNG plots and ``report.json`` into ``directory``;
        return the path of ``index.html``."""
        from .html import save_html
        return save_html(self, Path(directory))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return list(obj)
    return str(obj)
