"""PagedAdamW: AdamW whose two moment estimates live in host memory and visit the GPU per update.

QLoRA (Dettmers et al., 2023, section 3, "Paged Optimizers") adds a third trick to NF4 and double
quantization: the optimizer state is allowed to leave the GPU, so that a memory spike (a long
sequence under gradient checkpointing) does not end the run with an out-of-memory error.

What bitsandbytes does (``bnb.optim.PagedAdamW``): m and v are allocated in CUDA *managed* (unified)
memory. Before each update it prefetches them to the GPU; pages stay there while memory is free, and
only under memory pressure does the driver evict them to host RAM, page by page, and fault them back
in on the next access. Paging is automatic and usually costs nothing.

What this module does (a predictable teaching version, not the same mechanism): on CUDA, m and v
*always* live in page-locked (pinned) host memory (``backend.pinned_empty``). For each parameter's
update its two moments are copied into a small GPU staging buffer, AdamW's update runs there (the
same arithmetic as ``optim.AdamW``, which it calls), and the new moments are copied back. The GPU
therefore holds at most two staging arrays the size of the largest parameter instead of 8 bytes per
trainable parameter, and every step pays 16 bytes of PCIe traffic per trainable parameter (4 bytes
each for m and v, each way), whether memory is short or not. There is no managed memory, no
oversubscription and no eviction policy: simple to reason about, and safe on a shared GPU.

On the CPU (NumPy) there is nothing to page: host memory is the only memory, and ``PagedAdamW`` is
exactly ``AdamW``. ``paged=True`` forces the staging path anyway (the "device" buffers are then host
arrays too), which is how the tests check the paging logic on a machine without a GPU.

For LoRA and QLoRA the state is small (only the adapter factors train), so paging buys little
memory here; the point is the mechanism, and the results, which equal AdamW's bit for bit.
"""
from __future__ import annotations

import numpy as np

from . import backend
from .optim import AdamW

__all__ = ["PagedAdamW"]


def _copy_into(dst, src) -> None:
    """``dst[...] = src`` for same-shape contiguous arrays, across host and device, no temporaries.

    NumPy to NumPy: ``np.copyto``. Host to GPU: the CuPy array's ``set``; GPU to host: its ``get(out=)``
    (the ndarray methods; no CuPy import here). Pinned host memory makes both copies DMA transfers.
    """
    if isinstance(dst, np.ndarray) and isinstance(src, np.ndarray):
        np.copyto(dst, src)
    elif isinstance(src, np.ndarray):
        dst.set(src)                  # host -> device
    elif isinstance(dst, np.ndarray):
        src.get(out=dst)              # device -> host
    else:
        dst[...] = src                # device -> device


class PagedAdamW(AdamW):
    """AdamW with its moments (``exp_avg``, ``exp_avg_sq``) in pinned host memory on CUDA.

    Arguments are AdamW's, plus ``paged``: None (default) pages the state of parameters that live on
    the GPU and keeps CPU parameters' state as plain AdamW does; True pages every parameter (on the
    CPU: through host staging buffers, for tests); False never pages (plain AdamW).

    ``state_dict()`` / ``load_state_dict()`` use AdamW's layout, so a checkpoint moves freely between
    ``AdamW`` and ``PagedAdamW``. ``host_state_bytes()`` and ``device_state_bytes()`` tell where the
    optimizer's memory is.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, paged: bool | None = None):
        if paged not in (None, True, False):
            raise ValueError(f"paged must be None (page GPU parameters), True or False, got {paged!r}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.paged = paged
        self._paged_ids: set = set()      # id(param) of the parameters whose state is paged
        self._staging: dict = {}          # (device, dtype) -> {state key: flat device buffer}

    # ------------------------------------------------------------------ where the state lives
    def _pages(self, p) -> bool:
        if self.paged is None:
            return backend.device_of(p.data) == "cuda"
        return self.paged

    def _init_state(self, p) -> dict:
        if not self._pages(p):
            return super()._init_state(p)
        self._paged_ids.add(id(p))
        state = {"step": 0}
        for key in self._state_keys:
            host = backend.pinned_empty(p.shape, p.data.dtype)   # page-locked host memory
            host[...] = 0
            state[key] = host
        return state

    def _stage(self, p) -> dict:
        """Device views (p.shape) of the staging buffers, grown to fit ``p`` when needed."""
        key = (backend.device_of(p.data), np.dtype(p.data.dtype))
        bufs = self._staging.get(key)
        if bufs is None or bufs[self._state_keys[0]].size < p.size:
            xpmod = backend.get_xp(p.data)
            bufs = self._staging[key] = {k: xpmod.empty(p.size, dtype=p.data.dtype)
                                         for k in self._state_keys}
        return {k: buf[:p.size].reshape(p.shape) for k, buf in bufs.items()}

    # ------------------------------------------------------------------ the update
    def _update(self, p, g, state, group) -> None:
        if id(p) not in self._paged_ids:
            super()._update(p, g, state, group)
            return
        staged = self._stage(p)
        for key, dev in staged.items():                       # page in: host -> device
            _copy_into(dev, state[key])
        work = {"step": state["step"], **staged}
        super()._update(p, g, work, group)                    # AdamW's arithmetic, on the device
        for key in self._state_keys:                          # page out: device -> host
            _copy_into(state[key], work[key])

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict) -> None:
        """AdamW's loading, then paged parameters' moments moved into fresh pinned host arrays."""
        super().load_state_dict(state_dict)
        self._paged_ids = set()
        for _, p in self._params():
            st = self.state.get(id(p))
            if st is None or not self._pages(p):
                continue
            self._paged_ids.add(id(p))
            for key in self._state_keys:
                host = backend.pinned_empty(p.shape, p.data.dtype)
                host[...] = backend.to_numpy(st[key])
                st[key] = host

    # ------------------------------------------------------------------ accounting
    def host_state_bytes(self) -> int:
        """Bytes of moment estimates kept in (pinned) host memory."""
        return int(sum(st[k].nbytes for pid, st in self.state.items() if pid in self._paged_ids
                       for k in self._state_keys))

    def device_state_bytes(self) -> int:
        """Bytes of optimizer memory on the parameters' device: unpaged state plus staging buffers."""
        unpaged = sum(st[k].nbytes for pid, st in self.state.items() if pid not in self._paged_ids
                      for k in self._state_keys)
        staging = sum(b.nbytes for bufs in self._staging.values() for b in bufs.values())
        return int(unpaged + staging)
