"""The aliases file (SPEC 2.3 aliases_file): each recipient is replaced by
its target before routing and delivery.

Owns the table and its reload. Must not route or deliver.
"""

from typing import Dict, List

from relay_lib.watched import WatchedFile


class Aliases(WatchedFile):
    """The aliases file: `alias target` per line, compared case-insensitively."""

    def _parse(self, lines: List[str]) -> Dict[str, str]:
        table = {}
        for number, line in enumerate(lines, 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) != 2:
                self._skip(number, "expected: alias target")
                continue
            table[parts[0].lower()] = parts[1]
        return table

    def resolve(self, addr: str) -> str:
        return self._refresh().get(addr.lower(), addr)
