"""Roofs of a device: measured peak arithmetic throughput and memory bandwidth.

``peak_flops`` (FLOP/s) is the best rate of large square GEMMs in the given dtype, each run
both by ``torch.mm`` and as a 1x1 convolution (whichever library path is faster);
``bandwidth`` (bytes/s) is the best of three large streaming kernels: a read-only sum,
a copy (read + write) and an add (two reads + one write). Both are measured under the
current (or given) thread count and cached per (device name, threads, dtype, torch
version) in ``roofs.json`` in the convgap cache directory (see :mod:`convgap.cache`).
"""

from __future__ import annotations

import datetime as _dt
import platform
from dataclasses import asdict, dataclass, field

import torch

from . import cache, timing
from . import config as settings  # as settings: measure_roofs takes its own ``config``
from .errors import ConvgapError

__all__ = ["Roofs", "roofs", "measure_roofs", "device_name", "check_device"]

CACHE_FILE = "roofs.json"


@dataclass(frozen=True)
class Roofs:
    """Measured roofs of one (device, threads, dtype).

    peak_flops: FLOP/s of the best large GEMM. bandwidth: bytes/s of the best streaming
    kernel. ``ridge`` (FLOP/byte) is the arithmetic intensity where the two roofs meet.
    """

    device: str
    device_name: str
    dtype: str
    threads: int
    torch_version: str
    peak_flops: float
    bandwidth: float
    measured_at: str = ""
    details: dict = field(default_factory=dict)

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (FLOP/byte) at which compute and memory roofs meet."""
        return self.peak_flops / self.bandwidth

    def ideal_latency(self, flops: float) -> float:
        """FLOPs / peak FLOP/s, in seconds (Lavin's ideal latency)."""
        return flops / self.peak_flops

    def roofline_latency(self, flops: float, nbytes: float) -> float:
        """max(FLOPs / peak, bytes / bandwidth), in seconds."""
        return max(flops / self.peak_flops, nbytes / self.bandwidth)

    def bound(self, flops: float, nbytes: float) -> str:
        """'compute' if the compute roof is the higher latency, else 'memory'."""
        return "compute" if flops / self.peak_flops >= nbytes / self.bandwidth else "memory"


def check_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and check it exists here; :class:`ConvgapError` otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConvgapError(f"unknown device {device!r}: use 'cpu' or 'cuda[:N]'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConvgapError(
                f"device {device!r} requested but no CUDA GPU is available here "
                "(torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConvgapError(f"device {device!r} does not exist: "
                               f"{torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise ConvgapError(f"device type {dev.type!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def device_name(device: str | torch.device) -> str:
    """Human-readable name of the device: the CPU model or the GPU name."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


ROOFS_VERSION = 2  # bumped when the measurement changes: older cache entries are re-measured


def _key(dev: torch.device, dtype: torch.dtype, threads: int) -> str:
    return (f"{device_name(dev)}|{dev.type}|threads={threads}|{_dtype_name(dtype)}"
            f"|torch={torch.__version__}|roofs={ROOFS_VERSION}")


def _gemm_sizes(dev: torch.device) -> tuple[int, ...]:
    return (1024, 4096, 8192) if dev.type == "cuda" else (512, 1024, 2048, 3072)


def _gemm_paths(n: int, dev: torch.device, dtype: torch.dtype) -> dict:
    """The same n x n x n GEMM through torch.mm, as a 1x1 convolution in NCHW and in
    channels_last (oneDNN / cuDNN) and, on CPU with oneDNN, as oneDNN's linear on a weight
    packed once: libraries take different paths per dtype and layout, and the roof is the
    best the device does (on a Zen 5 CPU: mm 220 GFLOP/s, NCHW conv 360, channels_last
    conv 450, packed linear 510; a dense 3x3 conv runs at 520)."""
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    c = torch.empty(n, n, device=dev, dtype=dtype)
    h = max(1, n // 32)
    x = torch.randn(1, n, h, n // h, device=dev).to(dtype)   # n channels, n pixels
    w = torch.randn(n, n, 1, 1, device=dev).to(dtype)
    xc = x.contiguous(memory_format=torch.channels_last)
    wc = w.contiguous(memory_format=torch.channels_last)
    conv = torch.nn.functional.conv2d
    paths = {"mm": lambda: torch.mm(a, b, out=c), "conv1x1_": lambda: conv(x, w),
             "conv1x1_cl_": lambda: conv(xc, wc)}
    if (dev.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()):
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(b, n)
        except (RuntimeError, AttributeError):  # a build without the op
            return paths
        paths["linear_packed_"] = lambda: torch.ops.mkldnn._linear_pointwise(
            a, packed, None, "none", [], "")
    return paths


def measure_roofs(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  config: timing.TimingConfig | None = None,
                  gemm_sizes: tuple[int, ...] | None = None,
                  stream_mib: int | None = None) -> Roofs:
    """Measure peak GEMM FLOP/s and streaming bandwidth now, under the current thread count
    (no cache). ``gemm_sizes``: square GEMM sizes tried (best one wins); ``stream_mib``: size
    of each streaming buffer in MiB. Defaults are large enough to leave the caches; this
    takes a few seconds on CPU. ``config``: the timing budget of each measurement (default:
    :data:`convgap.config.ROOFS`)."""
    dev = check_device(device)
    cfg = config or settings.ROOFS
    gemm: dict[str, float] = {}
    for n in gemm_sizes or _gemm_sizes(dev):
        # a dtype without a fast GEMM here (bf16 on some CPUs runs at ~1 GFLOP/s) must not
        # take minutes: skip sizes whose one call would exceed the budget at the best rate
        if gemm and 2 * n**3 / max(gemm.values()) > settings.ROOF_GEMM_CALL_S:
            break
        for path, fn in _gemm_paths(n, dev, dtype).items():
            gemm[f"{path}{n}"] = 2 * n**3 / timing.measure(fn, cfg, dev).median
    numel = (stream_mib or (256 if dev.type == "cpu" else 1024)) * 2**20 // 4  # fp32 elements
    x = torch.ones(numel, device=dev)
    y = torch.ones(numel, device=dev)
    z = torch.empty(numel, device=dev)
    nbytes = numel * x.element_size()
    stream = {
        "read": nbytes / timing.measure(lambda: x.sum(), cfg, dev).median,
        "copy": 2 * nbytes / timing.measure(lambda: z.copy_(x), cfg, dev).median,
        "add": 3 * nbytes / timing.measure(lambda: torch.add(x, y, out=z), cfg, dev).median,
    }
    del x, y, z
    return Roofs(
        device=dev.type, device_name=device_name(dev), dtype=_dtype_name(dtype),
        threads=torch.get_num_threads(), torch_version=torch.__version__,
        peak_flops=max(gemm.values()), bandwidth=max(stream.values()),
        measured_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        details={"gemm_flops_by_n": gemm, "stream_bytes_per_s": stream})


def roofs(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
          threads: int | None = None, refresh: bool = False) -> Roofs:
    """Roofs of ``device`` for ``dtype`` under ``threads`` (default: the current count):
    from the cache if present (unless ``refresh``), else measured and cached."""
    dev = check_device(device)
    with timing.threads(threads if dev.type == "cpu" else None) as n:
        key = _key(dev, dtype, n)
        entries = cache.read_json(CACHE_FILE)
        if not refresh and key in entries:
            try:
                return Roofs(**entries[key])
            except TypeError:
                pass  # an entry from an incompatible version: re-measure below
        result = measure_roofs(dev, dtype)
        entries = cache.read_json(CACHE_FILE)  # re-read: another process may have written
        entries[key] = asdict(result)
        cache.write_json(CACHE_FILE, entries)
        return result
