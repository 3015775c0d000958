"""``image_folder``: the user's own images, one sub-folder per class, decoded with Pillow.

``path/cat/1.jpg, path/dog/7.png, ...``: the class names are the sub-folders' names, sorted,
and a class's label is its position in that order. Files are found recursively inside each
class folder by extension (:data:`EXTENSIONS`, any case); hidden files and folders (a name
starting with ".") are ignored. At construction every file is opened and checked with
Pillow's ``verify`` (it reads the header and, for PNG, the checksums, without decoding the
pixels): files that fail are skipped with one warning that counts them. An image is decoded
on each access, converted to RGB, its shorter side resized to ``image_size`` (bilinear) and
its centre cropped to a square, as a float32 (3, image_size, image_size) tensor in [0, 1].
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConvgapError

__all__ = ["EXTENSIONS", "ImageFolder", "image_folder"]

#: The file name endings read as images (compared lower-case).
EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                        ".ppm", ".pgm"})


class ImageFolder(Dataset):
    """``(image, label)`` pairs from ``samples`` (a list of (file, label)); ``classes``:
    the class names in label order. Build it with :func:`image_folder`."""

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], image_size: int,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.samples, self.classes = samples, classes
        self.image_size, self.transform = image_size, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                image = _square(img.convert("RGB"), self.image_size)
        except OSError as e:
            raise ConvgapError(f"cannot decode image {path} ({e}); remove or replace it") from e
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
        tensor = pixels.permute(2, 0, 1).float().div_(255.0)
        if self.transform is not None:
            tensor = self.transform(tensor)
        return tensor, label


def _square(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` px (bilinear), then crop the centre square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # Pillow raises many kinds (OSError, SyntaxError, struct.error, ...)
        return False


def _files(folder: Path) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / n for n in sorted(names)
                  if not n.startswith(".") and Path(n).suffix.lower() in EXTENSIONS]
    return found


def image_folder(path: str | os.PathLike, image_size: int, split: str | None = None, *,
                 val_fraction: float = 0.1, seed: int = 0,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> ImageFolder:
    """The images under ``path`` (one sub-folder per class; see the module docstring) as a
    Dataset of float32 (3, image_size, image_size) tensors in [0, 1] and int labels.

    ``split``: None for every image; ``"train"`` or ``"val"`` for one side of a split that
    puts ``round(val_fraction * n)`` of each class's n images (at most n - 1) in val, chosen
    by a ``seed``-ed shuffle, so the two calls with the same seed partition the images.
    ``transform``: a callable applied to each image tensor (e.g. :func:`augment`).
    """
    root = Path(path)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConvgapError(f"image_size must be a positive integer (pixels), got {image_size!r}")
    if split not in (None, "train", "val"):
        raise ConvgapError(f"split must be None, 'train' or 'val', got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ConvgapError(f"val_fraction must be between 0 and 1, got {val_fraction!r}")
    if not root.is_dir():
        raise ConvgapError(f"image folder {root} does not exist or is not a folder; pass a "
                           f"folder with one sub-folder of images per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ConvgapError(f"image folder {root} has no class sub-folders; put each class's "
                           f"images in its own sub-folder ({root}/<class name>/<image>)")
    samples, bad, empty = [], [], []
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        checked = [(f, _readable(f)) for f in _files(root / name)]
        good = [f for f, ok in checked if ok]
        bad += [f for f, ok in checked if not ok]
        if not good:
            empty.append(name)
            continue
        if split is not None:
            n_val = min(round(val_fraction * len(good)), len(good) - 1)
            val = set(rng.permutation(len(good))[:n_val].tolist())
            good = [f for i, f in enumerate(good) if (i in val) == (split == "val")]
        samples += [(f, label) for f in good]
    if empty:
        raise ConvgapError(
            f"image folder {root}: class folder(s) {', '.join(empty)} hold no readable "
            f"images ({', '.join(sorted(EXTENSIONS))}); add images or remove the folder(s)")
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image(s) under {root} "
                      f"(e.g. {bad[0]})", stacklevel=2)
    return ImageFolder(samples, classes, image_size, transform)
