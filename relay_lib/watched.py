"""Tables read from a file and swapped whole when the file changes.

Owns the reload rule the users and aliases files share (SPEC 2.4): check the
mtime and size on each use, parse into a new dict, assign it in one step so
readers never see half a table, keep the last good copy when the file
cannot be read.
"""

import os
import threading
from typing import Dict, List, Optional, Tuple

from relay_lib.logs import fields, log


class WatchedFile:
    """A table loaded from a file and swapped whole when its mtime changes."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self._stamp: Optional[Tuple[float, int]] = None
        self._lock = threading.Lock()
        self.table: Dict = {}
        self._loaded = False  # the first load is start-up, not a reload
        self._refresh()

    def _refresh(self) -> Dict:
        if not self.path:
            return self.table
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._stamp is not None:
                log.warning("cannot read file, keeping the last good copy",
                            extra=fields(file=self.path, error=exc.strerror))
                self._stamp = None
            return self.table
        stamp = (st.st_mtime, st.st_size)
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    try:
                        with open(self.path, encoding="utf-8-sig") as f:
                            self.table = self._parse(f.read().splitlines())
                        if self._loaded:
                            log.info("file reloaded", extra=fields(file=self.path, entries=len(self.table)))
                        self._loaded = True
                        self._stamp = stamp
                        self._swapped()
                    except (OSError, UnicodeDecodeError) as exc:
                        log.warning("cannot read file, keeping the last good copy",
                                    extra=fields(file=self.path, error=str(exc)))
        return self.table

    def _parse(self, lines: List[str]) -> Dict:
        raise NotImplementedError

    def _swapped(self) -> None:
        """Called once a new table has replaced the old one."""

    def _skip(self, number: int, why: str) -> None:
        log.warning("skipping malformed line", extra=fields(file=self.path, line=number, reason=why))
