"""Atomic file writes: a reader never sees half a file.

Owns the temporary-name-then-rename discipline that the `file:` outbox and
the spool share (os.replace: atomic on Windows too). Must not know what the
files mean.
"""

import os
import tempfile

TEMP_PREFIX = ".tmp-"  # a file being written; the spool removes these at start-up
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation


def check_folder(folder: str) -> None:
    """The `file:` remote's folder exists (or can be made) and takes a new file.

    Raises:
        OSError: it cannot be created or written.
    """
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX)
    os.close(fd)
    os.unlink(tmp)


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to a temporary name beside `path`, fsync it, rename it into place.

    Raises:
        OSError: the folder is not writable or the disk is full (no temporary file stays).
    """
    tmp = write_temporary(path, data, sync=True)
    try:
        os.replace(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def write_temporary(path: str, data: bytes, sync: bool) -> str:
    """Write `data` under the temporary name of `path` (fsynced when `sync`); returns that name.

    Raises:
        OSError: the folder is not writable or the disk is full (no temporary file stays).
    """
    # Every path written here is named after a unique message id, and only
    # one thread writes a given path, so the temporary name needs no random
    # part (mkstemp cost as much as the write). O_EXCL still refuses a clash.
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            if sync:
                out.flush()
                os.fsync(out.fileno())  # the client deletes its copy after our 250
    except BaseException:
        discard(tmp)
        raise
    return tmp


def temporary_name(path: str) -> str:
    return os.path.join(os.path.dirname(path), TEMP_PREFIX + os.path.basename(path))


def discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass  # keep the original error
