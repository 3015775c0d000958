"""The timing discipline: sample counts, interleaving, thread setting, statistics."""

import types

import pytest
import torch

from convgap import timing


@pytest.fixture
def clock(monkeypatch):
    """timing's clock made a counter that only the timed callables advance
    (``clock(seconds)``): durations exact, no wall clock. Dyadic durations keep the sums
    exact too."""
    now = [0.0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def advance(seconds: float) -> None:
        now[0] += seconds
    return advance


def test_measure_takes_min_repeats_and_warms_up():
    calls = []
    cfg = timing.TimingConfig(warmup=3, min_repeats=4, max_repeats=10, min_time=0.0)
    t = timing.measure(lambda: calls.append(1), cfg)
    assert len(t.samples) == 4 and len(calls) == 7


def test_measure_respects_min_time_and_max_repeats(clock):
    step = 2.0 ** -8  # seconds per call
    cfg = timing.TimingConfig(warmup=0, min_repeats=2, max_repeats=50, min_time=6 * step)
    t = timing.measure(lambda: clock(step), cfg)
    assert t.samples == (step,) * 6  # min_time reached after 6 calls, past min_repeats
    cfg = timing.TimingConfig(warmup=0, min_repeats=2, max_repeats=3, min_time=10.0)
    assert len(timing.measure(lambda: clock(step), cfg).samples) == 3


def test_compare_interleaves_alternating_order():
    """Warm-up in order, then rounds alternate forward / reversed so neither callable always
    runs first (the first of a round reads slower); samples go to the right callable."""
    order = []
    cfg = timing.TimingConfig(warmup=1, min_repeats=4, max_repeats=4, min_time=0.0)
    fns = [lambda: order.append("a"), lambda: order.append("b"), lambda: order.append("c")]
    ta, tb, tc = timing.compare(fns, cfg)
    assert order == list("abc") + list("abc" "cba" "abc" "cba")
    assert len(ta.samples) == len(tb.samples) == len(tc.samples) == 4



def test_compare_settles_each_callable_before_its_samples(clock):
    """With ``settle``, each sample follows untimed calls of the same callable lasting at
    least ``settle`` seconds (so it is not the first call after another engine's)."""
    step = 2.0 ** -8
    order = []

    def make(name):
        def fn():
            order.append(name)
            clock(step)
        return fn
    cfg = timing.TimingConfig(warmup=0, min_repeats=2, max_repeats=2, min_time=0.0,
                              settle=3 * step)
    ta, tb = timing.compare([make("a"), make("b")], cfg)
    # 3 untimed calls reach the settle time, then the timed one: 4 calls in a row each
    assert order == list("aaaa" "bbbb" "bbbb" "aaaa")
    assert ta.samples == tb.samples == (step, step)
    with pytest.raises(ValueError):
        timing.TimingConfig(settle=-1.0)

def test_compare_assigns_samples_to_their_callable(clock):
    cfg = timing.TimingConfig(warmup=0, min_repeats=4, max_repeats=4, min_time=0.0)
    fast, slow = timing.compare([lambda: clock(2.0 ** -10), lambda: clock(2.0 ** -7)], cfg)
    assert fast.samples == (2.0 ** -10,) * 4 and slow.samples == (2.0 ** -7,) * 4


def test_threads_context_sets_and_restores():
    before = torch.get_num_threads()
    with timing.threads(1) as n:
        assert n == 1 == torch.get_num_threads()
        t = timing.measure(lambda: None, timing.QUICK)
        assert t.threads == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError):
        with timing.threads(0):
            pass


def test_statistics():
    t = timing.Timing(samples=(3.0, 1.0, 2.0, 10.0), threads=2)
    assert t.median == 2.5 and t.min == 1.0 and t.median_ms == 2500.0
    assert t.iqr > 0
    with pytest.raises(ValueError):
        timing.TimingConfig(min_repeats=5, max_repeats=2)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    """Not a ratio of medians: a round where both ran slow cancels out."""
    a = timing.Timing((1.0, 2.0, 10.0), 1)
    b = timing.Timing((2.0, 2.0, 5.0), 1)
    assert timing.paired_ratio(a, b) == 1.0          # rounds: 0.5, 1.0, 2.0
    assert a.median / b.median == 1.0
    c = timing.Timing((1.0, 1.1, 4.0), 1)
    d = timing.Timing((2.0, 2.0, 4.0), 1)            # rounds: 0.5, 0.55, 1.0
    assert timing.paired_ratio(c, d) == pytest.approx(0.55)
    assert c.median / d.median == pytest.approx(0.55)
    e = timing.Timing((1.0, 3.0, 3.0), 1)
    f = timing.Timing((1.0, 1.0, 6.0), 1)            # rounds: 1, 3, 0.5 -> 1; medians: 3
    assert timing.paired_ratio(e, f) == 1.0 and e.median / f.median == 3.0


def test_compare_graphs_refuses_cpu_and_bad_call_counts():
    """CUDA-graph timing exists only on a CUDA device; nothing runs before the refusal."""
    calls = []
    with pytest.raises(ValueError, match="not a CUDA device"):
        timing.compare_graphs([lambda: calls.append(1)], device="cpu")
    with pytest.raises(ValueError, match="calls must be >= 1"):
        timing.compare_graphs([lambda: calls.append(1)], device="cuda", calls=0)
    assert calls == []
