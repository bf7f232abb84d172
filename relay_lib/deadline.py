"""A time limit over one whole network call: the webhook's POST, the OAuth
token request, one request to the metrics endpoint.

Owns the timer that shuts down every socket of the call when its time is up,
and the urllib handlers whose connections it watches. Must not read or write
those sockets: the blocked reader sees its read end and reports the failure.
"""

import http.client
import socket
import ssl
import threading
import urllib.request
from typing import List, Optional


class Deadline:
    """Shuts down every socket it watches `seconds` after start().

    A socket timeout bounds each read; a peer sending one byte every few
    seconds would never trip it. Shutting the socket down from a timer makes
    the blocked read return at once. `fired` tells, afterwards, that the
    time ran out; expire() ends the call early (and cancels the timer).
    """

    def __init__(self, seconds: float):
        self.fired = False
        self.expired = False
        self._sockets: List[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self.fire)
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if not self.expired:
                return
        _shutdown(sock)

    def fire(self) -> None:
        """The timer ran out: stop the call."""
        self.fired = True
        self.expire()

    def expire(self) -> None:
        self._timer.cancel()
        with self._lock:
            self.expired = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shutdown(sock)

    def opener(self, context: Optional[ssl.SSLContext], *handlers) -> urllib.request.OpenerDirector:
        """A urllib opener whose http and https connections this deadline watches."""
        return urllib.request.build_opener(_HTTPHandler(self), _HTTPSHandler(self, context), *handlers)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by its owner or by the peer: nothing left to stop


def _watched(base, deadline: Deadline):
    """An http.client connection class whose sockets the deadline can stop."""

    class Connection(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            create = self._create_connection

            def create_watched(*a, **kw):
                sock = create(*a, **kw)
                deadline.watch(sock)
                return sock

            self._create_connection = create_watched

    return Connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline):
        super().__init__()
        self._connection = _watched(http.client.HTTPConnection, deadline)

    def http_open(self, req):
        return self.do_open(self._connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: Deadline, context: Optional[ssl.SSLContext]):
        super().__init__(context=context)
        self._connection = _watched(http.client.HTTPSConnection, deadline)

    def https_open(self, req):
        return self.do_open(self._connection, req, context=self._context)
