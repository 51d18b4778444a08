"""Atomic file writes: a temporary file in the target folder, then ``os.replace``.

A crash or Ctrl-C mid-write leaves the old file (or none), never half a file: checkpoints, adapters,
caches and datasets are all written through here. Reading never uses pickle.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    For writers that want a file name (``safetensors.numpy.save_file``, ``savefig``)::

        with atomic_path("out/model.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path``, creating parent folders; readers see old or new, never half."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """``safetensors.numpy.save_file`` through a temp file (arrays are copied to host first)."""
    from safetensors.numpy import save_file

    from . import backend
    host = {k: backend.to_numpy(v) for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(host, tmp, metadata=metadata)
