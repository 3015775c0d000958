"""tune_model: swap(model, 'auto') on a given input shape, plus the per-layer and model-level
numbers that show what the choice bought (used by ``convgap tune`` and the benchmark)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from rich.table import Table

from .. import allocator, hardware, timing
from ..analysis.analyze import _memory_format, parse_dtype
from ..count import check_input
from .swap import Choice, choices, swap

__all__ = ["tune_model", "TuneResult", "MODEL_CONFIG"]

MODEL_CONFIG = timing.TimingConfig(warmup=2, min_repeats=7, max_repeats=30, min_time=0.5)


@dataclass
class TuneResult:
    """Per-layer decisions of a tuned model and the model-level comparison (seconds)."""

    model: nn.Module
    choices: list[Choice]
    input_shape: tuple[int, ...]
    layout: str
    threads: int
    original_s: float
    tuned_s: float
    algorithms: list[str] = field(default_factory=list)
    malloc: str | None = None  # the malloc policy everything was measured under (CPU)

    @property
    def layout_variant(self) -> str | None:
        """Why the layout variant (first conv channels_last, every layer after it in that
        layout) was adopted, or None if the per-layer choices were kept."""
        return next(((c.tuning or {}).get("variant") for c in self.choices
                     if (c.tuning or {}).get("variant")), None)

    @property
    def speedup(self) -> float:
        """Original latency / tuned latency (timed interleaved)."""
        return self.original_s / self.tuned_s

    def table(self, title: str = "convgap tune") -> Table:
        t = Table(title=title, title_justify="left")
        t.add_column("layer")
        t.add_column("spec")
        for a in self.algorithms:
            t.add_column(f"{a} ms", justify="right")
        for col in ("choice", "vs torch", "cached"):
            t.add_column(col, justify="right" if col != "choice" else "left")
        for c in self.choices:
            tun = c.tuning or {}
            times = tun.get("times", {})
            cells = [f"{1e3 * times[a]:.3g}" if a in times else "-" for a in self.algorithms]
            speed = (times["torch"] / times[c.algorithm]
                     if c.algorithm in times and "torch" in times else 1.0)
            if c.algorithm is None:  # not a plain convolution: left as it is
                t.add_row(c.name, c.fallback, *["-"] * len(self.algorithms), "left as is",
                          "-", "-")
                continue
            t.add_row(c.name, c.spec or "", *cells, c.algorithm, f"{speed:.2f}x",
                      "yes" if tun.get("cached") else "no")
        return t

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for c in self.choices:
            key = c.algorithm or "left as is"
            counts[key] = counts.get(key, 0) + 1
        picked = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        s = (f"model: original {1e3 * self.original_s:.2f} ms, tuned "
             f"{1e3 * self.tuned_s:.2f} ms ({self.speedup:.2f}x, interleaved medians, "
             f"{self.threads} threads"
             + (f", malloc policy {self.malloc!r}" if self.malloc else "")
             + f"); choices: {picked}")
        return s if self.layout_variant is None else f"{s}\n{self.layout_variant}"

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "layout": self.layout,
                "threads": self.threads, "malloc": self.malloc, "original_s": self.original_s,
                "tuned_s": self.tuned_s, "speedup": self.speedup,
                "layout_variant": self.layout_variant,
                "layers": [{"name": c.name, "spec": c.spec, "requested": c.requested,
                            "algorithm": c.algorithm, "fallback": c.fallback,
                            "times": (c.tuning or {}).get("times"),
                            "errors": (c.tuning or {}).get("errors"),
                            "rejected": (c.tuning or {}).get("rejected"),
                            "cached": (c.tuning or {}).get("cached")}
                           for c in self.choices]}

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def tune_model(model: nn.Module, input_shape: Sequence[int], *,
               candidates: Sequence[str] | None = None, device: str = "cpu",
               dtype: torch.dtype | str = torch.float32, layout: str = "nchw",
               threads: int | None = None, quiet: bool = False,
               malloc: str | None = "retain",
               config: timing.TimingConfig = MODEL_CONFIG) -> TuneResult:
    """Tune every convolution of (a copy of) ``model`` for ``input_shape`` in ``layout`` and
    time the original and the tuned model interleaved. The original runs the same input in
    the same layout, in eval mode. On CPU everything is measured under malloc policy
    ``malloc`` (see :func:`convgap.swap`)."""
    dev = hardware.check_device(device)
    dt = parse_dtype(dtype)
    shape = check_input(model, input_shape)
    fmt = _memory_format(layout)
    with timing.threads(threads if dev.type == "cpu" else None) as n:
        original = copy.deepcopy(model).eval().to(device=dev, dtype=dt)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        x = x.to(device=dev, dtype=dt).contiguous(memory_format=fmt)
        tuned = swap(original, "auto", x, candidates=candidates, quiet=quiet, malloc=malloc)
        with allocator.use(malloc if dev.type == "cpu" else None) as policy:
            t_orig, t_tuned = timing.compare([lambda: original(x), lambda: tuned(x)], config,
                                             dev)
    made = choices(tuned)
    algos: list[str] = []
    for c in made:
        for a in (c.tuning or {}).get("times", {}):
            if a not in algos:
                algos.append(a)
    return TuneResult(tuned, made, shape, layout, n, t_orig.median, t_tuned.median, algos,
                      malloc=policy if dev.type == "cpu" else None)
