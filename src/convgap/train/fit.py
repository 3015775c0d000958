"""The training loop: one process or several under torchrun, distillation, exact resume."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import ConvgapError
from ..progress import make_progress
from . import checkpoint as ckpt_io
from .distributed import Group, choose_device, gather, join, leave, share_buffers, sum_over
from .evaluate import evaluate
from .history import EpochRecord, History
from .losses import check_labels, distillation_loss
from .optim import make_optimizer, make_schedule, param_groups

__all__ = ["fit"]

ExtraLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor]


def fit(model: nn.Module, train: Dataset, val: Dataset, *, epochs: int, batch_size: int,
        lr: float, optimizer: str = "sgd", schedule: str = "cosine", warmup: float = 0,
        weight_decay: float | None = None, momentum: float = 0.9,
        teacher: nn.Module | None = None, kd_alpha: float = 0.5, kd_temperature: float = 4.0,
        extra_loss: ExtraLoss | None = None, checkpoint: str | os.PathLike | None = None,
        resume: bool = True, device: str | torch.device | None = None, workers: int = 0,
        seed: int = 0, log: str | os.PathLike | None = None, quiet: bool = False,
        sync_batchnorm: bool = False) -> History:
    """Train ``model`` (in place) on ``train`` for ``epochs`` epochs, validating on ``val``
    after each; return the :class:`History` (losses in nats per image, accuracies as
    fractions in [0, 1], throughput in images per second).

    - Batches: ``batch_size`` is the *global* batch, images per optimizer step over all
      processes (each of N processes takes ``batch_size / N``; it must divide). The
      training order is a permutation seeded from (``seed``, epoch): the same global
      batches for any number of processes (when the dataset size is a multiple of N:
      PyTorch's DistributedSampler repeats a few images otherwise); the last batch of an
      epoch may be smaller. The training loss reported is the objective minimised
      (cross-entropy, or the distillation loss, plus ``extra_loss``).
    - ``optimizer``: ``"sgd"`` (``momentum``) or ``"adamw"``; ``weight_decay`` None is 5e-4
      for SGD, 1e-2 for AdamW. ``lr`` is the peak learning rate. The schedule steps per
      optimizer step: ``warmup`` *epochs* (a float; rounded to whole steps) of linear
      warm-up, then ``schedule``: ``"cosine"`` (to 0 at the end) or ``"constant"``.
    - ``teacher``: distil from it (frozen: moved to the device, put in eval mode and run
      under ``no_grad``); the loss is ``(1 - kd_alpha) * CE + kd_alpha * kd_temperature**2 *
      KL(teacher || student)`` at temperature ``kd_temperature``
      (:func:`~convgap.train.losses.distillation_loss`). A teacher with another number of
      classes is a :class:`ConvgapError`.
    - ``extra_loss(model, inputs, outputs, step)`` (``step``: optimizer steps so far, from
      0; ``model`` the bare model, never the DistributedDataParallel wrapper) returns a
      scalar tensor added to the loss, e.g. a dynamic network's budget term.
    - ``checkpoint``: a file written atomically after every epoch (by rank 0). With
      ``resume`` and an existing file the run continues from it *exactly*: model,
      optimizer, schedule, epoch and random states are restored (bitwise the same weights as
      an uninterrupted run with ``workers=0``, the same number of processes and
      deterministic kernels). A checkpoint of another architecture, optimizer or seed is a
      :class:`ConvgapError` and nothing is loaded. ``resume=False`` overwrites it.
    - ``seed``: a fresh run seeds torch, Python's ``random`` and NumPy's global generators
      with ``seed + rank`` (the model's initial weights are the caller's).
    - ``device``: None takes this process's GPU if CUDA is available, else the CPU.
      ``workers``: data-loading processes (0: load in this process).
    - ``log``: a JSON file holding the history, rewritten (atomically) after every epoch.
      ``quiet``: no progress bar (there is none either when stderr is not a terminal).
    - Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised if needed
      (gloo on the CPU, NCCL on CUDA) and ended again afterwards if this call began it;
      the model runs in :class:`~torch.nn.parallel.DistributedDataParallel`, metrics are
      summed over processes, rank 0 alone writes the checkpoint and the log.
      ``sync_batchnorm`` converts batch-norm layers to :class:`~torch.nn.SyncBatchNorm`
      (statistics over the global batch; CUDA only, as PyTorch's; ignored in one process;
      the model keeps the converted layers).
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConvgapError(f"{name} must be a positive integer, got {value!r}")
    for name, data in (("training", train), ("validation", val)):
        if len(data) == 0:
            raise ConvgapError(f"the {name} dataset is empty; give it images")
    if not 0 <= kd_alpha <= 1 or kd_temperature <= 0:
        raise ConvgapError(f"kd_alpha must be in [0, 1] and kd_temperature > 0, got "
                           f"{kd_alpha} and {kd_temperature}")
    dev = choose_device(device)
    group = join(dev)
    try:
        return _fit(model, train, val, group, dev, epochs=epochs, batch_size=batch_size,
                    lr=lr, optimizer=optimizer, schedule=schedule, warmup=warmup,
                    weight_decay=weight_decay, momentum=momentum, teacher=teacher,
                    kd_alpha=kd_alpha, kd_temperature=kd_temperature, extra_loss=extra_loss,
                    checkpoint=checkpoint, resume=resume, workers=workers, seed=seed,
                    log=log, quiet=quiet, sync_batchnorm=sync_batchnorm)
    finally:
        leave(group)


def _fit(model: nn.Module, train: Dataset, val: Dataset, group: Group, dev: torch.device, *,
         epochs: int, batch_size: int, lr: float, optimizer: str, schedule: str, warmup: float,
         weight_decay: float | None, momentum: float, teacher: nn.Module | None,
         kd_alpha: float, kd_temperature: float, extra_loss: ExtraLoss | None,
         checkpoint: str | os.PathLike | None, resume: bool, workers: int, seed: int,
         log: str | os.PathLike | None, quiet: bool, sync_batchnorm: bool) -> History:
    world, rank = group.world_size, group.rank
    if batch_size % world:
        raise ConvgapError(f"the global batch_size {batch_size} must be a multiple of the "
                           f"number of processes ({world})")
    if group.main:
        for path, what in ((checkpoint, "checkpoint"), (log, "log")):
            if path is not None:
                ckpt_io.check_writable(path, what)

    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    np.random.seed(seed + rank)

    net = model.to(dev)
    if sync_batchnorm and group.distributed:
        if dev.type == "cpu":
            raise ConvgapError("sync_batchnorm needs CUDA (PyTorch's SyncBatchNorm does not "
                               "run on the CPU); drop it, or train on GPUs")
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if teacher is not None:
        teacher.to(dev).eval()

    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    order = torch.Generator()  # the loader's worker seeds, reseeded per epoch like the sampler
    loader = DataLoader(train, batch_size=batch_size // world, sampler=sampler,
                        num_workers=workers, generator=order, pin_memory=dev.type == "cuda")
    steps_per_epoch = len(loader)
    opt = make_optimizer(optimizer, param_groups(net, lr), lr, weight_decay, momentum)
    sched = make_schedule(opt, schedule, epochs * steps_per_epoch,
                          round(warmup * steps_per_epoch))

    start, step, rows = 0, 0, []
    if checkpoint is not None and resume and Path(checkpoint).exists():
        saved = ckpt_io.read(checkpoint)
        ckpt_io.restore(saved, checkpoint, net, opt, sched, optimizer, seed)
        start, step = saved["epoch"], saved["step"]
        rows = History.from_dict(saved["history"]).epochs
        if rank < len(saved["rng"]):
            ckpt_io.set_rng_state(saved["rng"][rank])
    runner: nn.Module = net
    if group.distributed:
        runner = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda"
                                         else None)

    progress = make_progress(quiet or not group.main)
    with progress:
        task = progress.add_task("training", total=(epochs - start) * steps_per_epoch)
        for epoch in range(start, epochs):
            began = time.perf_counter()
            sampler.set_epoch(epoch)
            order.manual_seed(seed + epoch)
            runner.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
            correct = torch.zeros((), dtype=torch.int64, device=dev)
            seen, shown = 0, began
            for x, y in loader:
                x, y_dev = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                out = runner(x)
                check_labels(y, out.shape[-1])
                if teacher is None:
                    loss = F.cross_entropy(out, y_dev)
                else:
                    with torch.no_grad():
                        soft = teacher(x)
                    loss = distillation_loss(out, soft, y_dev, kd_alpha, kd_temperature)
                if extra_loss is not None:
                    loss = loss + extra_loss(net, x, out, step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                loss_sum += loss.detach() * len(y)
                correct += (out.detach().argmax(dim=-1) == y_dev).sum()
                seen += len(y)
                progress.advance(task)
                if not progress.disable and time.perf_counter() - shown > 0.5:
                    shown = time.perf_counter()
                    progress.update(task, description=_describe(
                        epoch, epochs, loss_sum.item() / seen, correct.item() / seen,
                        seen * world / (shown - began)))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            train_s = time.perf_counter() - began
            total_loss, total_correct, total_seen = sum_over(
                [loss_sum.item(), correct.item(), seen], dev)
            share_buffers(net)  # validate, and save, rank 0's batch-norm statistics
            checked = evaluate(net, val, batch_size=batch_size // world, workers=workers)
            rows.append(EpochRecord(
                epoch=epoch + 1, train_loss=total_loss / total_seen,
                train_top1=total_correct / total_seen, val_loss=checked.loss,
                val_top1=checked.top1, images_per_s=total_seen / train_s,
                lr=opt.param_groups[0]["lr"], seconds=time.perf_counter() - began))
            progress.update(task, description=_describe(
                epoch, epochs, rows[-1].train_loss, rows[-1].val_top1,
                rows[-1].images_per_s, "val acc"))
            if checkpoint is not None:
                rng = gather(ckpt_io.rng_state())  # every process's, for rank 0 to save
            if group.main and checkpoint is not None:
                ckpt_io.save(checkpoint, model=net, optimizer=opt, scheduler=sched,
                             epoch=epoch + 1, step=step, seed=seed, optimizer_name=optimizer,
                             rng=rng, history=History(rows).to_dict())
            if group.main and log is not None:
                History(rows).to_json(log)
    return History(rows)


def _describe(epoch: int, epochs: int, loss: float, accuracy: float, rate: float,
              what: str = "acc") -> str:
    return (f"epoch {epoch + 1}/{epochs}  loss {loss:.3f}  {what} {accuracy:.1%}  "
            f"{rate:,.0f} img/s")
