"""Augmentation and normalization as plain callables on image tensors.

Each transform takes a float tensor (..., C, H, W) (one image, or a batch transformed
alike) and returns one of the same shape. The random ones draw from ``generator`` (a
``torch.Generator``) when given, else from torch's global RNG; a DataLoader seeds the global
RNG of each worker process from the main process's, so ``torch.manual_seed`` makes a run
repeatable either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConvgapError

__all__ = ["Compose", "RandomCrop", "RandomFlip", "Normalize", "augment", "normalize"]

Transform = Callable[[torch.Tensor], torch.Tensor]


class Compose:
    """Apply ``transforms`` in order."""

    def __init__(self, *transforms: Transform):
        self.transforms = transforms

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            image = t(image)
        return image

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.transforms))})"


class RandomCrop:
    """Pad the image by ``padding`` pixels of zeros on every side, then cut out an
    H x W window at a uniformly random offset (the image shifted by up to ``padding``
    pixels each way, the uncovered border zero)."""

    def __init__(self, padding: int, generator: torch.Generator | None = None):
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ConvgapError(f"padding must be an integer >= 0 (pixels), got {padding!r}")
        self.padding, self.generator = padding, generator

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        p = self.padding
        if p == 0:
            return image
        h, w = image.shape[-2:]
        top, left = torch.randint(0, 2 * p + 1, (2,), generator=self.generator).tolist()
        return F.pad(image, (p, p, p, p))[..., top:top + h, left:left + w]

    def __repr__(self) -> str:
        return f"RandomCrop(padding={self.padding})"


class RandomFlip:
    """Mirror the image left-right (the last axis) with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        if not 0.0 <= p <= 1.0:
            raise ConvgapError(f"flip probability must be in [0, 1], got {p!r}")
        self.p, self.generator = p, generator

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand((), generator=self.generator).item() < self.p:
            return image.flip(-1)
        return image

    def __repr__(self) -> str:
        return f"RandomFlip(p={self.p})"


class Normalize:
    """``(image - mean) / std`` per channel (``mean``, ``std``: one value per channel, in
    the image's units, e.g. [0, 1] intensity)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        mean_t = torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.as_tensor(std, dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.shape != std_t.shape or len(mean_t) == 0:
            raise ConvgapError(f"mean and std must be equal-length lists, one value per "
                               f"channel; got {list(mean)} and {list(std)}")
        if not bool((std_t > 0).all()):
            raise ConvgapError(f"std must be positive in every channel, got {list(std)}")
        self.mean, self.std = mean_t[:, None, None], std_t[:, None, None]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-3] != len(self.mean):
            raise ConvgapError(f"Normalize has {len(self.mean)} channels, the image "
                               f"{image.shape[-3]} (shape {tuple(image.shape)})")
        return (image - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def augment(padding: int = 4, flip: bool = True,
            generator: torch.Generator | None = None) -> Transform:
    """The standard training augmentation: :class:`RandomCrop` with ``padding`` pixels,
    then (when ``flip``) a left-right :class:`RandomFlip` with probability 0.5."""
    crop = RandomCrop(padding, generator)
    return Compose(crop, RandomFlip(0.5, generator)) if flip else crop


def normalize(mean: Sequence[float], std: Sequence[float]) -> Normalize:
    """Per-channel normalization ``(image - mean) / std``: see :class:`Normalize`."""
    return Normalize(mean, std)
