"""Writing files so that a crash never leaves half of one under the real name:
write beside the target, then rename (atomic on one file system)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an
    error it replaces ``path``, otherwise it is removed.

        with atomic_write(out / "model.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False
    where the system or the file system cannot."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _step(name: str) -> None:
    """Between the steps of a folder swap: nothing. Tests replace it to stop the
    process there, as a kill would."""


def swap_folder(new: Path, path: Path) -> None:
    """Put folder ``new`` under the name ``path``, replacing the folder there so
    that the name always holds a complete one: the two are exchanged in one step
    where the system can; elsewhere the old one is renamed aside, the new one in,
    then the old one deleted (a kill between the renames leaves the old folder
    complete beside the name, as ``.NAME.old.*``)."""
    if not path.exists():
        os.replace(new, path)
        return
    if _exchange(new, path):
        _step("exchanged")
        shutil.rmtree(new)  # now the old folder
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
    os.replace(path, aside)  # a folder replaces an empty one
    _step("aside")
    os.replace(new, path)
    _step("renamed")
    shutil.rmtree(aside)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` that becomes ``path`` when the
    block ends without an error. An existing ``path`` is replaced with
    ``replace`` (``swap_folder``: never a moment without a complete folder
    under the name); otherwise the folder already there (another process won
    the race) is kept and the new one dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        _step("written")
        if replace:
            swap_folder(tmp, path)
        else:
            try:
                os.replace(tmp, path)
            except OSError:
                pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_held: dict[str, int] = {}  # lock path → open descriptor, for the locks this process holds


def lock_folder(folder: str | os.PathLike, what: str) -> bool:
    """Take ``folder/.lock`` (``flock``, exclusive) until ``unlock_folder`` or the
    end of the process: the OS releases it when the process ends in any way, so
    a crashed or killed holder never leaves it stuck. Returns False when this
    process holds it already; ``MMDialogError`` naming the holder's pid when
    another one does. ``what`` names the holder kind, for that message."""
    import fcntl

    from mmdialog.core.errors import MMDialogError

    folder = Path(folder)
    path = str((folder / ".lock").resolve())
    if path in _held:
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise MMDialogError(f"cannot write to the folder {folder}: {e.strerror or e}; choose another") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise MMDialogError(f"{folder} is in use by another {what} (pid {holder}): wait for it to end, "
                            "or choose another --out-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[path] = fd
    return True


def unlock_folder(folder: str | os.PathLike) -> None:
    # Closing releases the lock; the file stays (removing it would race a process opening it).
    fd = _held.pop(str((Path(folder) / ".lock").resolve()), None)
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """``lock_folder`` for the block (a no-op when this process holds it already)."""
    taken = lock_folder(folder, what)
    try:
        yield
    finally:
        if taken:
            unlock_folder(folder)
