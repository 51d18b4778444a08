"""Several adapters in one batch: each row of a batch runs with its own adapter, in one forward.

PEFT's mixed-batch inference (Hugging Face PEFT, ``LoraLayer._mixed_batch_forward``), from scratch.
A server that holds one base model and many LoRA adapters (Hu et al. 2021: each is only
r·(in + out) numbers per layer) can answer requests for different adapters together:
``peft_model(input_ids, adapter_names=["a", "b", "__base__", "a"])`` gives row i exactly what
``set_adapter(adapter_names[i])`` would give it alone, and ``"__base__"`` what the base model gives
(``disable_adapter()``). ``peft_model.generate(..., adapter_names=...)`` does the same at every step.

Why one batch pays: the frozen W0·x is most of a layer's work, and it is the same matrix for every
adapter, so all rows share one GEMM; each adapter then adds its own small side path to its own rows:

    h[rows_a] = W0·x[rows_a] + scaling_a · B_a·(A_a·x[rows_a])        for each distinct adapter a

computed as one base GEMM over the whole batch, then for each distinct adapter one gather of its
rows, its A and B products, and at the end one gather that puts every row's term back in place.
There is a loop over the distinct adapters, never over rows or tokens.

How the names reach the layers: the model (``models/``) knows nothing of LoRA, so it cannot pass
``adapter_names`` down. ``PeftModel.forward`` and ``generate`` enter ``rows_use_adapters(layers,
names)`` around the call, which records the names for each LoRA layer and ``modules_to_save``
wrapper, and ``LoraLinear.forward`` / ``ModulesToSaveWrapper.forward`` ask ``row_adapters(self)``
first and, when names are set, come here (``lora_forward``, ``modules_to_save_forward``).

The record is per thread: a plain call of the same model from another thread at the same time is
not affected. That is enough because nothing runs one call's layers in another thread during
inference: ``DataParallel`` splits only a training call that reads ``(input_ids, labels=...,
attention_mask=...)`` and nothing else (a call with ``adapter_names`` runs whole, in the caller's
thread), and gradient checkpointing re-runs layers in backward only after a training forward. As
PEFT does, a model in training mode refuses ``adapter_names`` (``check_request``): mixed batches
are for inference.

Refusals, as PEFT's, each a one-line ``ValueError`` naming the fix: training mode, a name no layer
knows, a list whose length is not the batch size, merged adapters, and DoRA adapters.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np

from .. import backend
from .. import functional as F
from ..tensor import Tensor

BASE = "__base__"   # PEFT's name for "no adapter": the row gets the base model's output

_local = threading.local()   # .table: {id(layer): adapter names} for this thread's running call


def row_adapters(module) -> list | None:
    """The per-row adapter names set for ``module`` by the call running in this thread, or None
    (the usual forward, with the active adapters)."""
    table = getattr(_local, "table", None)
    return None if not table else table.get(id(module))


@contextmanager
def rows_use_adapters(modules, adapter_names):
    """For the duration of the block, ``module`` runs row i of its input with ``adapter_names[i]``,
    for every module of ``modules`` (LoRA layers and ``modules_to_save`` wrappers), in this thread.

    Whatever was recorded before (a nested call) comes back afterwards, also on an exception."""
    names = list(adapter_names)
    table = getattr(_local, "table", None)
    if table is None:
        table = _local.table = {}
    saved = {id(m): table.get(id(m)) for m in modules}
    for m in modules:
        table[id(m)] = names
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                table.pop(key, None)
            else:
                table[key] = old


# ---------------------------------------------------------------- refusals
def check_request(adapter_names, n_rows: int, training: bool, lora_layers, wrappers) -> list:
    """The checks PEFT makes before a mixed-batch call (``LoraModel._enable_peft_forward_hooks``),
    for the whole model at once; returns the names as a list of str.

    ``n_rows`` is the batch size of the input, ``training`` the model's mode, ``lora_layers`` its
    LoraLinear layers and ``wrappers`` its ``modules_to_save`` wrappers."""
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise ValueError(f"adapter_names must be a list of adapter names, one per batch row, got "
                         f"{adapter_names!r}; write e.g. adapter_names=['a', '__base__']")
    names = list(adapter_names)
    if training:
        raise ValueError("adapter_names is for inference only and the model is in training mode; "
                         "call model.eval() first (training uses set_adapter())")
    if len(names) != n_rows:
        raise ValueError(f"adapter_names has {len(names)} names but the batch has {n_rows} rows; "
                         "give one adapter name (or '__base__') per row")
    known = set()
    for layer in lora_layers:
        known |= set(layer.lora_A)
    for wrapper in wrappers:
        known |= set(wrapper.modules_to_save)
    unknown = sorted(set(names) - known - {BASE})
    if unknown:
        raise ValueError(f"adapter_names holds {unknown}, which no layer of this model has; use "
                         f"one of {sorted(known)} or '__base__' for the base model alone")
    for layer in lora_layers:
        check_layer(layer, n_rows, names)
    return names


def check_layer(layer, n_rows: int, names) -> None:
    """PEFT's ``_check_forward_args`` for one LoRA layer: one name per row, no merged adapter
    (its ΔW is in W0 for every row), no DoRA adapter among the names."""
    if len(names) != n_rows:
        raise ValueError(f"{layer.module_name or 'a LoRA layer'} got {n_rows} rows but "
                         f"{len(names)} adapter names; give one adapter name (or '__base__') per row")
    if layer.merged_adapters:
        raise ValueError(f"adapters {layer.merged_adapters} are merged into the base weights, so "
                         "every row would get them; call unmerge_adapter() before using adapter_names")
    dora = getattr(layer, "use_dora", None) or {}
    used = sorted(n for n in set(names) if dora.get(n, False))
    if used:
        raise ValueError(f"adapter_names cannot run DoRA adapters {used} (as in PEFT); run each of "
                         "them alone with set_adapter()")


# ---------------------------------------------------------------- forwards
def _groups(names, present):
    """[(adapter name, host row indices)] for each distinct name in ``present``, in order of first
    appearance, and the host indices of the remaining rows (one comparison per distinct name)."""
    labels = np.asarray(names)                                         # (n_rows,) str
    distinct, first = np.unique(labels, return_index=True)
    groups = [(str(name), np.flatnonzero(labels == name)) for name in distinct[np.argsort(first)]
              if name in present and name != BASE]
    rest = np.flatnonzero(~np.isin(labels, [name for name, _ in groups]))
    return groups, rest


def _put_back(pieces, row_lists, n_rows: int, xpmod):
    """Join per-group outputs (b_g, ...) into one (n_rows, ...) Tensor, row i where it came from.

    The pieces are concatenated in group order and taken back by the inverse permutation: one
    gather, differentiable like any indexing (no per-row copy loop)."""
    order = np.concatenate(row_lists)                           # (n_rows,) batch row of each joined row
    joined = pieces[0] if len(pieces) == 1 else F.concatenate(pieces, axis=0)   # (n_rows, ...)
    if np.array_equal(order, np.arange(n_rows)):
        return joined
    inverse = np.empty(n_rows, dtype=np.int64)
    inverse[order] = np.arange(n_rows)                          # joined row that holds batch row i
    return joined[xpmod.asarray(inverse)]                       # (n_rows, ...) in batch order


def lora_forward(layer, x, names):
    """``LoraLinear.forward`` with adapter ``names[i]`` on row i of ``x`` (n_rows, ..., in):
    ``base_layer(x)`` once, then each distinct adapter's ``lora_B(lora_A(dropout(x[rows]))) ·
    scaling`` on its rows only (PEFT's ``_mixed_batch_forward``, the module form). "__base__" rows,
    and rows whose adapter does not adapt this layer, get ``base_layer(x)`` alone."""
    n_rows = x.shape[0]
    check_layer(layer, n_rows, names)
    result = layer.base_layer(x)                                       # (n_rows, ..., out)
    if layer.disable_adapters:          # inside disable_adapter(): every row is the base model's
        return result
    groups, rest = _groups(names, set(layer.lora_A))
    if not groups:
        return result
    xpmod = backend.get_xp(x.data)
    terms, row_lists = [], []
    for name, rows in groups:
        sub = x[xpmod.asarray(rows)] if len(rows) < n_rows else x       # (b_a, ..., in)
        dropped = F.dropout(sub, layer.lora_dropout[name], layer.training)
        lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
        terms.append(lora_B(lora_A(dropped)) * layer.scaling[name])    # (b_a, ..., r) -> (b_a, ..., out)
        row_lists.append(rows)
    if rest.size:                       # rows without a term here: add exact zeros, W0·x stays bit for bit
        terms.append(Tensor(xpmod.zeros((len(rest),) + result.shape[1:], dtype=result.dtype)))
        row_lists.append(rest)
    return result + _put_back(terms, row_lists, n_rows, xpmod)        # (n_rows, ..., out)


def modules_to_save_forward(wrapper, names, x, *args, **kwargs):
    """``ModulesToSaveWrapper.forward`` with adapter ``names[i]`` on row i of ``x``: each distinct
    adapter's trainable copy runs on its rows (PEFT's ``AuxiliaryTrainingWrapper._mixed_batch_forward``);
    "__base__" rows, and rows of an adapter without a copy here, run the original module, as they
    would with that adapter alone active."""
    data = x.data if isinstance(x, Tensor) else x
    n_rows = data.shape[0]
    if len(names) != n_rows:
        raise ValueError(f"{wrapper.module_name or 'a modules_to_save wrapper'} got {n_rows} rows "
                         f"but {len(names)} adapter names; give one adapter name (or '__base__') per row")

    def module_of(name):
        if wrapper.disable_adapters or name == BASE or name not in wrapper.modules_to_save:
            return wrapper.original_module
        return wrapper.modules_to_save[name]

    labels = np.asarray(names)                                          # (n_rows,) str
    runs: dict = {}                     # id(module) -> (module, names): one run per distinct module
    for name in np.unique(labels):
        m = module_of(str(name))
        runs.setdefault(id(m), (m, []))[1].append(name)
    if len(runs) == 1:
        return next(iter(runs.values()))[0](x, *args, **kwargs)
    xpmod = backend.get_xp(data)
    outputs, row_lists = [], []
    for module, group in runs.values():
        rows = np.flatnonzero(np.isin(labels, group))
        outputs.append(module(x[xpmod.asarray(rows)], *args, **kwargs))  # (b_g, ..., out)
        row_lists.append(rows)
    return _put_back(outputs, row_lists, n_rows, xpmod)
