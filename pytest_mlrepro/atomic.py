"""Write a file so that readers see the old content or the new, never half of either:
a temp file beside the target, flushed (and fsynced on request), then ``os.replace``."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write: Callable[[str], None], *, fsync: bool = True, make_parents: bool = False,
                 temp_name: Optional[Callable[[Path], Path]] = None) -> int:
    """Write through ``write(tmp_path)`` to a temp file beside ``path``, then replace ``path``.

    Returns the bytes written. A missing parent folder raises ``FileNotFoundError`` unless
    ``make_parents`` (then the new folders are fsynced into their parents too); on any failure the temp
    file is removed and ``path`` is untouched. The temp file is private while written; it gets the mode a
    plain ``open()`` would give (or the replaced file's) just before the rename. ``temp_name(path)``
    names the temp file (it must not exist), for writers that recognise their own leftovers.
    """
    path = Path(path)
    new_dirs = [d for d in (path.parent, *path.parent.parents) if not d.exists()] if make_parents else []
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    if temp_name is None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    else:
        tmp = str(temp_name(path))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        size = os.path.getsize(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        for d in [path.parent, *(d.parent for d in new_dirs)]:
            _fsync_dir(d)
    return size


def atomic_write_bytes(path, data: bytes, *, fsync: bool = True, make_parents: bool = False) -> int:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write, fsync=fsync, make_parents=make_parents)


def atomic_write_text(path, text: str, *, fsync: bool = True, make_parents: bool = False) -> int:
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync, make_parents=make_parents)
