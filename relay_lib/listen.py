"""Listening sockets, SMTP or metrics alike: the address family of the listen
address, dual stack for "every address", no port stealing, and a serving
loop that stops at once when asked.

Owns `ListenSocket` (a mixin for socketserver servers) and `ListenError`.
Must not handle a connection: the server it is mixed into does.
"""

import ipaddress
import os
import selectors
import socket
import socketserver
import threading
from typing import TYPE_CHECKING, Tuple

if TYPE_CHECKING:  # what ListenSocket is mixed into, for the type checker only
    _Server = socketserver.TCPServer
else:
    _Server = object


class ListenError(OSError):
    """An address that cannot be bound: the OSError, and which address
    (`listen`'s own, or `metrics_listen ...`)."""

    def __init__(self, address: str, exc: OSError):
        super().__init__(exc.errno, exc.strerror or str(exc))
        self.address = address


def _address(host: str, port: int) -> Tuple[int, tuple, bool]:
    """(address family, bind address, dual stack) for a listen address."""
    if host == "":  # every address: one dual-stack socket where IPv6 exists
        if socket.has_ipv6:
            return socket.AF_INET6, ("::", port), True
        return socket.AF_INET, ("0.0.0.0", port), False
    try:
        ip = ipaddress.ip_address(host)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return family, (host, port), False
    except ValueError:
        info = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        return info[0][0], info[0][4][:2], False


class ListenSocket(_Server):
    """Mixed in before a socketserver server class; `listener` has `host` and `port`.

    `serve()` replaces `serve_forever()`: socketserver's loop polls for its
    shutdown flag (its own XXX), so every stop waited up to a poll interval;
    here `stop_serving()` wakes the loop through a socket pair instead.
    """

    allow_reuse_address = os.name != "nt"  # on Windows it would allow port stealing

    def __init__(self, listener, *args):
        self.address_family, address, self.dual_stack = _address(listener.host, listener.port)
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        try:
            super().__init__(address, *args)
        except BaseException:
            self._wake_r.close()
            self._wake_w.close()
            raise

    def server_bind(self) -> None:
        if self.dual_stack and hasattr(socket, "IPV6_V6ONLY"):
            # Windows defaults to IPv6 only; Linux to dual stack.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
            # Windows only: no other program may bind our port while we hold it.
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        super().server_bind()

    def serve(self) -> None:
        """Accept and handle connections until stop_serving()."""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._stopping.is_set():
                    for key, _ in selector.select():
                        if key.fileobj is self and not self._stopping.is_set():
                            self._handle_request_noblock()  # type: ignore[attr-defined]  # private in typeshed, public in use
                    self.service_actions()
        finally:
            self._stopped.set()

    def stop_serving(self, running: bool) -> None:
        """Make serve() return; wait for it when it is `running` in another thread."""
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # the pair is gone: the loop is not waiting on it
        if running:
            self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        self._wake_r.close()
        self._wake_w.close()
