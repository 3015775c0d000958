"""``shapes``: a seeded, procedurally generated image classification dataset.

Each image holds one *object* whose shape and fill texture define its class (a disc, a
checkered square, a striped triangle, ...; :data:`CLASSES`), at a random position, rotation
and size (its diameter 10-50% of the image side), in a random colour, over a background of
a colour gradient, smooth blotches, stripes and pixel noise, among small *distractor* shapes
of the other kinds. A per-image difficulty spreads the images from large, opaque objects on
calm backgrounds to small, faint ones in heavy clutter; most images are on the easy side, so
the class is visible in most of them. Colours are drawn independently of the class, so the
mean colour says nothing about it.

Image ``i`` of a split depends only on (seed, split, i): it is drawn from its own numpy
generator seeded with that triple, so any image can be made in any order, in any worker
process, and the train and val splits are different streams. Labels cycle through the
classes (image ``i`` has label ``i % num_classes``), so every class has the same count to
within one. Images are quantised to 8 bits like a real photograph, so a cached dataset
(``cache=True``: all images made at construction into one uint8 tensor, 3*H*W bytes each)
returns exactly the images an uncached one does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConvgapError
from .render import KINDS, Canvas, upsampler

__all__ = ["CLASSES", "Shapes", "shapes"]

#: The classes in label order: (shape kind, fill texture).
CLASSES: tuple[tuple[str, str], ...] = (
    ("disc", "solid"), ("square", "checker"), ("triangle", "stripes"), ("cross", "solid"),
    ("ring", "stripes"), ("star", "dots"), ("bars", "solid"), ("crescent", "checker"),
    ("frame", "solid"), ("ellipse", "stripes"), ("corner", "dots"), ("hourglass", "checker"),
)

SPLITS = {"train": 0, "val": 1}
_BLOTCH_GRID = 5  # the coarse noise grid smoothed into background blotches (per side)
_TAU = 2 * math.pi


class Shapes(Dataset):
    """One split of the generated dataset: ``(image, label)`` pairs, the image a float32
    (3, image_size, image_size) tensor in [0, 1], the label an int in [0, num_classes).

    ``transform`` (a callable on the image tensor, e.g. :func:`convgap.data.augment`) is
    applied on every access, after the cache; :meth:`object_box` says where an image's
    object is. Build it with :func:`shapes`.
    """

    def __init__(self, num_classes: int, image_size: int, size: int, seed: int,
                 split: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 cache: bool = False):
        self.num_classes, self.image_size, self.size = num_classes, image_size, size
        self.seed, self.split, self.transform = seed, split, transform
        #: class names, in label order: the shape kinds
        self.classes = [kind for kind, _ in CLASSES[:num_classes]]
        coords = np.arange(image_size, dtype=np.float32)
        self._grid = (coords[None, :], coords[:, None])
        self._blur = upsampler(image_size, _BLOTCH_GRID)
        self._cache: torch.Tensor | None = None
        if cache:
            self._cache = torch.empty((size, 3, image_size, image_size), dtype=torch.uint8)
            for i in range(size):
                self._cache[i] = torch.from_numpy(self._draw(i)[0])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = self._check(index)
        pixels = (self._cache[i] if self._cache is not None
                  else torch.from_numpy(self._draw(i)[0]))
        image = pixels.float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, i % self.num_classes

    def _check(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index must be an integer, got {type(index).__name__}")
        i = int(index) + (self.size if index < 0 else 0)
        if not 0 <= i < self.size:
            raise IndexError(f"index {index} out of range for {self.size} images")
        return i

    def object_box(self, index: int) -> tuple[float, float, float, float]:
        """Where image ``index``'s object is: (left, top, right, bottom) in pixels, its
        centre plus and minus its radius (round shapes fit inside; the corners of square
        ones reach up to 25% of the radius beyond). Redraws the image to find out."""
        cx, cy, radius = self._draw(self._check(index))[1]
        return cx - radius, cy - radius, cx + radius, cy + radius

    def _draw(self, i: int) -> tuple[np.ndarray, tuple[float, float, float]]:
        """Image ``i`` as a uint8 (3, H, W) array, from its own (seed, split, i) stream,
        and its object's centre and radius in pixels."""
        rng = np.random.default_rng([self.seed, SPLITS[self.split], i])
        canvas = Canvas(self.image_size, self._grid)
        kind, texture = CLASSES[i % self.num_classes]
        placed = _draw_image(rng, canvas, self._blur, kind, texture)
        return np.clip(canvas.pixels * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8), placed


def _unit(angle: float) -> tuple[float, float]:
    return math.cos(angle), math.sin(angle)


def _draw_image(rng: np.random.Generator, canvas: Canvas, blur: np.ndarray, kind: str,
                texture: str) -> tuple[float, float, float]:
    """Draw one image of class (kind, texture) on ``canvas`` from ``rng``; return the
    object's centre and radius in pixels."""
    n = canvas.size
    # difficulty in [0, 1], skewed towards easy: it sets object size, opacity and clutter
    hard = rng.random() ** 2
    # the object: diameter 10-50% of the side, placed (almost) inside the image
    diameter = min(max(0.5 - 0.38 * hard + rng.uniform(-0.06, 0.06), 0.1), 0.5)
    radius = diameter * n / 2
    cx, cy = rng.uniform(radius * 0.9, n - radius * 0.9, 2)
    # background: a colour gradient at a random angle, smooth blotches, maybe stripes
    base, far = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
    gx, gy = _unit(rng.uniform(0, _TAU))
    ramp = ((canvas.xs - n / 2) * gx + (canvas.ys - n / 2) * gy) / n + 0.5
    far = (far - base) * rng.random(dtype=np.float32)
    pixels = canvas.pixels
    np.multiply(far[:, None, None], ramp, out=pixels)
    pixels += base[:, None, None]
    coarse = rng.standard_normal((3, _BLOTCH_GRID, _BLOTCH_GRID), dtype=np.float32)
    pixels += blur @ (coarse * (0.04 + 0.14 * hard)) @ blur.T
    if rng.random() < 0.2 + 0.6 * hard:
        period = n * rng.uniform(0.06, 0.2)
        sx, sy = _unit(rng.uniform(0, _TAU))
        phase = (canvas.xs * sx + canvas.ys * sy) * (_TAU / period)
        tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)
        pixels += (tint * rng.uniform(0.03, 0.08 + 0.12 * hard))[:, None, None] * np.sin(phase)
    # distractors: solid shapes of the other kinds, a quarter to half the object's size
    others = [k for k in KINDS if k != kind]
    for _ in range(rng.integers(0, 2 + int(6 * hard))):
        pick = others[rng.integers(len(others))]
        canvas.shape(pick, *rng.uniform(0, n, 2), radius * rng.uniform(0.25, 0.5),
                     rng.uniform(0, _TAU), rng.random(3, dtype=np.float32),
                     rng.uniform(0.5, 1.0))
    # the object, in a colour that stands out from the background's gradient behind it
    behind = base + far * (((cx - n / 2) * gx + (cy - n / 2) * gy) / n + 0.5)
    colour = rng.random(3, dtype=np.float32)
    for _ in range(8):
        if np.abs(colour - behind).sum() >= 0.75:
            break
        colour = rng.random(3, dtype=np.float32)
    second = colour * 0.35 if colour.mean() > 0.5 else colour + (1 - colour) * 0.65
    canvas.shape(kind, cx, cy, radius, rng.uniform(0, _TAU), colour,
                 opacity=1.0 - 0.35 * hard, texture=texture, second=second,
                 period=max(2.5, radius * rng.uniform(0.4, 0.6)))
    # sensor noise over everything: uniform (a sixth of the cost of normal), std 0.01..0.07
    noise = rng.random(pixels.shape, dtype=np.float32)
    noise -= 0.5
    noise *= (0.01 + 0.06 * hard) * math.sqrt(12)
    pixels += noise
    return float(cx), float(cy), radius


def _whole(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ConvgapError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)


def shapes(num_classes: int = 10, image_size: int = 64, train_size: int = 10000,
           val_size: int = 2000, seed: int = 0, *,
           transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
           val_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
           cache: bool = False) -> tuple[Shapes, Shapes]:
    """The generated dataset's (train, val) splits (see the module docstring).

    ``num_classes``: 2 .. len(CLASSES) (the first ones in :data:`CLASSES`);
    ``image_size``: side in pixels (>= 16); ``train_size`` / ``val_size``: images per split;
    ``seed``: a non-negative integer, image ``i`` of a split depends only on (seed, split, i).
    ``transform`` applies to the train images (augmentation, normalization),
    ``val_transform`` to the val images. ``cache=True`` makes every image at construction
    (about 3*H*W bytes each) rather than on each access: worth it when a dataset is read for
    more epochs than it takes to make, or by a DataLoader without worker processes.
    """
    num_classes = _whole("num_classes", num_classes, 2)
    if num_classes > len(CLASSES):
        raise ConvgapError(f"num_classes must be at most {len(CLASSES)} (the shape kinds: "
                           f"{', '.join(k for k, _ in CLASSES)}), got {num_classes}")
    image_size = _whole("image_size", image_size, 16)
    train_size = _whole("train_size", train_size, 1)
    val_size = _whole("val_size", val_size, 1)
    seed = _whole("seed", seed, 0)
    return (Shapes(num_classes, image_size, train_size, seed, "train", transform, cache),
            Shapes(num_classes, image_size, val_size, seed, "val", val_transform, cache))
