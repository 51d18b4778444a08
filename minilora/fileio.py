"""Atomic writes of files and of whole folders, and readers that never see a mix of two saves.

**One file** (``atomic_path``, ``write_*_atomic``): a temporary file in the target folder, flushed
to disk (fsync), then ``os.replace``d onto the name. A crash or Ctrl-C mid-write leaves the old file
(or none), never half a file.

**One folder** (``atomic_folder``: a model's ``save_pretrained``, an adapter's, a merged checkpoint):
a checkpoint is several files (``config.json`` + ``model.safetensors``) that must come from the same
save; replacing them one at a time would leave, after ``kill -9`` between the two, a config from one
save beside weights from another. So the whole folder is swapped instead:

1. every file of the new save is written into a fresh temporary sibling folder
   ``.NAME.minilora-new.PID.<random suffix>`` (the PID lets the next save tell a dead writer's
   leftovers from a live writer's work);
2. entries of the old folder that the save does not own (a tokenizer someone put there, the
   subfolder of another adapter) are carried over as hard links (symbolic links are re-created as
   links, never followed);
3. every file and folder of the new tree is fsync'ed;
4. the new folder takes the name in one step: ``rename`` when the name is free, else Linux's
   ``renameat2(RENAME_EXCHANGE)``, which swaps the two names atomically (the old tree now carries the
   temporary name and is deleted). Where the exchange is unavailable (not Linux, a file system
   without it) the old folder is renamed aside (``.NAME.minilora-old.PID.<random suffix>``) and
   the new one renamed in; a crash between the two renames leaves no folder under the name, and
   the next save or load renames the aside folder back (``recover``);
5. the parent folder is fsync'ed, so the rename itself survives a power cut on file systems that
   honour fsync.

At every instant the name points to a complete folder: the old one or the new one. Two processes
saving to one name at once each swap in their own complete folder; the last swap wins. Temporaries
left by a killed writer are deleted by the next save of the same name (``clean_stale``).

**Readers** (``read_consistently``) open files by path, so a swap between opening ``config.json``
and ``model.safetensors`` could still hand them one of each. They note the folder's identity
(device, inode, change time) before and after reading, and read again when it changed: an
optimistic read, like a seqlock. Nothing is ever pickled.
"""
from __future__ import annotations

import ctypes
import errno
import fnmatch
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

_NEW, _OLD = "minilora-new", "minilora-old"   # the two kinds of temporary sibling folder
# How often a reader retries when the folder was swapped under it; each retry is a whole read, and
# a swap is one rename, so two in a row are already unlikely (the concurrent-writer test saves in a
# tight loop from two processes and needs far fewer).
READ_ATTEMPTS = 50


# ------------------------------------------------------------------ one file
@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it is fsync'ed and renamed onto ``path``.

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
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path``, creating parent folders; readers see old or new, never half."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path``, creating parent folders; readers see old or new, never half."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 2) -> None:
    """Write ``obj`` as sorted, indented JSON to ``path`` (atomically, as ``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """``safetensors.numpy.save_file`` through a temp file (arrays are copied to host first)."""
    from safetensors.numpy import save_file

    from . import backend
    host = {k: backend.to_numpy(v) for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(host, tmp, metadata=metadata)


# ------------------------------------------------------------------ one folder
@contextmanager
def atomic_folder(path: str | os.PathLike, owned: tuple[str, ...] = ()):
    """Yield a fresh temporary folder; on success it replaces the folder ``path`` as a whole.

    ``owned``: glob patterns (``"model-*.safetensors"``) of the top-level entries this save writes or
    removes; temporaries of killed single-file writes are dropped; every other entry of the old folder is carried into the new one (hard links; symbolic
    links re-created, not followed). On an exception nothing changes at ``path`` and the temporary
    folder is deleted. See the module docstring for the steps and what they guarantee."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; saving needs a folder path (or a new name)")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_NEW}.{os.getpid()}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes 0700; give the folder the usual permissions
        if path.is_dir():
            _carry_over(path, tmp, owned)
        _fsync_tree(tmp)
        _swap_in(tmp, path)
        _fsync_dir(path.parent)
    finally:
        _remove(tmp)     # the unused new tree, or the old one after a swap


def _remove(path: Path) -> None:
    """Delete a temporary: a folder tree, or a symbolic link (the name swapped out was a link)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _carry_over(old: Path, new: Path, owned) -> None:
    """Link the entries of ``old`` that the new save neither wrote nor owns into ``new``."""
    for entry in os.scandir(old):
        if os.path.lexists(new / entry.name) or any(fnmatch.fnmatch(entry.name, p) for p in owned):
            continue
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            continue     # a killed single-file write's temporary (atomic_path): dropped, not carried
        _link_tree(Path(entry.path), new / entry.name)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link the file ``src`` (or every file under the folder ``src``) to ``dst``; a symbolic
    link is re-created as the same link, so a save never writes through one."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        for entry in os.scandir(src):
            _link_tree(Path(entry.path), dst / entry.name)
    else:
        try:
            os.link(src, dst)
        except OSError:          # a file system without hard links: copy
            shutil.copy2(src, dst, follow_symlinks=False)


def _swap_in(new: Path, path: Path) -> None:
    """Give ``new`` the name ``path`` in one step; afterwards ``new`` names the old tree, if any."""
    if not os.path.lexists(path):
        try:
            os.rename(new, path)
            os.mkdir(new)            # keep the contract: ``new`` exists (empty) and is removed after
            return
        except OSError as e:         # another writer took the name first: exchange with its folder
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                raise
    if _exchange(new, path):
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_OLD}.{os.getpid()}.", dir=path.parent))
    os.rename(path, aside / "tree")  # rename-aside: a crash here leaves the old tree to recover
    os.rename(new, path)
    os.rename(aside, new)            # the old tree is deleted with ``new``


_RENAME_EXCHANGE = 2   # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` atomically with renameat2; False where it is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):   # no kernel or file-system support
        return False
    raise OSError(err, f"renameat2 could not swap {a} and {b}: {os.strerror(err)}")


def _siblings(path: Path, kind: str):
    """(pid, sibling path) of the temporary folders of ``kind`` made for ``path``."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.{kind}\.(\d+)\.")
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return []
    return [(int(m.group(1)), Path(e.path)) for e in entries if (m := pattern.match(e.name))]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's live process
        return True
    return True


def recover(path: str | os.PathLike) -> None:
    """Finish a rename-aside swap that a crash interrupted: when no folder has the name ``path`` but
    an aside copy of the old one exists, rename it back."""
    path = Path(path)
    if os.path.lexists(path):
        return
    for _, aside in sorted(_siblings(path, _OLD), key=lambda s: s[1].stat().st_mtime, reverse=True):
        if (aside / "tree").is_dir():
            try:
                os.rename(aside / "tree", path)
                return
            except OSError:
                continue


def clean_stale(path: str | os.PathLike) -> None:
    """Delete temporaries of ``path`` left by writers that are no longer running (killed mid-save)."""
    path = Path(path)
    for kind in (_NEW, _OLD):
        for pid, sibling in _siblings(path, kind):
            if not _alive(pid):
                _remove(sibling)


# ------------------------------------------------------------------ durability
def _fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:              # a platform that cannot open folders (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file under ``root``, then every folder (children before parents)."""
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                _fsync_file(os.path.join(folder, name))
        _fsync_dir(folder)


# ------------------------------------------------------------------ consistent reads
def _identity(path: Path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def read_consistently(path: str | os.PathLike, read):
    """``read()`` (which opens files inside the folder ``path``), repeated while the folder was
    swapped by a concurrent save during the read, so the result comes from one save.

    An exception raised while the folder changed is taken for a torn read and the read is retried;
    one raised while it stayed the same is the folder's own and propagates."""
    path = Path(path)
    for _ in range(READ_ATTEMPTS):
        recover(path)
        before = _identity(path)
        try:
            result = read()
        except Exception:
            if _identity(path) != before:
                continue
            raise
        if _identity(path) == before:
            return result
    raise RuntimeError(f"{path} was replaced by another save during each of {READ_ATTEMPTS} reads; "
                       "stop the process that keeps saving there, then load again")
