"""The one measured-and-verified choice every measured decision in convgap goes through.

:func:`choose` takes named :class:`Candidate` callables that compute the same thing (an
algorithm for a convolution, a fused kernel or the torch steps of a factorized layer, oneDNN
or BLAS for one einsum step), the first being the *incumbent* (the reference). Its rules:

1. every other candidate is run once and its output compared with the incumbent's
   (relative error ``max|y - ref| / max|ref|`` within the candidate's tolerance, widened to
   the reference's own rounding in fp16 / bf16 / TF32: :func:`tolerance`); one that fails,
   raises or disagrees is rejected with the reason;
2. the survivors are timed interleaved (round robin, :data:`config.CHOICE_ROUNDS`), and the
   fastest median, if not the incumbent, is confirmed head to head against the incumbent
   alone (:data:`config.CONFIRM_ROUNDS`, median of per-round ratios) and replaces it only
   if at least :data:`config.MARGIN` faster;
3. the decision is stored *by name* under a key of the device name, torch version, thread
   count, the malloc policy (CPU), and the operation's full spec, in memory and, with
   ``persist``, in ``tuning.json`` of the cache directory (atomic, locked writes); a hit
   times nothing.

Tests and users can force a kind of decision (:func:`forced`): the forced candidate is taken
as it is, nothing is run, timed or stored.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from . import allocator, cache, config, timing
from .errors import ConvgapError
from .hardware import device_name

__all__ = ["Candidate", "Decision", "choose", "forced", "forget", "tolerance", "relative_error",
           "cache_key", "clear_memory", "pick", "TUNING_FILE", "PRECISION_TOLERANCE"]

TUNING_FILE = "tuning.json"
# Accepted relative error where the reference itself is computed in reduced precision:
# the fp16 / bf16 output rounding (unit roundoff 4.9e-4 / 3.9e-3, with room for accumulation
# order), and fp32 on CUDA while cuDNN's TF32 switch lets the reference multiply in TF32.
PRECISION_TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2, "tf32": 2e-3}

_memory: dict[tuple[str, str], dict] = {}  # (cache dir, full key) -> decision, this process
_forced: list[dict[str, str]] = []          # kind -> candidate name, innermost last


@dataclass(frozen=True)
class Candidate:
    """One way to compute the operation: ``fn()`` runs it once and returns its output
    (a tensor); ``tolerance`` is its own accepted relative error (a floor, see
    :func:`tolerance`)."""

    name: str
    fn: Callable[[], Any]
    tolerance: float = 1e-4


@dataclass
class Decision:
    """What :func:`choose` decided: the chosen name; per candidate its median seconds in
    the round robin, its relative error against the incumbent, or why it was rejected; the
    head-to-head confirmation (``chosen_s``, ``incumbent_s``, ``ratio``) where there was
    one; whether it came from the cache."""

    choice: str
    times: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    confirm: dict | None = None
    cached: bool = False
    forced: bool = False
    threads: int = 0
    malloc: str | None = None
    measured_at: str = ""

    def to_dict(self) -> dict:
        """The stored form (``cached`` is not stored: it says where this one came from)."""
        return {"choice": self.choice, "times": self.times, "errors": self.errors,
                "rejected": self.rejected, "confirm": self.confirm, "threads": self.threads,
                "malloc": self.malloc, "measured_at": self.measured_at}

    @classmethod
    def from_dict(cls, d: dict, cached: bool = True) -> "Decision":
        return cls(d["choice"], d.get("times") or {}, d.get("errors") or {},
                   d.get("rejected") or {}, d.get("confirm"), cached, False,
                   d.get("threads", 0), d.get("malloc"), d.get("measured_at", ""))


def precision_tolerance(dtype: torch.dtype | str, device: str) -> float:
    """The rounding of a reference computed in ``dtype`` on ``device`` as a relative error
    bound (0 for fp32/fp64 without TF32): :data:`PRECISION_TOLERANCE`."""
    name = str(dtype).removeprefix("torch.")
    if name == "float32" and device == "cuda" and torch.backends.cudnn.allow_tf32:
        name = "tf32"
    return PRECISION_TOLERANCE.get(name, 0.0)


def tolerance(own: float, dtype: torch.dtype | str, device: str) -> float:
    """Relative error accepted from a candidate whose own tolerance is ``own``, against a
    reference computed in ``dtype`` on ``device``: the larger of the two."""
    return max(own, precision_tolerance(dtype, device))


def relative_error(y: Any, ref: Any) -> float:
    """max |y - ref| / max |ref| over two tensors (or equal-length sequences of tensors);
    inf on a shape mismatch or non-finite values."""
    if isinstance(y, (tuple, list)) or isinstance(ref, (tuple, list)):
        if not (isinstance(y, (tuple, list)) and isinstance(ref, (tuple, list))
                and len(y) == len(ref)):
            return math.inf
        return max((relative_error(a, b) for a, b in zip(y, ref)), default=0.0)
    if not isinstance(y, torch.Tensor) or not isinstance(ref, torch.Tensor) or \
            y.shape != ref.shape:
        return math.inf
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (y.float() - ref.float()).abs().max().item() / (scale or 1.0) if y.numel() else 0.0
    return err if math.isfinite(err) else math.inf


def cache_key(spec_key: str, device: str = "cpu") -> str:
    """The full key of a decision on ``spec_key`` (the operation's full spec, its layout
    and dtype included): device name, torch version, threads and, on CPU, the malloc
    policy in force."""
    dev = "cpu" if device == "cpu" else f"{device}:{torch.cuda.current_device()}"
    malloc = f"|malloc={allocator.policy()}" if device == "cpu" else ""
    return (f"{device_name(dev)}|torch={torch.__version__}|threads={torch.get_num_threads()}"
            f"{malloc}|{spec_key}")


def lookup(full_key: str) -> dict | None:
    """A stored decision (memory first, then the file), or None."""
    mkey = (str(cache.cache_dir()), full_key)
    if mkey in _memory:
        return _memory[mkey]
    entry = cache.read_json(TUNING_FILE).get(full_key)
    if isinstance(entry, dict) and isinstance(entry.get("choice"), str):
        _memory[mkey] = entry
        return entry
    return None


def store(full_key: str, entry: dict, persist: bool = True) -> None:
    """Keep ``entry`` in memory and, with ``persist``, merge it into ``tuning.json``."""
    _memory[(str(cache.cache_dir()), full_key)] = entry
    if persist:
        cache.update_json(TUNING_FILE, lambda entries: {**entries, full_key: entry})


def _kind_of(full_key: str) -> str:
    """The decision kind in a full key (after the device name and its torch=, threads=
    and malloc= parts)."""
    for part in full_key.split("|")[1:]:
        if not part.startswith(("torch=", "threads=", "malloc=")):
            return part
    return ""


def forget(kinds: Sequence[str] | None = None) -> int:
    """Drop stored decisions, of every device, from this process and ``tuning.json``: all of
    them, or those of ``kinds`` (e.g. ``["fused_network"]``), so that the next call
    measures them again (a decision taken while the machine ran slow for a while sticks
    otherwise). Returns how many the file held."""
    want = None if kinds is None else set(kinds)

    def keep(key: str) -> bool:
        return want is not None and _kind_of(key) not in want
    for mkey in [k for k in _memory if not keep(k[1])]:
        del _memory[mkey]
    for memo in [m for m in _picked if want is None or m[0] in want]:
        del _picked[memo]
    dropped = 0

    def change(entries: dict) -> dict:
        nonlocal dropped
        kept = {k: v for k, v in entries.items() if keep(k)}
        dropped = len(entries) - len(kept)
        return kept
    cache.update_json(TUNING_FILE, change)
    return dropped


def clear_memory() -> None:
    """Forget this process's decisions (the file is left as it is)."""
    _memory.clear()
    _picked.clear()


@contextlib.contextmanager
def forced(choices: dict[str, str | Sequence[str]]) -> Iterator[None]:
    """Inside, a decision of kind ``k`` takes candidate ``choices[k]`` (a name, or names in
    order of preference: the first among the candidates; else the incumbent): nothing is
    run, timed or stored. The deterministic seam for tests
    (``with forced({"tensorial": ["planar", "nhwc"]}): ...``)."""
    _forced.append(dict(choices))
    try:
        yield
    finally:
        _forced.pop()


def _forced_for(kind: str, names: Sequence[str] = ()) -> str | None:
    """The forced choice of ``kind`` among ``names`` (their first, the incumbent, when no
    preference is among them), or None when ``kind`` is not forced."""
    for table in reversed(_forced):
        if kind in table:
            want = table[kind]
            prefs = [want] if isinstance(want, str) else list(want)
            return next((n for n in prefs if n in names), names[0] if names else None)
    return None


@torch.no_grad()
def measure(candidates: Sequence[Candidate], *, kind: str, device: str = "cpu",
            rounds: timing.TimingConfig | None = None,
            confirm: timing.TimingConfig | None = None, margin: float | None = None,
            reference: Any = None, rejected: dict[str, str] | None = None) -> Decision:
    """Verify and time ``candidates`` (the first is the incumbent) by the module's rules;
    no cache. ``reference``: the expected output (default: the incumbent's);
    ``rejected``: candidates ruled out before (name -> reason), reported with the rest.
    A lone incumbent is still timed (its time is reported)."""
    if not candidates:
        raise ConvgapError(f"{kind}: no candidate to choose from")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ConvgapError(f"{kind}: candidate names must be distinct, got {names}")
    rounds = rounds or config.CHOICE_ROUNDS
    confirm = confirm or config.CONFIRM_ROUNDS
    margin = config.MARGIN if margin is None else margin
    incumbent = candidates[0]
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    common = dict(threads=torch.get_num_threads(),
                  malloc=allocator.policy() if device == "cpu" else None, measured_at=now)
    want = _forced_for(kind, names)
    if want is not None:
        return Decision(want, forced=True, **common)
    ref = incumbent.fn() if reference is None else reference
    kept, errors, rejected = [incumbent], {}, dict(rejected or {})
    for c in candidates[1:]:
        try:
            y = c.fn()
        except Exception as exc:  # a broken candidate must not stop the choice
            rejected[c.name] = f"failed: {type(exc).__name__}: {exc}"
            continue
        err = relative_error(y, ref)
        errors[c.name] = err
        dtype = ref.dtype if isinstance(ref, torch.Tensor) else torch.float32
        tol = tolerance(c.tolerance, dtype, device)
        if err > tol:
            rejected[c.name] = f"relative error {err:.2e} > tolerance {tol:.0e}"
            continue
        kept.append(c)
    results = timing.compare([c.fn for c in kept], rounds, device)
    times = {c.name: t.median for c, t in zip(kept, results)}
    best = min(times, key=times.get)
    check = None
    if best != incumbent.name:
        # round robin penalises whoever runs after a cache-thrashing neighbour: confirm the
        # winner head to head against the incumbent alone
        winner = next(c for c in kept if c.name == best)
        t_best, t_inc = timing.compare([winner.fn, incumbent.fn], confirm, device)
        ratio = timing.paired_ratio(t_best, t_inc)
        check = {"chosen_s": t_best.median, "incumbent_s": t_inc.median, "ratio": ratio}
        if ratio > 1 - margin:
            best = incumbent.name
    return Decision(best, times, errors, rejected, check, **common)


def choose(candidates: Sequence[Candidate], *, kind: str, spec_key: Any,
           device: str = "cpu", persist: bool = True, usable: Callable[[str], bool] | None = None,
           **rules: Any) -> Decision:
    """The decision for the operation ``spec_key`` (a string, or a tuple of plain values
    that spells the operation's full spec) of ``kind`` among ``candidates`` (the first is
    the incumbent): from the cache when a stored choice is still among the candidates (and
    ``usable``), else measured (:func:`measure`) and stored by name. ``rules``: ``rounds``,
    ``confirm``, ``margin``, ``reference`` for :func:`measure`."""
    names = {c.name for c in candidates}
    full = cache_key(f"{kind}|{spec_key}", device)
    if _forced_for(kind, [c.name for c in candidates]) is None:
        entry = lookup(full)
        if entry is not None and entry["choice"] in names and (
                usable is None or usable(entry["choice"])):
            return Decision.from_dict(entry)
    decision = measure(candidates, kind=kind, device=device, **rules)
    if not decision.forced:
        store(full, decision.to_dict(), persist)
    return decision


_picked: dict[tuple, str] = {}  # (kind, spec_key, threads, device) -> name


def pick(fns: dict[str, Callable[[], Any]], *, kind: str, spec_key: tuple,
         device: str = "cpu", **rules: Any) -> Callable[[], Any]:
    """The chosen callable of ``fns`` (name -> zero-argument callable, the incumbent
    first), for hot paths that ask on every call: a process memo keyed by the spec tuple,
    the thread count and the device fronts :func:`choose` (which builds the string key,
    with the malloc policy, and reads the file only on a miss)."""
    if _forced:
        want = _forced_for(kind, list(fns))
        if want is not None:
            return fns[want]
    memo = (kind, spec_key, torch.get_num_threads(), device)
    name = _picked.get(memo)
    if name is None:
        cands = [Candidate(n, f) for n, f in fns.items()]
        name = _picked[memo] = choose(cands, kind=kind, spec_key=spec_key, device=device,
                                      **rules).choice
    return fns[name]
