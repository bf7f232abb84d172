"""The HTTP endpoint of `metrics_listen` (SPEC 12): `GET /metrics` and
`GET /healthz`, from a `ThreadingHTTPServer` in a thread of its own.

Owns that server and its limits: one request per connection, short socket
timeouts and a deadline over each whole request, a few requests at a time,
404 for any other path. Must not count
anything: it renders `metrics.REGISTRY` and asks its caller whether the relay
is healthy. The service wiring starts and stops it.
"""

import socketserver
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

from relay_lib.deadline import Deadline
from relay_lib.listen import ListenSocket
from relay_lib.logs import fields, log
from relay_lib.metrics import REGISTRY

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the Prometheus text format
SOCKET_TIMEOUT = 5.0  # seconds for each read and write of a request
REQUEST_DEADLINE = 5.0  # seconds for a whole request: one header byte a second cannot hold a slot
MAX_REQUESTS = 4  # requests served at once; more are closed unanswered
LOGGED_REQUEST = 200  # characters of a request line kept in the debug log


class _Handler(BaseHTTPRequestHandler):
    server: "MetricsHTTPServer"
    timeout = SOCKET_TIMEOUT
    server_version = "smtprelay"
    sys_version = ""

    def do_GET(self) -> None:
        target = self.path
        if target.startswith("//"):  # a path, as http.server reads it from Python 3.11.4 on (gh-87389)
            target = "/" + target.lstrip("/")
        path = urlsplit(target).path
        if path == "/metrics":
            self._answer(HTTPStatus.OK, REGISTRY.render(), CONTENT_TYPE)
        elif path == "/healthz":
            if self.server.healthy():
                self._answer(HTTPStatus.OK, "ok\n")
            else:
                self._answer(HTTPStatus.SERVICE_UNAVAILABLE, "unavailable\n")
        else:
            self._answer(HTTPStatus.NOT_FOUND, "not found\n")

    def _answer(self, status: HTTPStatus, text: str, content_type: str = "text/plain; charset=utf-8") -> None:
        body = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args) -> None:
        # http.server writes every request to stderr; a scrape is not news.
        request = fmt % args
        if len(request) > LOGGED_REQUEST:  # a request line may be 64 KB
            request = "%s... (%d characters)" % (request[:LOGGED_REQUEST], len(request))
        log.debug("metrics request", extra=fields(peer=self.client_address[0], request=request))


class MetricsHTTPServer(ListenSocket, ThreadingHTTPServer):
    """Serves /metrics and /healthz on `listener`; `healthy()` decides /healthz.

    Methods for the caller: start() and stop(); bind in the constructor.
    """

    daemon_threads = True  # a stuck scraper must not keep the process alive

    def __init__(self, listener, healthy: Callable[[], bool]):
        self.healthy = healthy
        self._requests = threading.BoundedSemaphore(MAX_REQUESTS)
        self._thread = threading.Thread(target=self.serve, name="smtprelay-metrics", daemon=True)
        super().__init__(listener, _Handler)

    def server_bind(self) -> None:
        # HTTPServer's would also look up our own host name (getfqdn), which
        # can wait on a slow DNS at start-up for a name nothing here uses.
        socketserver.TCPServer.server_bind(self)

    def process_request(self, request, client_address) -> None:
        if not self._requests.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._requests.release()  # no thread will run to release it
            raise

    def process_request_thread(self, request, client_address) -> None:
        deadline = Deadline(REQUEST_DEADLINE)
        deadline.watch(request)
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.expire()
            self._requests.release()

    def handle_error(self, request, client_address) -> None:
        log.debug("metrics request failed", extra=fields(peer=client_address[0]), exc_info=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket; waits for the serving thread."""
        if self._thread.is_alive():
            self.stop_serving(running=True)
            self._thread.join()
        self.server_close()
