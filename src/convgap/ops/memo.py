"""Results kept per weight: computed once, reused while the weights are unchanged.

"Unchanged" means the same tensor (identity), at the same version counter (no in-place
change through autograd-visible ops, ``load_state_dict``, optimizers) and on the same
storage (``weight.data = t`` replaces it). A memo entry holds its tensors, so no other
tensor can take their identity or memory meanwhile. Writes through
``weight.data.<op>_()`` bypass the version counter: the layers' ``refresh()`` drops their
memos after those.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["signature", "reuse", "reuse_weight", "MAX_MISSES"]

MAX_MISSES = 2  # a weight that changed this often between calls stops being kept


def signature(tensors: Sequence[torch.Tensor]) -> list:
    """Identity, version counter and memory of each tensor: equal while none of them was
    replaced, modified in place (through autograd-visible ops) or given new storage. (A
    list, not a tuple: fused layers check it on every call.)"""
    return [(id(t), t._version, t.data_ptr()) for t in tensors]


def reuse(store: dict, slot, tensors: Sequence[torch.Tensor],
          compute: Callable[[], torch.Tensor], extra: tuple = ()) -> torch.Tensor:
    """``compute()``, kept in ``store[slot]`` as ``(signature, tensors, result)`` and
    returned again while each of ``tensors`` is the same tensor (identity, version
    counter, storage) and ``extra`` is equal. The entry holds the tensors, so no other
    tensor can take their identity or memory meanwhile."""
    sig = [(id(t), t._version, t.data_ptr()) for t in tensors]  # signature(), inlined
    if extra:
        sig.append(extra)
    hit = store.get(slot)
    if hit is None or hit[0] != sig:
        hit = store[slot] = (sig, tuple(tensors), compute())
    return hit[2]


def reuse_weight(store: dict | None, w: torch.Tensor, key,
                 build: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """``build()`` (a form of ``w`` for ``key``: e.g. ``w`` packed by oneDNN for a row
    count or an input shape), kept in ``store`` (one entry: one per caller) and reused
    while ``w`` is the same memory at the same version with the same shape and strides and
    ``key`` is equal. A weight built afresh on every call never hits: after
    :data:`MAX_MISSES` misses the store gives up and returns None (the caller then runs
    on ``w`` as it is), as it does without a store."""
    if store is None or store.get("misses", 0) >= MAX_MISSES:
        return None
    sig = (w.data_ptr(), w._version, w.shape, w.stride(), key)
    hit = store.get("w")
    if hit is None or hit[0] != sig:
        if hit is not None:
            store["misses"] = store.get("misses", 0) + 1
        # the entry holds ``w`` itself, so its memory cannot pass to a look-alike tensor
        hit = store["w"] = (sig, w, build())
    return hit[2]
