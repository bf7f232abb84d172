"""Listeners, admission and lifecycle of the SMTP side (SPEC 3.1, 6, 12).

Owns the listening sockets (one `ThreadingTCPServer` per listen address), the
connection slots of max_connections, the refusals at accept (allowed_nets,
full server), which peers must send a PROXY header (proxy_nets), the TLS
contexts of `tls_profile`, and ending the sessions at shutdown. Must not
speak SMTP past those first refusals: each admitted client is a `Session`,
which hands its messages to the handler it is given.

Session threads are reused (`_Workers`): `ThreadingTCPServer` would start a
thread per connection, and with one message per connection the clone, the
new stack and the listener waiting for the thread to run cost about 15 % of
the relay's time. A finished session thread waits a while for the next
accepted socket instead; a new thread starts whenever none is waiting, so
every admitted client gets its own thread at once.
"""

import queue
import random
import socket
import socketserver
import ssl
import threading
import warnings
from typing import List, Optional, Set, Tuple

from relay_lib import metrics, replies
from relay_lib.config.settings import ConfigError, Listener
from relay_lib.delivery.aliases import Aliases
from relay_lib.inbound import policy, proxy
from relay_lib.inbound.client_limits import ClientLimits
from relay_lib.inbound.session import Handler, Session
from relay_lib.inbound.wire import NoTLS, Wire, WireError
from relay_lib.listen import ListenError, ListenSocket
from relay_lib.logs import fields, log, rebind_session, session_context
from relay_lib.replies import Reply

ACCEPT_QUEUE = 128  # listen() backlog; socketserver's default of 5 drops bursts
REFUSAL_SEND_TIMEOUT = 1.0  # seconds; a refusal is one short write on a fresh socket
# tls:// refusals need a handshake, so they take a thread; this caps how many
# run at once so a flood cannot turn refusals into unbounded threads.
MAX_TLS_REFUSALS = 8
# Finished session threads kept for the next connection (see _Workers): enough
# for a burst of short sessions; beyond this, a finished thread ends.
MAX_IDLE_WORKERS = 32
WORKER_IDLE = 60.0  # seconds an idle session thread waits before it ends

# tls_profile (SPEC 2.3) -> (minimum version, cipher string for TLS <= 1.2)
TLS_PROFILES = {
    "default": (ssl.TLSVersion.TLSv1_2, None),
    "modern": (ssl.TLSVersion.TLSv1_3, None),
    "intermediate": (ssl.TLSVersion.TLSv1_2, "ECDHE+AESGCM:ECDHE+CHACHA20"),
    # Old printers and scanners: TLS 1.0 with SHA-1 needs OpenSSL security level 0.
    "legacy": (ssl.TLSVersion.TLSv1, "DEFAULT:@SECLEVEL=0"),
}


def make_server_context(settings) -> Optional[ssl.SSLContext]:
    """The server TLS context for tls:// and starttls:// listeners, or None.

    Raises:
        ConfigError: missing or unreadable certificate or key.
    """
    if not any(listener.scheme in ("tls", "starttls") for listener in settings.listen):
        return None
    if not settings.local_cert or not settings.local_key:
        raise ConfigError("local_cert", "tls:// and starttls:// listeners need local_cert and local_key")
    minimum, ciphers = TLS_PROFILES[settings.tls_profile]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        with warnings.catch_warnings():
            # TLS 1.0 is deprecated; `legacy` is the operator's explicit choice.
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = minimum
        if ciphers:
            context.set_ciphers(ciphers)
    except (ValueError, ssl.SSLError) as exc:
        raise ConfigError("tls_profile", "%s is not supported by this OpenSSL: %s"
                          % (settings.tls_profile, exc)) from None
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(settings.local_cert, settings.local_key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise ConfigError("local_cert", "cannot load %s with key %s: %s"
                          % (settings.local_cert, settings.local_key, reason)) from None
    return context


class _Slots:
    """The connection semaphore: a counter with a cap, never waited on.

    A full relay refuses at once rather than queueing (SPEC 3.1), and stop()
    can wait for the count to reach zero, which a plain Semaphore cannot do.
    """

    def __init__(self, limit: int):
        self.limit = limit  # -1: unlimited
        self.count = 0
        self._cond = threading.Condition()

    def try_acquire(self) -> bool:
        with self._cond:
            if 0 <= self.limit <= self.count:
                return False
            self.count += 1
            return True

    def release(self) -> None:
        with self._cond:
            self.count -= 1
            self._cond.notify_all()

    def wait_empty(self, timeout: Optional[float]) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count == 0, timeout)


class _Workers:
    """Session threads that take the next accepted socket when they finish.

    submit() hands a job to an idle thread if one waits, else starts a new
    thread, so a session never queues behind another. Bookkeeping:
    `_idle` is the number of waiting threads minus the jobs queued for them,
    changed only under `_lock` (submit() queues under the lock, so a thread
    that times out can tell whether a job was meant for it).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = 0
        self._closed = False

    def submit(self, run, *args) -> None:
        """Run `run(*args)` in a session thread.

        Raises:
            RuntimeError: no thread could be started.
        """
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                self._jobs.put((run, args))
                return
        threading.Thread(target=self._work, args=(run, args), name="smtprelay-session",
                         daemon=True).start()

    def close(self) -> None:
        """Let every waiting thread end (at stop)."""
        with self._lock:
            self._closed = True
            waiting, self._idle = self._idle, 0
            for _ in range(waiting):
                self._jobs.put(None)

    def _work(self, run, args) -> None:
        job = (run, args)
        while job is not None:
            run, args = job
            run(*args)
            job = self._next_job()

    def _next_job(self):
        """The next job for a finished thread, or None when it should end."""
        with self._lock:
            if self._closed or self._idle >= MAX_IDLE_WORKERS:
                return None
            self._idle += 1
        try:
            return self._jobs.get(timeout=WORKER_IDLE)
        except queue.Empty:
            with self._lock:
                try:
                    return self._jobs.get_nowait()  # queued just as the wait ended
                except queue.Empty:
                    self._idle -= 1
                    return None


class RelayServer(ListenSocket, socketserver.ThreadingTCPServer):
    """One listen address. Admission happens here, in the accept thread, so a
    refused client never costs a thread (except on tls://, see below).
    """

    daemon_threads = True  # a stuck client must not keep the process alive
    block_on_close = False  # stop() waits on the slots, with a time limit
    request_queue_size = ACCEPT_QUEUE

    def __init__(self, relay: "Relay", listener: Listener):
        self.relay = relay
        self.listener = listener
        super().__init__(listener, _Handler)
        label = str(listener._replace(port=self.server_address[1]))  # port 0: the one bound
        self.sessions_open, self.sessions = metrics.SESSIONS_OPEN.labels(label), metrics.SESSIONS.labels(label)

    def process_request(self, request, client_address) -> None:
        self.relay.accept(self, request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        # As socketserver's, except that the socket is only closed at the end:
        # the session's Wire has already shut it down and closed it, and a
        # second shutdown() would only fail.
        self.sessions.inc()
        self.sessions_open.inc()
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.close_request(request)
            self.relay.release_slot()
            self.sessions_open.dec()

    def handle_error(self, request, client_address) -> None:
        # socketserver prints a traceback to stderr; log it instead.
        log.exception("connection handler failed", extra=fields(peer=client_address[0]))


class _Handler(socketserver.BaseRequestHandler):
    server: "RelayServer"

    def handle(self) -> None:
        peer = self.client_address[0]
        if self.server.address_family != socket.AF_INET:
            # ::ffff:a.b.c.d from a dual-stack listener is logged and stamped
            # as IPv4. An AF_INET peer is already in that form: no parsing.
            peer = str(policy.peer_address(peer))
        self.server.relay.serve(self.request, peer, self.client_address[1], self.server.listener)


class Relay:
    """The whole SMTP side: every listener, the users table, the sessions.

    Methods for the caller: start(), stop(), addresses, active_sessions,
    listening(). Methods for the listeners: accept(), serve(), release_slot().
    """

    def __init__(self, settings, handler: Handler, aliases: Aliases):
        self.settings = settings
        self.handler = handler
        self.users = (policy.Users(settings.allowed_users, settings.auth_cache_ttl, settings.read_timeout)
                      if settings.allowed_users else None)
        self.aliases = aliases  # delivery's table: RCPT routing and delivery agree
        self.client_limits = ClientLimits(settings)
        self.tls_context: Optional[ssl.SSLContext] = None
        self.addresses: List[Tuple[str, str, int]] = []
        self._servers: List[RelayServer] = []
        self._threads: List[threading.Thread] = []
        self._slots = _Slots(settings.max_connections)
        self._tls_refusals = threading.BoundedSemaphore(MAX_TLS_REFUSALS)
        self._workers = _Workers()
        self._sessions: Set[Session] = set()
        self._lock = threading.Lock()
        self._stopping = False

    @property
    def active_sessions(self) -> int:
        return self._slots.count

    def listening(self) -> bool:
        """True while it accepts connections: started, and not shutting down."""
        return not self._stopping and any(t.is_alive() for t in self._threads)

    def start(self) -> None:
        """Bind every listener and start serving.

        Raises:
            ConfigError: TLS certificate problems.
            ListenError: a listen address cannot be bound.
        """
        self.tls_context = make_server_context(self.settings)
        try:
            for listener in self.settings.listen:
                try:
                    server = RelayServer(self, listener)
                except OSError as exc:
                    raise ListenError(str(listener), exc) from None
                self._servers.append(server)
                host, port = server.server_address[:2]
                self.addresses.append((listener.scheme, str(host), port))
        except BaseException:
            for server in self._servers:
                server.server_close()
            self._servers = []
            self.addresses = []
            raise
        for server, (scheme, host, port) in zip(self._servers, self.addresses):
            thread = threading.Thread(target=server.serve, name="smtprelay-listen-%d" % port, daemon=True)
            thread.start()
            self._threads.append(thread)
            log.info("listening on %s:%d (%s)", "[%s]" % host if ":" in host else host, port, scheme)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop accepting, end idle sessions with 421 4.3.2, and wait for
        messages in progress up to `timeout` (default data_timeout) (SPEC 6).
        The handler is the caller's to close afterwards.
        """
        if timeout is None:
            timeout = self.settings.data_timeout
        with self._lock:
            self._stopping = True
            sessions = list(self._sessions)
        for index, server in enumerate(self._servers):
            server.stop_serving(running=index < len(self._threads))
        for server in self._servers:
            server.server_close()
        self._workers.close()
        for session in sessions:
            session.shutdown()
        if not self._slots.wait_empty(timeout):
            log.warning("sessions still running at shutdown", extra=fields(count=self._slots.count))

    # ---- called from the listeners ------------------------------------------

    def accept(self, server: RelayServer, sock: socket.socket, client_address) -> None:
        """A new connection, in the accept thread: refuse it at once, or give
        it a slot and a session thread (SPEC 3.1)."""
        refusal = self._admit(client_address[0])
        if refusal is not None:
            self._refuse(server, sock, client_address, refusal)
            return
        try:
            self._workers.submit(server.process_request_thread, sock, client_address)
        except Exception:
            self._slots.release()  # no thread will run to release it
            raise

    def release_slot(self) -> None:
        """A session thread is done with its connection."""
        self._slots.release()

    def _admit(self, ip: str) -> Optional[Reply]:
        """None and a taken slot, or the refusal for this client (SPEC 3.1).

        A load balancer's connection is checked against allowed_nets only
        once its PROXY header has named the client (see serve).
        """
        if self._stopping:
            metrics.CONNECTIONS_REFUSED.labels("shutting_down").inc()
            return replies.SHUTTING_DOWN
        if not self._proxied(ip):
            refusal = self._check_peer(ip)
            if refusal is not None:
                return refusal
        if not self._slots.try_acquire():
            metrics.CONNECTIONS_REFUSED.labels("too_many").inc()
            log.warning("connection refused: max_connections reached",
                        extra=fields(peer=ip, max_connections=self.settings.max_connections))
            return replies.too_many_connections(self.settings.hostname)
        return None

    def _check_peer(self, ip: str) -> Optional[Reply]:
        refusal = policy.check_peer(self.settings, ip)
        if refusal is not None:
            metrics.CONNECTIONS_REFUSED.labels("not_allowed").inc()
            log.warning("connection refused: address not in allowed_nets", extra=fields(peer=ip))
        return refusal

    def _proxied(self, ip: str) -> bool:
        """True when the peer is a load balancer that must send a PROXY header (SPEC 12)."""
        return bool(self.settings.proxy_nets) and policy.in_nets(ip, self.settings.proxy_nets)

    def _proxy_client(self, wire: Wire, ip: str) -> Optional[str]:
        """The client address from the PROXY header the peer `ip` sends first,
        `ip` itself for LOCAL, or None when the header is missing or bad and
        the connection must be closed without a reply."""
        try:
            found = wire.read_proxy_header()
        except (WireError, ValueError) as exc:
            metrics.CONNECTIONS_REFUSED.labels("proxy_header").inc()
            log.warning("connection closed: no valid PROXY header", extra=fields(peer=ip, reason=str(exc)))
            return None
        if found is proxy.LOCAL:
            log.debug("PROXY header without a client address", extra=fields(peer=ip))
            return ip
        address, port = found  # type: ignore[misc]  # not LOCAL: (address, port)
        client = str(policy.peer_address(address))
        rebind_session(port=port)  # every later line names the client's port, not the proxy's
        log.debug("PROXY header", extra=fields(peer=client, proxy=ip))
        return client

    def _refuse(self, server: RelayServer, sock: socket.socket, client_address, reply: Reply) -> None:
        """Send a refusal and close, without taking a session slot."""
        if server.listener.scheme == "tls":
            # The reply must go inside TLS, so it needs a handshake and a thread.
            if self._tls_refusals.acquire(blocking=False):
                thread = threading.Thread(target=self._tls_refusal, name="smtprelay-refusal", daemon=True,
                                          args=(server, sock, client_address, reply))
                thread.start()
                return
            server.shutdown_request(sock)
            return
        try:
            sock.settimeout(REFUSAL_SEND_TIMEOUT)
            sock.sendall(reply.line())
        except OSError:
            log.debug("could not send refusal", extra=fields(peer=client_address[0]))
        server.shutdown_request(sock)

    def _tls_refusal(self, server: RelayServer, sock: socket.socket, client_address,
                     reply: Reply) -> None:
        ip = client_address[0]
        try:
            wire = self._wire(sock)
            # A load balancer's header comes before the TLS handshake.
            if not self._proxied(ip) or self._proxy_client(wire, ip) is not None:
                self._send_refusal(wire, True, ip, reply)
        finally:
            server.shutdown_request(sock)
            self._tls_refusals.release()

    def _send_refusal(self, wire: Wire, tls: bool, ip: str, reply: Reply) -> None:
        """Send a refusal on an accepted connection, inside TLS on tls://, and close."""
        try:
            if tls:
                wire.start_tls(self.tls_context)
            wire.write(reply)
        except WireError as exc:
            log.debug("could not send refusal", extra=fields(peer=ip, reason=str(exc)))
        wire.close()

    def _wire(self, sock: socket.socket) -> Wire:
        s = self.settings
        return Wire(sock, s.read_timeout, s.write_timeout, s.data_timeout)

    def serve(self, sock: socket.socket, ip: str, port: int, listener: Listener) -> None:
        """Run one admitted client: its PROXY header from a load balancer,
        TLS on tls://, then the session.

        Every line logged meanwhile carries a short session id and the
        client's port, so parallel sessions from one host can be told apart.
        """
        with session_context(session="%08x" % random.getrandbits(32), port=port):
            self._serve_session(sock, ip, listener)

    def _serve_session(self, sock: socket.socket, ip: str, listener: Listener) -> None:
        wire = self._wire(sock)
        if self._proxied(ip):
            ip = self._proxy_client(wire, ip)
            if ip is None:
                return
            refusal = self._check_peer(ip)
            if refusal is not None:
                self._send_refusal(wire, listener.scheme == "tls", ip, refusal)
                return
        refusal = self.client_limits.connect(ip)  # the client's own address, past any PROXY header
        if refusal is not None:
            self._send_refusal(wire, listener.scheme == "tls", ip, refusal)
            return
        try:
            self._secure_and_run(wire, ip, listener)
        finally:
            self.client_limits.disconnect(ip)

    def _secure_and_run(self, wire: Wire, ip: str, listener: Listener) -> None:
        if listener.scheme == "tls":
            try:
                wire.start_tls(self.tls_context)
            except NoTLS:
                # A TCP health check (or a port scan): it connected and closed.
                log.debug("closed before TLS", extra=fields(peer=ip))
                return
            except WireError as exc:
                metrics.CONNECTIONS_REFUSED.labels("tls_handshake").inc()
                log.warning("tls handshake failed", extra=fields(peer=ip, reason=str(exc)))
                return
        session = Session(self.settings, wire, ip, self.handler, users=self.users, aliases=self.aliases,
                          client_limits=self.client_limits,
                          starttls_context=self.tls_context if listener.scheme == "starttls" else None,
                          implicit_tls=listener.scheme == "tls")
        with self._lock:
            self._sessions.add(session)
            stopping = self._stopping
        if stopping:
            session.shutdown()
        try:
            session.run()
        finally:
            with self._lock:
                self._sessions.discard(session)
            wire.close()
