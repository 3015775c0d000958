"""Datasets and tensor transforms for training (no downloads, no torchvision).

- :func:`shapes` -- a seeded, generated classification dataset (class-defining shapes and
  textures on cluttered backgrounds), as (train, val) torch Datasets.
- :func:`image_folder` -- the user's own images, one sub-folder per class, decoded with
  Pillow.
- :func:`augment` / :func:`normalize` -- random crop and flip, per-channel normalization:
  plain callables on (C, H, W) float tensors, passed to a dataset as ``transform``.

Images are float32 (C, H, W) tensors with values in [0, 1] (before normalization), labels
ints in [0, number of classes).
"""

from .augment import Compose, Normalize, RandomCrop, RandomFlip, augment, normalize
from .folder import ImageFolder, image_folder
from .shapes import CLASSES, Shapes, shapes

__all__ = ["shapes", "image_folder", "augment", "normalize", "Shapes", "ImageFolder",
           "CLASSES", "Compose", "RandomCrop", "RandomFlip", "Normalize"]
