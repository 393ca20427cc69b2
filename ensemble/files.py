"""Atomic writes: a file or directory is visible under its final name only once complete.

A kill at any moment leaves either the previous version or nothing, never a half-written file
or a member directory that looks finished. Temporary names start with a dot and carry
``.tmp-`` so they are easy to recognise and clean up.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def _writer() -> str:
    """Host and pid: processes on different nodes that share a file system may share a pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_MARK}{_writer()}")


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        _write_synced(tmp, text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_record(directory: str | Path, name: str, missing: str) -> dict[str, Any]:
    """The JSON file ``name`` whose presence marks ``directory`` as complete (a member, a
    checkpoint); ``missing`` is the error message when it is absent."""
    from ensemble.errors import EnsembleError

    path = Path(directory) / name
    if not path.is_file():
        raise EnsembleError(missing)
    return json.loads(path.read_text())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def create_once(path: str | Path, text: str) -> str:
    """Write ``text`` to ``path`` unless it exists, and return what ``path`` holds: of several
    processes racing to create it (e.g. the tasks of a Slurm array starting together), the first
    wins and all read its text. ``os.link`` fails if the name exists, atomically, also on NFS."""
    path = Path(path)
    if not path.exists():
        tmp = path.with_name(f".{path.name}{TMP_MARK}{_writer()}-{uuid.uuid4().hex[:8]}")
        try:
            _write_synced(tmp, text)
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text()


@contextlib.contextmanager
def atomic_directory(final: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces ``final``. With
    ``replace=False`` an existing ``final`` is kept and the new one dropped (first writer wins).

    On an exception the temporary directory is removed and ``final`` is left as it was.
    """
    final = Path(final)
    tmp = tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        if not replace:
            try:
                os.rename(tmp, final)  # fails on an existing non-empty directory: never replaces
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not final.is_dir():
                    raise
        elif final.exists():
            # os.replace cannot replace a non-empty directory: move the old one aside first,
            # so there is no moment without a complete version under a recognisable name.
            old = final.with_name(f".{final.name}{TMP_MARK}old-{_writer()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(directory: str | Path) -> None:
    """Flush every file under ``directory`` to disk, so that renaming it into place publishes
    complete files even if the machine, not just the process, goes down."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def remove_stale_tmp(directory: str | Path, names: Iterable[str] | None = None) -> list[Path]:
    """Delete temporary entries left in ``directory`` by killed runs; return what was removed.
    ``names``: only the temporaries of these final names (others may belong to live processes,
    e.g. the other tasks of a Slurm array)."""
    directory = Path(directory)
    prefixes = None if names is None else tuple(f".{n}{TMP_MARK}" for n in names)
    removed = []
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.name.startswith(".") and TMP_MARK in entry.name:
                if prefixes is not None and not entry.name.startswith(prefixes):
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed
