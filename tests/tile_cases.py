"""The sparse tile kernels' test cases: a residual block's body (:class:`Body`) with random
weights, an input, an output holding a shortcut and a random set of kept tiles, and the
float64 torch reference (the dense body times the tile mask, plus the shortcut). Shared by
the C kernel's tests and the Triton kernels' (run in an interpreted subprocess)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from convgap.kernels.cpu.tiles import Body


TORCH_ACTS = {None: lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu,
              "sigmoid": torch.sigmoid}


def output_size(h: int, w: int, k: int, stride: int) -> tuple[int, int]:
    return (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1


def reference(x, out, kept, s, body: Body):
    """``out + body(x) * mask`` in float64, the mask 1 on the kept tiles' pixels."""
    def f64(t):
        return None if t is None else t.double()
    h = x.double()
    if body.w1 is not None:
        w1 = f64(body.w1) if body.w1.dim() == 4 else f64(body.w1)[..., None, None]
        h = TORCH_ACTS[body.act1](F.conv2d(h, w1, f64(body.b1), body.stride1,
                                           w1.shape[2] // 2))
    k = body.w2.shape[2]
    groups = body.w2.shape[0] if body.depthwise() else 1
    h = TORCH_ACTS[body.act2](F.conv2d(h, f64(body.w2), f64(body.b2), body.stride, k // 2,
                                       1, groups))
    if body.w3 is not None:
        h = F.conv2d(h, f64(body.w3)[..., None, None], f64(body.b3))
    mask = torch.zeros(out.shape[0], 1, *out.shape[2:], dtype=torch.float64)
    for n, ty, tx in kept.tolist():
        mask[n, :, ty * s:(ty + 1) * s, tx * s:(tx + 1) * s] = 1.0
    return out.double() + h * mask


def keep_grid(kept: torch.Tensor, out: torch.Tensor, s: int) -> torch.Tensor:
    """The (N, ceil(OH / S), ceil(OW / S)) keep grid of the tile list ``kept``."""
    keep = torch.zeros(out.shape[0], -(-out.shape[2] // s), -(-out.shape[3] // s))
    if len(kept):
        keep[tuple(kept.t())] = 1.0
    return keep


def relative_error(y, ref) -> float:
    """max |y - ref| / max |ref|"""
    return ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def case(n, c, r, o, h, w, k, stride, s, depthwise, first, act1, act2, x_last, out_last,
         density, seed=0, k1=1, stride1=1, last=True):
    """x, out, the kept tiles (a random ``density`` of the grid) and a body; ``first``
    False: no first conv (then C = R and no act1); ``k1``, ``stride1``: the first conv's
    side and stride; ``last`` False: no last conv (then O = R). Weights scaled so the
    intermediates have a standard deviation of about 2 (relu6 clips, silu and sigmoid see
    both tails)."""
    g = torch.Generator().manual_seed(seed)
    c = c if first else r
    x = torch.randn(n, c, h, w, generator=g)
    o = o if last else r
    w1 = (torch.randn(r, c, *((k1, k1) if k1 > 1 else ()), generator=g) * 2
          / (c * k1 * k1) ** 0.5 if first else None)
    b1 = torch.randn(r, generator=g) if first else None
    fan = k * k * (1 if depthwise else r)
    w2 = torch.randn(r, 1 if depthwise else r, k, k, generator=g) * 2 / fan ** 0.5
    body = Body(w1, b1, w2, torch.randn(r, generator=g),
                      torch.randn(o, r, generator=g) / r ** 0.5 if last else None,
                      torch.randn(o, generator=g) if last else None,
                      stride, act1 if first else None, act2, stride1 if first else 1)
    oh, ow = output_size(*output_size(h, w, k1, body.stride1), k, stride)
    out = torch.randn(n, o, oh, ow, generator=g)
    if x_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if out_last:
        out = out.contiguous(memory_format=torch.channels_last)
    grid = torch.rand(n, -(-oh // s), -(-ow // s), generator=g) < density
    return x, out, grid.nonzero(), body
