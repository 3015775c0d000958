"""convgap.kernels.cpu.tiles.residual_tiles: a residual block's body (optional first conv:
1x1, or k1 x k1 / strided as in a basic block; dense or depthwise k x k; optional 1x1; batch
norms folded) added into the output at kept S x S tiles only, against a float64 torch
reference (the dense body times the tile mask, plus the shortcut): random tile sets, odd
sizes (partial tiles), strides 1 and 2, granularities 1 to 7, both memory formats, every
activation, 1 to 3 threads, tiles in any order; an empty tile list; its errors; its
scratch ending at an unmapped page, and NaNs left in the scratch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convgap.errors import ConvgapError
from convgap.kernels.cpu import common, tiles
from scratch_guard import run_guarded
from tile_cases import case, reference, relative_error

pytestmark = pytest.mark.skipif(not tiles.available(),
                                reason="no AVX-512 CPU or no C compiler here")

ACTS = st.sampled_from([None, "relu", "relu6", "silu", "sigmoid"])


def run_threads(threads, fn):
    """fn() under ``threads`` torch threads and no autograd (the count restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return fn()
    finally:
        torch.set_num_threads(before)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.sampled_from([1, 3]), c=st.integers(1, 40), r=st.integers(1, 40),
       o=st.integers(1, 40), h=st.integers(1, 17), w=st.integers(1, 17),
       k=st.sampled_from([3, 5]), stride=st.sampled_from([1, 2]),
       s=st.sampled_from([1, 2, 3, 4, 7]), depthwise=st.booleans(), first=st.booleans(),
       act1=ACTS, act2=ACTS, x_last=st.booleans(), out_last=st.booleans(),
       density=st.sampled_from([0.2, 0.5, 1.0]), threads=st.sampled_from([1, 2, 3]))
def test_matches_the_masked_dense_body(n, c, r, o, h, w, k, stride, s, depthwise, first,
                                       act1, act2, x_last, out_last, density, threads):
    x, out, kept, body = case(n, c, r, o, h, w, k, stride, s, depthwise, first, act1, act2,
                              x_last, out_last, density)
    want = reference(x, out, kept, s, body)
    got = run_threads(threads, lambda: tiles.residual_tiles(x, out, kept, s, body))
    assert got is out   # in place, in its layout
    assert relative_error(out, want) <= 1e-4


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.sampled_from([1, 2]), c=st.integers(1, 24), r=st.integers(1, 24),
       o=st.integers(1, 24), h=st.integers(1, 15), w=st.integers(1, 15),
       k1=st.sampled_from([1, 3, 5]), stride1=st.sampled_from([1, 2]),
       s=st.sampled_from([1, 2, 4, 7]), depthwise=st.booleans(), last=st.booleans(),
       x_last=st.booleans(), out_last=st.booleans(), density=st.sampled_from([0.3, 1.0]),
       threads=st.sampled_from([1, 2]))
def test_windowed_first_conv_and_no_last_conv(n, c, r, o, h, w, k1, stride1, s, depthwise,
                                              last, x_last, out_last, density, threads):
    """A basic block's body (3x3 of stride 1 or 2, 3x3, no last conv) and its relatives: a
    k1 x k1 or strided first conv from x's windows, the middle conv's output added as it is
    without a last conv."""
    x, out, kept, body = case(n, c, r, o, h, w, 3, 1, s, depthwise, True, "relu", None,
                              x_last, out_last, density, k1=k1, stride1=stride1, last=last)
    want = reference(x, out, kept, s, body)
    got = run_threads(threads, lambda: tiles.residual_tiles(x, out, kept, s, body))
    assert got is out
    assert relative_error(out, want) <= 1e-4


@pytest.mark.parametrize("act", [None, "relu", "relu6", "silu", "sigmoid"])
@pytest.mark.parametrize("depthwise", [False, True])
def test_every_activation_reaches_the_result(act, depthwise):
    """Each activation as act1 and as act2 (the other one none), against the reference;
    and not the identity (the result differs from the body without it)."""
    for first_act, second_act in ((act, None), (None, act)):
        x, out, kept, body = case(2, 19, 24, 21, 13, 11, 3, 1, 2, depthwise, True, first_act,
                                  second_act, True, False, 0.6)
        want = reference(x, out, kept, 2, body)
        got = tiles.residual_tiles(x, out.clone(), kept, 2, body)
        assert relative_error(got, want) <= 1e-4
        if act is not None:
            plain = reference(x, out, kept, 2, body._replace(act1=None, act2=None))
            assert relative_error(got, plain) > 1e-2


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_tile_order(depthwise, threads):
    """Tiles in any order give the sorted order's result: each thread's window of the
    first conv's rows restarts where its next tile is not below the last one."""
    x, out, kept, body = case(3, 12, 20, 10, 17, 13, 3, 1, 2, depthwise, True, "relu",
                              "relu6", False, True, 0.6)
    shuffled = kept[torch.randperm(len(kept), generator=torch.Generator().manual_seed(1))]
    assert not torch.equal(shuffled, kept)
    want = reference(x, out, kept, 2, body)
    got = run_threads(threads, lambda: tiles.residual_tiles(x, out.clone(), shuffled, 2,
                                                            body))
    assert relative_error(got, want) <= 1e-4


def test_empty_tiles_leave_the_output():
    x, out, _, body = case(1, 8, 16, 8, 9, 9, 3, 1, 2, False, True, "relu", "relu", False,
                           True, 0.5)
    want = out.clone()
    got = tiles.residual_tiles(x, out, torch.zeros(0, 3, dtype=torch.long), 2, body)
    assert torch.equal(got, want)


def test_packed_weights_follow_the_weights():
    """With a store, the packed weights are reused, and rebuilt after an in-place change."""
    x, out, kept, body = case(1, 8, 16, 8, 9, 9, 3, 1, 3, False, True, "relu", "relu", True,
                              True, 1.0)
    store: dict = {}
    tiles.residual_tiles(x, out.clone(), kept, 3, body, store)
    body.w3.mul_(2.0)
    got = tiles.residual_tiles(x, out.clone(), kept, 3, body, store)
    assert relative_error(got, reference(x, out, kept, 3, body)) <= 1e-4


def test_bad_arguments_raise():
    x, out, kept, body = case(1, 8, 16, 12, 9, 9, 3, 2, 2, False, True, "relu", "relu", False,
                              False, 1.0)
    call = tiles.residual_tiles
    with pytest.raises(ConvgapError, match="channel counts"):
        call(x[:, :5], out, kept, 2, body)
    with pytest.raises(ConvgapError, match="out must have shape"):
        call(x, out[:, :, :3], kept, 2, body)
    with pytest.raises(ConvgapError, match="contiguous or channels_last"):
        call(x, out.transpose(2, 3), kept, 2, body)
    with pytest.raises(ConvgapError, match="grid"):
        call(x, out, torch.tensor([[0, 3, 0]]), 2, body)
    with pytest.raises(ConvgapError, match="grid"):
        call(x, out, torch.tensor([[1, 0, 0]]), 2, body)
    with pytest.raises(ConvgapError, match=r"\(T, 3\) integers"):
        call(x, out, kept.float(), 2, body)
    with pytest.raises(ConvgapError, match="b3 must have shape"):
        call(x, out, kept, 2, body._replace(b3=torch.zeros(3)))
    with pytest.raises(ConvgapError, match="no b1 nor act1"):
        xr = torch.randn(1, 16, 9, 9)
        call(xr, out, kept, 2, body._replace(w1=None))
    with pytest.raises(ConvgapError, match="unknown activation"):
        call(x, out, kept, 2, body._replace(act2="gelu"))
    with pytest.raises(ConvgapError, match="granularity"):
        call(x, out, kept, 0, body)
    with pytest.raises(ConvgapError, match="k1 odd"):
        call(x, out, kept, 2, body._replace(w1=torch.randn(16, 8, 2, 2)))
    with pytest.raises(ConvgapError, match="no b3"):
        call(x, out, kept, 2, body._replace(w3=None))
    with pytest.raises(ConvgapError, match="float32"):
        call(x.double(), out, kept, 2, body)


def test_ignores_what_the_scratch_held():
    """The first conv's map (pixels no window reads), the padding lanes past R and O: NaNs
    left there must not reach the output."""
    for depthwise, first in ((False, True), (True, True), (True, False), (False, False)):
        x, out, kept, body = case(2, 11, 20, 13, 13, 10, 3, 1, 2, depthwise, first, "silu",
                                  "relu6", True, False, 0.4)
        store: dict = {}
        with torch.no_grad():
            tiles.residual_tiles(x, out.clone(), kept, 2, body, store)
            # the thread's scratch (shared by every kernel call), as the call left it
            common.scratch(store, 1).fill_(float("nan"))
            got = tiles.residual_tiles(x, out.clone(), kept, 2, body, store)
        assert relative_error(got, reference(x, out, kept, 2, body)) <= 1e-4


_GUARDED = r"""
import sys
sys.path.insert(0, TESTS)
from convgap.kernels.cpu import tiles
from tile_cases import case
for threads in (1, 2, 3):
    torch.set_num_threads(threads)
    for s, stride, depthwise, first, xl, ol in [(1, 1, False, True, False, True),
                                                (2, 2, True, True, True, False),
                                                (3, 1, True, False, True, True),
                                                (7, 1, False, True, True, False),
                                                (4, 2, False, False, False, False)]:
        x, out, kept, body = case(2, 10, 13, 9, 11, 9, 3, stride, s, depthwise, first,
                                  "relu", "silu", xl, ol, 0.6)
        run(lambda store: tiles.residual_tiles(x, out.clone(), kept, s, body, store))
    for s, k1, stride1, last in [(1, 3, 2, False), (4, 3, 1, False), (2, 1, 2, True)]:
        x, out, kept, body = case(2, 10, 13, 9, 11, 9, 3, 1, s, False, True, "relu", None,
                                  True, False, 0.6, k1=k1, stride1=stride1, last=last)
        run(lambda store: tiles.residual_tiles(x, out.clone(), kept, s, body, store))
"""


def test_scratch_ending_at_an_unmapped_page(tmp_path: Path):
    """Every read and write of the kernel stays inside its scratch (the last thread's share
    ends at a PROT_NONE page), with the same results as with the usual buffers."""
    here = repr(str(Path(__file__).parent))
    run_guarded(tmp_path, _GUARDED.replace("TESTS", here))
