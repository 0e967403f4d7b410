"""Who may read the data directory (``KGPU_DATA_DIR``): its owner, the server, alone.

Other users of the host only pass through it, for the local pods' folders (``pods/``: pods run
under uids of their own and reach their own folder there), so the data directory is ``0711``:
others may traverse it by name, never list or read it. Everything else in it is private:

* ``kgpu.db`` (and its ``-wal``/``-shm``) ``0600``, made so before SQLite first writes to it
  (:func:`gateway.db.migrate`); a database folder of its own (an SQLite URL elsewhere) is ``0700``;
* ``objects/``, the embedded store's files, ``0700``: ``rclone serve s3`` runs under umask 077, so
  what it writes there is ``0600`` too (drive/store/embedded.py); a folder ``0700`` alone already
  keeps every file under it from other users, whatever an older server left their modes;
* ``slots/``, the lock files of the caps on calls in flight (gateway/pods/slots.py), ``0700``;
* the session secret, the store's keys and port (``embedded-s3.json``) and its log, the token
  cache's generation (``auth-generation``) ``0600``.

:func:`secure_data_dir` runs at every start (``kgpu serve``, and any app made by
:func:`gateway.app.create_app`), so an older server's data directory (``0755``, files ``0644``)
is closed the first time a new one starts on it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("kgpu")

DATA_DIR_MODE = 0o711  # others pass through (the pods' folders), never list or read
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
OBJECTS = "objects"  # the embedded store's root (drive/store/embedded.py)
AUTH_GENERATION = "auth-generation"  # the token cache's generation, shared by a server's processes (gateway/auth.py)
# Files of the data directory that are the server's alone, besides the database.
PRIVATE_FILES = ("session-secret", "embedded-s3.json", "embedded-s3.log", "webdav.sqlite3", AUTH_GENERATION)


def set_mode(path: Path, mode: int) -> None:
    """``path`` made exactly ``mode`` when it is not yet (a warning, not a failure, when the
    server may not: a folder someone else owns)."""
    try:
        if path.stat().st_mode & 0o7777 != mode:
            path.chmod(mode)
    except FileNotFoundError:
        pass
    except PermissionError:
        log.warning("cannot make %s mode %o (it belongs to another user): make it so", path, mode)


def make_private_dir(path: Path) -> None:
    """``path`` and any missing parent made ``0700`` (an existing one keeps its mode)."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)


def secure_data_dir(data_dir: Path) -> None:
    """Make (or close) the data directory as the module says; the database file is made and
    closed where it is opened (:func:`gateway.db.migrate`), wherever it lives."""
    data_dir = Path(data_dir)
    data_dir.mkdir(mode=DATA_DIR_MODE, parents=True, exist_ok=True)
    set_mode(data_dir, DATA_DIR_MODE)
    set_mode(data_dir / OBJECTS, PRIVATE_DIR_MODE)
    for name in PRIVATE_FILES:
        set_mode(data_dir / name, PRIVATE_FILE_MODE)


def create_private_file(path: Path) -> None:
    """``path`` made empty and ``0600`` if it does not exist, before anything else writes it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)
