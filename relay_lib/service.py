"""The wiring: builds delivery, the spool around it when there is one, the
SMTP listeners and the metrics endpoint, and runs them in order.

Owns the order of start and stop (SPEC 6): the queue is picked up before any
client is accepted; at shutdown the listeners stop first, then the
sessions, then the queue's attempts, then delivery's connections. The only
module besides `cli` that may import from every package.
"""

from typing import List, Optional, Tuple, Union

from relay_lib.config.settings import Settings
from relay_lib.delivery.steps import Delivery
from relay_lib.inbound.server import Relay
from relay_lib.listen import ListenError
from relay_lib.logs import log
from relay_lib.ops.metrics_http import MetricsHTTPServer
from relay_lib.spool.queue import Spool


class Service:
    """One running relay.

    Methods for the caller: start(), stop(), healthy(), and what tests and
    operators look at: addresses, active_sessions, metrics_address, users,
    delivery, spool.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.delivery = Delivery(settings)
        self.spool = Spool(settings, self.delivery) if settings.spool_dir else None
        handler: Union[Delivery, Spool] = self.spool if self.spool is not None else self.delivery
        self.relay = Relay(settings, handler, self.delivery.aliases)
        self._metrics: Optional[MetricsHTTPServer] = None
        self._stopping = False

    @property
    def addresses(self) -> List[Tuple[str, str, int]]:
        return self.relay.addresses

    @property
    def active_sessions(self) -> int:
        return self.relay.active_sessions

    @property
    def users(self):
        return self.relay.users

    @property
    def metrics_address(self) -> Optional[Tuple[str, int]]:
        """(host, port) that serves /metrics, or None without metrics_listen."""
        if self._metrics is None:
            return None
        host, port = self._metrics.server_address[:2]
        return str(host), port

    def healthy(self) -> bool:
        """/healthz (SPEC 12): listening, and not shutting down."""
        return not self._stopping and self.relay.listening()

    def start(self) -> None:
        """Pick up the queue, bind every listener and start serving.

        Raises:
            ConfigError: spool_dir cannot be created, or TLS certificate problems.
            ListenError: a listen address or metrics_listen cannot be bound.
        """
        if self.spool is not None:
            self.spool.start()
        try:
            self.relay.start()
            listener = self.settings.metrics_listen
            if listener is not None:
                try:
                    self._metrics = MetricsHTTPServer(listener, self.healthy)
                except OSError as exc:
                    raise ListenError("metrics_listen %s" % (listener,), exc) from None
        except BaseException:
            self.relay.stop(0)
            if self.spool is not None:
                self.spool.join(0)
            raise
        if self._metrics is not None:
            self._metrics.start()
            log.info("metrics on %s", listener._replace(port=self.metrics_address[1]))

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop accepting, end idle sessions, and wait for messages in progress
        and queue attempts up to `timeout` (default data_timeout) (SPEC 6)."""
        if timeout is None:
            timeout = self.settings.data_timeout
        self._stopping = True
        if self.spool is not None:
            self.spool.stop()  # no new queue attempt; those in progress finish below
        self.delivery.stop_waiting()
        self.relay.stop(timeout)
        if self.spool is not None:
            self.spool.join(timeout)
        self.delivery.close()
        if self._metrics is not None:
            self._metrics.stop()
