"""Outbox: the `file:` remote (SPEC 5.1).

Owns how a message and its envelope land in a folder, each file written
atomically (`files`). Must not know about SMTP, routing or the spool.
"""

import json
import os

from relay_lib.files import atomic_write, discard, temporary_name


def write_file(folder: str, message_id: str, envelope: dict, message: bytes) -> None:
    """The `file:` remote: `<id>.eml` and then `<id>.json`, each written atomically.

    Each file is written under a temporary name in the same folder, flushed
    to disk and renamed, so a reader never sees half a message.

    Raises:
        OSError: the folder is not writable or the disk is full.
    """
    os.makedirs(folder, exist_ok=True)
    eml, meta = os.path.join(folder, message_id + ".eml"), os.path.join(folder, message_id + ".json")
    for path in (eml, meta):
        discard(temporary_name(path))  # a crash cut an earlier write short; a retry reuses the id
    atomic_write(eml, message)
    atomic_write(meta, json.dumps(envelope, indent=2, ensure_ascii=False).encode("utf-8"))
