"""One timing discipline for the whole project.

Every latency convgap reports comes from :func:`measure` (one callable) or :func:`compare`
(several callables interleaved round by round, so slow drifts of a shared machine hit all of
them alike). Both warm up first, synchronise CUDA around every sample, and report the median
in seconds together with the thread count they ran under. On a GPU, :func:`compare_graphs`
times the device alone: each callable captured in a CUDA graph, replayed between CUDA events,
so host launch overhead drops out.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

try:
    import resource
except ImportError:  # Windows: page faults are not counted
    resource = None

__all__ = ["Timing", "TimingConfig", "measure", "compare", "compare_graphs", "threads",
           "synchronize", "page_faults", "paired_ratio"]


@dataclass(frozen=True)
class TimingConfig:
    """How hard to measure.

    warmup: untimed calls before sampling.
    min_repeats / max_repeats: bounds on the number of timed samples.
    min_time: keep sampling (up to max_repeats) until this many seconds were spent timing.
    settle: seconds of untimed calls of a callable right before each of its samples (at
      least one call when positive; :func:`compare`): the sample then shows its steady
      state, not the switch from the callable before it.
      Engines with their own thread pools (ONNX Runtime, OpenVINO's TBB, torch's OpenMP)
      leave their threads spinning after a call: the next engine's first call shares the
      cores with them (a convgap model's first layer measured 5.7x slower right after an
      ONNX Runtime call, docs/2026-12-03-fusion.md).
    """

    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 50
    min_time: float = 0.1
    settle: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.min_repeats < 1 or self.max_repeats < self.min_repeats \
                or self.settle < 0:
            raise ValueError(f"invalid timing config {self}")


QUICK = TimingConfig(warmup=1, min_repeats=3, max_repeats=5, min_time=0.0)


@dataclass(frozen=True)
class Timing:
    """Result of timing one callable: all samples in seconds, the threads used, and the
    process's minor page faults during each sample (CPU memory freshly touched; empty where
    not counted)."""

    samples: tuple[float, ...]
    threads: int
    device: str = "cpu"
    extra: dict = field(default_factory=dict, compare=False)
    faults: tuple[int, ...] = ()

    @property
    def median(self) -> float:
        """Median latency in seconds."""
        return statistics.median(self.samples)

    @property
    def median_ms(self) -> float:
        """Median latency in milliseconds."""
        return 1e3 * self.median

    @property
    def faults_per_call(self) -> float:
        """Median minor page faults per call (0.0 where not counted)."""
        return float(statistics.median(self.faults)) if self.faults else 0.0

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def iqr(self) -> float:
        """Inter-quartile range in seconds (0 with fewer than 4 samples)."""
        if len(self.samples) < 4:
            return 0.0
        q = statistics.quantiles(self.samples, n=4)
        return q[2] - q[0]


def synchronize(device: str | torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[int]:
    """Run the body with ``torch.set_num_threads(n)`` (``None``: leave as is); yield the count."""
    old = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def page_faults() -> int:
    """Minor page faults of this process so far, all threads (0 where not counted)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def _one(fn: Callable[[], object], device: str) -> tuple[float, int]:
    synchronize(device)
    f0 = page_faults()
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    t1 = time.perf_counter()
    return t1 - t0, page_faults() - f0


@torch.no_grad()
def measure(
    fn: Callable[[], object],
    config: TimingConfig = TimingConfig(),
    device: str | torch.device = "cpu",
) -> Timing:
    """Time ``fn()``: ``config.warmup`` untimed calls, then samples until both
    ``config.min_repeats`` and ``config.min_time`` are reached (at most ``max_repeats``).
    Runs under ``torch.no_grad``; returns a :class:`Timing` in seconds."""
    return compare([fn], config, device)[0]


@torch.no_grad()
def compare(
    fns: Sequence[Callable[[], object]],
    config: TimingConfig = TimingConfig(),
    device: str | torch.device = "cpu",
) -> list[Timing]:
    """Time several callables interleaved: each round runs every callable once, in turn
    (forward in even rounds, reversed in odd ones, so no callable always runs first), so
    they share the machine's drifts; with ``config.settle``, each sample follows that many
    seconds of untimed calls of the same callable. Stops once every callable has ``min_repeats``
    samples adding up to at least ``min_time`` seconds, or after ``max_repeats`` rounds."""
    dev = str(torch.device(device))
    for _ in range(config.warmup):
        for fn in fns:
            fn()
    synchronize(dev)
    faults: list[list[int]] = [[] for _ in fns]

    def sample(i: int) -> float:
        if config.settle > 0:
            end = time.perf_counter() + config.settle
            fns[i]()
            while time.perf_counter() < end:
                fns[i]()
        t, f = _one(fns[i], dev)  # (synchronizes first)
        faults[i].append(f)
        return t
    samples = _rounds(len(fns), sample, config, 1)
    n = torch.get_num_threads()
    return [Timing(tuple(s), n, dev, faults=tuple(f) if resource else ())
            for s, f in zip(samples, faults)]


def _rounds(count: int, sample: Callable[[int], float], config: TimingConfig,
            weight: int) -> list[list[float]]:
    """The interleaved rounds of :func:`compare` and :func:`compare_graphs`: each round
    takes ``sample(i)`` (seconds) of every callable i, in turn; until every callable has
    ``config.min_repeats`` samples whose sum times ``weight`` (calls per sample) reaches
    ``config.min_time``, or ``config.max_repeats`` rounds."""
    samples: list[list[float]] = [[] for _ in range(count)]
    order = list(range(count))
    rounds = 0
    while rounds < config.max_repeats:
        # every other round runs in reverse: whoever runs first in a round reads a few
        # percent slower (measured up to 4% on a 0.1 ms layer against itself)
        for i in (order if rounds % 2 == 0 else order[::-1]):
            samples[i].append(sample(i))
        rounds += 1
        if rounds >= config.min_repeats and \
                min(sum(s) for s in samples) * weight >= config.min_time:
            break
    return samples


@torch.no_grad()
def compare_graphs(
    fns: Sequence[Callable[[], object]],
    config: TimingConfig = TimingConfig(),
    device: str | torch.device = "cuda",
    calls: int = 20,
) -> list[Timing]:
    """Device time per call of several callables on a CUDA GPU, interleaved as in
    :func:`compare`: each callable runs ``config.warmup`` times (at least once: lazy
    choices, autotuning and allocations happen outside the capture), is captured ``calls``
    times over into one CUDA graph, and each sample is one replay between two CUDA events,
    divided by ``calls``. Host launch overhead is excluded, so this is the time the kernels
    occupy the GPU back to back, not an eager call's latency (:func:`compare`). Samples in
    seconds per call; ``extra`` records the method and ``calls``.

    Raises ValueError off CUDA or for ``calls < 1``; a callable that cannot be captured
    (it synchronises, or allocates pinned host memory, ...) raises torch's capture error."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"compare_graphs times CUDA graphs; device {dev} is not a CUDA device")
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    with torch.cuda.device(dev):
        for _ in range(max(1, config.warmup)):
            for fn in fns:
                fn()
        torch.cuda.synchronize()
        graphs = []
        for fn in fns:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(calls):
                    fn()
            graphs.append(g)
        for g in graphs:  # the first replay uploads the graph
            g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def sample(i: int) -> float:
            start.record()
            graphs[i].replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        samples = _rounds(len(fns), sample, config, calls)
    extra = {"method": "cuda_graph", "calls": calls}
    return [Timing(tuple(s), torch.get_num_threads(), str(dev), extra=dict(extra))
            for s in samples]


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of ``a``'s sample / ``b``'s sample, for two callables timed
    together by :func:`compare`: each round runs both back to back, so a shared machine's
    drifts cancel (a ratio of medians let a 7% loss pass on a 0.6 ms layer)."""
    return statistics.median(x / y for x, y in zip(a.samples, b.samples))
