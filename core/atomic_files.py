"""Files written all or nothing: a reader (a resumed job, another node on the shared volume, a
crash-restarted process) sees the old content or the new one, never a torn file.

Every writer goes through :func:`atomic_path`: a temp file in the target's folder (same file
system, so the rename is atomic), flushed to disk, then ``os.replace``-d over the target, and the
folder synced so the rename itself survives a power loss. On an error the temp file is removed and
the target is untouched. Hand-written because the standard library has no atomic-write helper and
the few that exist on PyPI do less than these twenty lines.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Iterator, Union

from core.storage import StoragePath, temp_key


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some file systems cannot open a folder for sync: the rename still happened
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def temp_files_of(path: Union[str, Path, StoragePath]) -> list:
    """The temp files :func:`atomic_path` writers of ``path`` left behind (a crashed writer's;
    a live one's too, so call it only when no writer of ``path`` runs); temp keys for an object."""
    if isinstance(path, StoragePath):
        return sorted(path.parent.glob(f".{path.name}.*.tmp"), key=str)
    path = Path(path)
    return sorted(path.parent.glob(f".{glob_escape(path.name)}.*.tmp"))


@contextmanager
def atomic_path(path: Union[str, Path, StoragePath], durable: bool = True) -> Iterator[Path]:
    """A temp path beside ``path`` to write to; on a normal exit it is synced and renamed onto
    ``path``. The temp name carries the pid and thread id, so concurrent writers never share one.
    ``durable=False`` skips the two syncs (still never torn, but a power loss may lose the file):
    for intermediate files on a hot path that a rerun rebuilds anyway.

    ``path`` an object (:class:`core.storage.StoragePath`): the temp path is a local scratch file;
    on a normal exit it is uploaded to a temp key beside the target
    (:func:`core.storage.temp_key`) and then moved onto the target (the store's copy + delete),
    so a reader never sees a half-written object under the target's key; on an error (or a failed
    upload) the temp key is removed and the target is untouched."""
    if isinstance(path, StoragePath):
        with _atomic_object(path) as tmp:
            yield tmp
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        if durable:
            _fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync_path(path.parent, directory=True)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _atomic_object(target: StoragePath) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="loopy_put_"))
    tmp = folder / target.name
    key = temp_key(target)
    try:
        yield tmp
        key.upload_from(tmp)
        key.move_to(target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        try:
            if key.exists():
                key.unlink(missing_ok=True)
        except OSError:  # the store is gone: the next run's cleanup removes the temp key
            pass


class _Discarded(Exception):
    """Thrown into :func:`atomic_path` by :meth:`AtomicFile.discard` (never seen by a caller)."""


class AtomicFile:
    """:func:`atomic_path` for a writer that stays open across calls (a streaming
    ``pyarrow.parquet.ParquetWriter`` fed chunk by chunk): write to ``tmp``, then :meth:`commit`
    (synced and renamed onto the target, as on a normal exit of ``atomic_path``) or
    :meth:`discard` (the temp file removed, the target untouched, as on an error). Also a context
    manager: commit on a normal exit, discard on an error. The same ``atomic_path`` underneath,
    entered here and left by :meth:`commit` / :meth:`discard`."""

    def __init__(self, path: Union[str, Path, StoragePath], durable: bool = True):
        self.path = path if isinstance(path, StoragePath) else Path(path)
        self._cm = atomic_path(self.path, durable)
        self.tmp: Path = self._cm.__enter__()
        self._open = True

    def commit(self) -> Path:
        """Move the written temp file onto ``path`` (once); returns ``path``."""
        if not self._open:
            raise RuntimeError(f"{self.path}: already committed or discarded")
        self._open = False
        self._cm.__exit__(None, None, None)
        return self.path

    def discard(self) -> None:
        """Remove the temp file; the target keeps its old content (a no-op once closed)."""
        if self._open:
            self._open = False
            self._cm.__exit__(_Discarded, _Discarded(), None)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_text_atomic(path: Union[str, Path, StoragePath], text: str) -> None:
    """``text`` (UTF-8) written to ``path`` all or nothing."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Union[str, Path, StoragePath], data: Any, **dumps_kwargs: Any) -> None:
    """``data`` as JSON (``json.dumps`` keyword arguments passed on) written to ``path`` all or nothing."""
    write_text_atomic(path, json.dumps(data, **dumps_kwargs))
