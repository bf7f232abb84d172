"""A raw-socket SMTP client for tests that must control every byte:
pipelining, smuggling, STARTTLS injection, overlong lines, silence.

smtplib is the client for ordinary behaviour; this one sends exactly what it
is given and reads replies as they come.
"""

import socket
import ssl
from typing import List, Optional


class Talk:
    """One connection to the relay; `reply()` returns a whole reply as text."""

    def __init__(self, port: int, host: str = "127.0.0.1", tls: Optional[ssl.SSLContext] = None,
                 timeout: float = 5.0, ehlo: Optional[str] = None, source: Optional[str] = None):
        """With `ehlo`, read the greeting and say EHLO before returning;
        with `source`, connect from that local address (e.g. 127.0.0.2)."""
        self.sock = socket.create_connection((host, port), timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b""
        try:
            if tls is not None:
                self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
            if ehlo is not None:
                self.reply()
                self.cmd("EHLO " + ehlo)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Talk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed; unread: %r" % self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> str:
        """The next reply; the lines of a multi-line reply joined with "\\n"."""
        lines = []
        while True:
            line = self._line()
            lines.append(line.decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    def replies(self, count: int) -> List[str]:
        return [self.reply() for _ in range(count)]

    def cmd(self, line: str) -> str:
        """Send one command line and return its reply."""
        self.send(line.encode("utf-8") + b"\r\n")
        return self.reply()

    def to_data(self, sender: str = "a@example.com", rcpt: str = "b@example.com") -> str:
        """MAIL, one RCPT and DATA; returns the reply to DATA."""
        self.cmd("MAIL FROM:<%s>" % sender)
        self.cmd("RCPT TO:<%s>" % rcpt)
        return self.cmd("DATA")

    def starttls(self, context: ssl.SSLContext) -> None:
        """Upgrade after a 220 to STARTTLS."""
        assert not self.buf, "unread bytes before TLS: %r" % self.buf
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def closed(self) -> bool:
        """True when the relay closed the connection (after any unread reply)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, ssl.SSLError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass  # already reset by the relay


def write_users(path, users, prefix="$2b$") -> str:
    """Write an allowed_users file (SPEC 2.4) from {name: (password, allowed-from or None)}.

    Hashes use the lowest bcrypt cost so the tests stay fast; `prefix`
    rewrites the hash's version ($2a$, $2y$) to check every form loads.
    """
    import bcrypt

    lines = ["# test users"]
    for name, (password, allowed) in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        hashed = prefix + hashed[4:]
        lines.append(" ".join([name, hashed] + ([allowed] if allowed else [])))
    with open(str(path), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)
