"""Drawing primitives for the generated datasets: shape masks, textures and backgrounds.

Everything works on float32 numpy arrays of one image, channels first (3, H, W), values in
[0, 1] (linear intensity, not gamma-corrected), coordinates in pixels with the origin at the
top-left pixel's centre. Shapes are signed distances in *object units* (the shape's radius is
1; negative inside), turned into anti-aliased coverage masks one pixel wide at the edge.
Each drawing call touches only the shape's bounding window, so small shapes cost little.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["KINDS", "TEXTURES", "Canvas", "upsampler"]

Array = np.ndarray


def _rect(u: Array, v: Array, cu: float, cv: float, hu: float, hv: float) -> Array:
    """Signed (Chebyshev) distance to the axis-aligned rectangle centred at (cu, cv)."""
    return np.maximum(np.abs(u - cu) - hu, np.abs(v - cv) - hv)


def _disc(u, v):
    return np.sqrt(u * u + v * v) - 1.0


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) - 0.8


def _triangle(u, v):
    # equilateral, circumradius 1, inradius 0.5: the three edges' outward normals
    return np.maximum(np.maximum(-v, 0.866 * u + 0.5 * v), -0.866 * u + 0.5 * v) - 0.5


def _cross(u, v):
    return np.minimum(_rect(u, v, 0, 0, 0.28, 0.9), _rect(u, v, 0, 0, 0.9, 0.28))


def _ring(u, v):
    rho = np.sqrt(u * u + v * v)
    return np.maximum(rho - 1.0, 0.55 - rho)


def _star(u, v):
    # five sharp points: the radius runs 0.4 .. 1.0 as a triangle wave of the angle
    rho = np.sqrt(u * u + v * v)
    wave = np.abs((np.arctan2(v, u) * (5 / (2 * np.pi))) % 1.0 - 0.5) * 2.0
    return rho - (0.4 + 0.6 * wave)


def _bars(u, v):
    # three parallel bars filling a square: period 0.65, bar width 0.35
    band = np.abs((v + 0.85) % 0.65 - 0.175) - 0.175
    return np.maximum(_rect(u, v, 0, 0, 0.85, 0.85), band)


def _crescent(u, v):
    bite = np.sqrt((u - 0.45) ** 2 + v * v)
    return np.maximum(np.sqrt(u * u + v * v) - 1.0, 0.85 - bite)


def _frame(u, v):
    cheb = np.maximum(np.abs(u), np.abs(v))
    return np.maximum(cheb - 0.85, 0.5 - cheb)


def _ellipse(u, v):
    # semi-axes 1 and 0.45 (the distance is approximate, exact enough for an edge mask)
    return (np.sqrt(u * u + (v / 0.45) ** 2) - 1.0) * 0.45


def _corner(u, v):
    # an L: a vertical and a horizontal bar sharing the lower-left corner
    return np.minimum(_rect(u, v, -0.5, 0, 0.3, 0.85), _rect(u, v, 0, 0.55, 0.85, 0.3))


def _hourglass(u, v):
    # two triangles meeting at their tips
    return np.maximum(np.maximum(np.abs(u) - np.abs(v), np.abs(v) - 0.9), np.abs(u) - 0.8)


#: The shape kinds, in class order: name -> signed distance in object units.
KINDS: dict[str, Callable[[Array, Array], Array]] = {
    "disc": _disc, "square": _square, "triangle": _triangle, "cross": _cross,
    "ring": _ring, "star": _star, "bars": _bars, "crescent": _crescent, "frame": _frame,
    "ellipse": _ellipse, "corner": _corner, "hourglass": _hourglass,
}


def _solid(u, v, period):
    return np.zeros_like(u)


def _stripes(u, v, period):
    return 0.5 + 0.5 * np.sin(u * (2 * np.pi / period))


def _checker(u, v, period):
    w = 2 * np.pi / period
    return 0.5 + 0.5 * np.tanh(4.0 * np.sin(u * w) * np.sin(v * w))


def _dots(u, v, period):
    w = 2 * np.pi / period
    return np.clip(2.0 * (np.cos(u * w) * np.cos(v * w)) - 0.6, 0.0, 1.0)


#: Fill patterns: name -> mix weight in [0, 1] between a shape's two colours, from the
#: object-frame coordinates in pixels and the pattern period in pixels.
TEXTURES: dict[str, Callable[[Array, Array, float], Array]] = {
    "solid": _solid, "stripes": _stripes, "checker": _checker, "dots": _dots,
}


def upsampler(size: int, coarse: int) -> Array:
    """The (size, coarse) bilinear interpolation matrix that stretches ``coarse`` samples
    over ``size`` pixels (``U @ grid @ U.T`` smooths a coarse grid onto the image)."""
    pos = np.linspace(0.0, coarse - 1.0, size)
    low = np.minimum(np.floor(pos).astype(int), coarse - 2)
    frac = pos - low
    out = np.zeros((size, coarse), dtype=np.float32)
    out[np.arange(size), low] = 1.0 - frac
    out[np.arange(size), low + 1] = frac
    return out


class Canvas:
    """One (3, size, size) float32 image being drawn, and the pixel grid it is drawn on."""

    def __init__(self, size: int, grid: tuple[Array, Array]):
        self.size = size
        self.xs, self.ys = grid  # (1, size) and (size, 1) pixel coordinates
        self.pixels = np.empty((3, size, size), dtype=np.float32)

    def shape(self, kind: str, cx: float, cy: float, radius: float, angle: float,
              colour: Array, opacity: float, texture: str = "solid",
              second: Array | None = None, period: float = 4.0) -> None:
        """Blend shape ``kind`` centred at (cx, cy) px, ``radius`` px, rotated by ``angle``
        radians, over the image with ``opacity`` in [0, 1]; ``texture`` mixes ``colour``
        (RGB in [0, 1]) with ``second`` at ``period`` px in the object's own frame."""
        reach = radius * 1.3 + 1.0
        x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, self.size)
        y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, self.size)
        if x0 >= x1 or y0 >= y1:
            return
        dx, dy = self.xs[:, x0:x1] - cx, self.ys[y0:y1] - cy
        c, s = float(np.cos(angle)), float(np.sin(angle))
        u, v = (c * dx + s * dy) / radius, (c * dy - s * dx) / radius
        # distance in pixels -> coverage, 1 inside, 0 outside, a 1 px anti-aliased ramp
        cover = np.clip(0.5 - KINDS[kind](u, v) * radius, 0.0, 1.0) * opacity
        fill = colour[:, None, None]
        if texture != "solid":
            mix = TEXTURES[texture](u * radius, v * radius, period)
            fill = fill + (second - colour)[:, None, None] * mix
        window = self.pixels[:, y0:y1, x0:x1]
        window += (fill - window) * cover
