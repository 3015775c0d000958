"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is one file written by ``torch.save`` after every epoch, atomically (a
temporary file in the same folder renamed over the old one, so an interruption leaves the
previous checkpoint whole). It holds the model's ``state_dict``, the optimizer's and the
schedule's, the number of finished epochs and optimizer steps, the seed and optimizer name
of the run, the history so far and, per process, the random number generator states (torch
CPU, every CUDA device, Python's ``random``, NumPy's global generator). Everything in it is a
tensor, a number, a string or a list/dict of those, so it is read back with
``torch.load(..., weights_only=True)``: no pickled code runs when a checkpoint is loaded.
The data order needs no stored state: the sampler is reseeded from (seed, epoch) each epoch.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .. import models
from ..cache import write_atomic
from ..errors import ConvgapError

__all__ = ["FORMAT", "check_writable", "rng_state", "set_rng_state", "save", "read", "restore"]

FORMAT = "convgap.train/1"


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """:class:`ConvgapError` unless the file ``path`` (``what`` it is, for the message) can
    be written: it is not a folder, and its folder exists and is writable or can be
    created under the nearest existing one. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise ConvgapError(f"the {what} path {path} is a folder; give a file name")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConvgapError(f"cannot write the {what} {path}: {parent} is a file, not a folder; "
                           "choose another output folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (
            path.exists() and not os.access(path, os.W_OK)):
        raise ConvgapError(f"cannot write the {what} {path}: {parent} is not writable; "
                           "choose another output folder")
    return path


def rng_state() -> dict[str, Any]:
    """This process's random generator states, as tensors and numbers only."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": np_state["has_gauss"],
                  "gauss": np_state["gauss"]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back the generator states of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and \
            len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})


def save(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, step: int, seed: int,
         optimizer_name: str, rng: list[dict[str, Any]], history: dict) -> Path:
    """Write the checkpoint of a run after ``epoch`` finished epochs and ``step`` optimizer
    steps (``rng``: one :func:`rng_state` per process, by rank; ``history``: the run's
    :meth:`History.to_dict <convgap.train.History.to_dict>`)."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "epoch": epoch, "step": step, "seed": seed,
                "optimizer_name": optimizer_name, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng, "history": history}, buffer)
    return write_atomic(path, lambda fh: fh.write(buffer.getbuffer()))


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path`` (loaded on the CPU with ``weights_only=True``)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConvgapError(f"cannot read the checkpoint {path} ({type(exc).__name__}: "
                           f"{first}); delete it or start without resuming") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ConvgapError(f"{path} is not a convgap training checkpoint (no format "
                           f"{FORMAT!r}); pass model weights with --weights instead, or "
                           "choose another checkpoint path")
    return ckpt


def restore(ckpt: dict[str, Any], path: str | os.PathLike, model: nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
            optimizer_name: str, seed: int) -> None:
    """Load checkpoint ``ckpt`` (read from ``path``) into the model, optimizer and schedule
    after checking it belongs to this run: same architecture (keys and shapes), optimizer
    and seed. A mismatch is a :class:`ConvgapError` and loads nothing."""
    state = models.check_state_dict(model, ckpt["model"], f"the checkpoint {path}")
    if ckpt["optimizer_name"] != optimizer_name or ckpt["seed"] != seed:
        raise ConvgapError(
            f"the checkpoint {path} was written by a run with optimizer "
            f"{ckpt['optimizer_name']!r} and seed {ckpt['seed']}, not {optimizer_name!r} and "
            f"seed {seed}; resume with the same settings or start afresh (resume=False)")
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as exc:
        raise ConvgapError(f"the optimizer state in {path} does not fit this model's "
                           f"parameters ({exc}); start afresh (resume=False)") from exc
    scheduler.load_state_dict(ckpt["scheduler"])
    model.load_state_dict(state, strict=True)
