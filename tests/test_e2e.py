"""End to end: the relay as a separate process, started from an ini file.

The same tests run against `python relay.py` and against the frozen binary
of `make exe` (set SMTPRELAY_TEST_BINARY=dist/smtprelay; `make test-exe`
does), so they prove what an administrator deploys: bcrypt and ssl bundled,
paths resolved against the ini's folder, the log file written, a clean exit.

Each relay listens on port 0 and the test reads the bound port from its
"listening on" log line, so no port is ever guessed.
"""

import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time

import bcrypt
import pytest

from conftest import accepts_connections, outbox_messages, relay_command, wait_until, write_ini

MESSAGE = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: e2e\r\n\r\nHello from the test.\r\n"
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+) \((\w+)\)")
START_TIMEOUT = 30  # a one-file binary unpacks itself before it starts


class RelayProcess:
    """One relay process: its ini, its working directory, its stderr and log."""

    def __init__(self, ini, cwd, env=None, argv=None):
        """`argv` replaces the default command line, `relay_command() + [ini]`."""
        self.ini = ini
        self.folder = os.path.dirname(ini)
        self.stderr_path = os.path.join(cwd, "relay-stderr.txt")
        self.stderr_file = open(self.stderr_path, "w+", encoding="utf-8", errors="replace")
        kwargs = {}
        if sys.platform == "win32":
            # Ctrl+Break can only be sent to a process in its own group.
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        self.proc = subprocess.Popen(argv or relay_command() + [ini], cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.stderr_file,
                                     env=dict(os.environ, **(env or {})), **kwargs)
        self.ports = {}
        self.returncode = None

    def log_text(self, logfile=None):
        """What the relay logged so far: its stderr, or `logfile` (under the ini's folder)."""
        path = os.path.join(self.folder, logfile) if logfile else self.stderr_path
        if not os.path.exists(path):
            return ""
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()

    @property
    def stderr(self):
        return self.log_text()

    def wait_listening(self, logfile=None):
        """Wait for the "listening on" lines, then until the port accepts."""
        def ready():
            found = dict((scheme, int(port)) for port, scheme in LISTENING.findall(self.log_text(logfile)))
            return found or self.proc.poll() is not None

        assert wait_until(ready, timeout=START_TIMEOUT), "the relay did not start:\n" + self.stderr
        assert self.proc.poll() is None, "the relay exited %s:\n%s" % (self.proc.returncode, self.stderr)
        self.ports = dict((scheme, int(port)) for port, scheme in LISTENING.findall(self.log_text(logfile)))
        self.port = next(iter(self.ports.values()))
        assert wait_until(lambda: accepts_connections(self.port), timeout=START_TIMEOUT)
        return self

    def stop(self):
        """SIGTERM (Ctrl+Break on Windows); returns the exit status."""
        if self.proc.poll() is None:
            if sys.platform == "win32":
                self.proc.send_signal(signal.CTRL_BREAK_EVENT)
            else:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("the relay did not stop within 30s:\n" + self.stderr)
        self.returncode = self.proc.returncode
        self.stderr_file.close()
        return self.returncode


@pytest.fixture
def relay_process(tmp_path):
    """Start the relay command from ini options: relay_process(options, ...).

    The ini is written to tmp_path/conf/relay.ini (or `ini_dir`), the process
    runs in tmp_path/cwd (or `cwd`) so relative paths must resolve against
    the ini's folder. Defaults: listen 127.0.0.1:0, hostname e2e.test,
    remotes file:outbox. At teardown every relay gets SIGTERM and must exit 0
    without a traceback.
    """
    started = []

    def start(options=None, ini_dir=None, cwd=None, env=None, logfile=None):
        merged = {"listen": "127.0.0.1:0", "hostname": "e2e.test", "remotes": "file:outbox"}
        merged.update(options or {})
        folder = str(ini_dir or tmp_path / "conf")
        workdir = str(cwd or tmp_path / "cwd")
        os.makedirs(folder, exist_ok=True)
        os.makedirs(workdir, exist_ok=True)
        ini = os.path.join(folder, "relay%d.ini" % len(started))
        write_ini(ini, merged)
        relay = RelayProcess(ini, workdir, env)
        started.append(relay)
        return relay.wait_listening(logfile or merged.get("logfile"))

    yield start
    stop_cleanly(started)


def stop_cleanly(relays):
    """SIGTERM every relay; each must exit 0 without a traceback."""
    failures = []
    for relay in relays:
        status = relay.stop()
        if status != 0 or "Traceback" in relay.stderr:
            failures.append("exit %s, stderr:\n%s" % (status, relay.stderr))
    assert not failures, "\n".join(failures)


def _outbox(relay):
    return outbox_messages(os.path.join(relay.folder, "outbox"))


# -- SPEC 6: the process starts, serves and stops --------------------------------

def test_6_sigterm_exits_0(relay_process):
    relay = relay_process()
    assert relay.ports == {"plain": relay.port}
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        code, banner = client.ehlo("e2e.client")
        assert code == 250 and banner.startswith(b"e2e.test")
    assert relay.stop() == 0
    text = relay.stderr
    assert "Traceback" not in text
    assert "started" in text and "stopped" in text


@pytest.mark.skipif(sys.platform == "win32", reason="Ctrl+C is a console event there, not a signal")
def test_6_sigint_exits_0(relay_process):
    relay = relay_process()
    relay.proc.send_signal(signal.SIGINT)
    assert relay.proc.wait(timeout=30) == 0
    assert "stopped" in relay.stderr and "Traceback" not in relay.stderr


def test_6_sigterm_closes_idle_session_with_421(relay_process):
    relay = relay_process()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        sock.sendall(b"HELO e2e.client\r\n")
        assert reader.readline().startswith(b"250 ")
        assert relay.stop() == 0
        assert reader.readline() == b"421 4.3.2 Shutting down\r\n"
        assert reader.readline() == b""  # and closed


# -- SPEC 5.1: file: remote ------------------------------------------------------

def test_5_1_plain_submission_lands_in_file_outbox(relay_process):
    relay = relay_process()
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("e2e.client")
        client.sendmail("a@example.com", ["b@example.org", "c@example.org"], MESSAGE)
    messages = _outbox(relay)
    assert len(messages) == 1
    meta, body = messages[0]
    assert meta["from"] == "a@example.com"
    assert meta["to"] == ["b@example.org", "c@example.org"]
    assert body.startswith(b"Received: ")
    assert body.endswith(MESSAGE)


# -- SPEC 5.3: forwarding to an SMTP remote ---------------------------------------

def test_5_3_forwards_to_smtp_remote(relay_process, sink):
    relay = relay_process({"remotes": "smtp://127.0.0.1:%d" % sink.port})
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.sendmail("a@example.com", ["b@example.org"], MESSAGE)
    assert wait_until(lambda: len(sink.box) == 1)
    got = sink.box[0]
    assert got.mail_from == "a@example.com"
    assert got.rcpt_tos == ["b@example.org"]
    assert got.content.endswith(MESSAGE)
    assert b"by e2e.test" in got.content.split(b"\r\n\r\n")[0]
    assert _outbox(relay) == []


def test_4_1_remote_5xx_passes_through(relay_process, sink):
    sink.handler.data_reply = "554 5.7.1 Policy says no"
    relay = relay_process({"remotes": "smtp://127.0.0.1:%d" % sink.port})
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail("a@example.com", ["b@example.org"], MESSAGE)
    assert err.value.smtp_code == 554
    assert b"Policy says no" in err.value.smtp_error


# -- SPEC 2.4 and 3.2: STARTTLS and AUTH PLAIN against a bcrypt users file -------------

def _users_file(folder, name="users.txt"):
    os.makedirs(folder, exist_ok=True)
    hashed = bcrypt.hashpw(b"s3cret pass", bcrypt.gensalt(rounds=4)).decode("ascii")
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write("# user hash allowed-from\napp1 %s\n" % hashed)
    return path


def test_2_4_starttls_auth_plain_with_bcrypt_users(relay_process, certs, tmp_path):
    users = _users_file(str(tmp_path / "conf"))
    relay = relay_process({"listen": "starttls://127.0.0.1:0", "local_cert": certs.cert_path,
                           "local_key": certs.key_path, "allowed_users": users})
    assert relay.ports == {"starttls": relay.port}
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("e2e.client")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")  # AUTH only under TLS
        client.starttls(context=certs.client_context())
        client.ehlo("e2e.client")
        assert "PLAIN" in client.esmtp_features["auth"].upper().split()
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            client.login("app1", "wrong")
        assert err.value.smtp_code == 535
        client.user, client.password = "APP1", "s3cret pass"  # user names compare case-insensitively
        code, text = client.auth("PLAIN", client.auth_plain)
        assert code == 235, text
        client.sendmail("a@example.com", ["b@example.org"], MESSAGE)
    messages = _outbox(relay)
    assert len(messages) == 1
    assert b"with ESMTPSA (TLS" in messages[0][1].split(b"\r\n\r\n")[0]  # Received: TLS and AUTH


def test_3_2_auth_required_before_mail(relay_process, certs, tmp_path):
    users = _users_file(str(tmp_path / "conf"))
    relay = relay_process({"listen": "starttls://127.0.0.1:0", "local_cert": certs.cert_path,
                           "local_key": certs.key_path, "allowed_users": users})
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.starttls(context=certs.client_context())
        client.ehlo("e2e.client")
        code, _ = client.mail("a@example.com")
        assert code == 530
    assert _outbox(relay) == []


# -- SPEC 4.2: the scanning webhook ---------------------------------------------

def test_4_2_webhook_reject(relay_process, webhook):
    webhook.script = lambda request: (200, {"action": "reject", "code": 550, "reason": "Virus found"}, 0)
    relay = relay_process({"webhook_url": webhook.url, "webhook_secret": "k3y"})
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail("a@example.com", ["b@example.org"], MESSAGE)
    assert err.value.smtp_code == 550
    assert err.value.smtp_error == b"5.7.1 Virus found"
    assert len(webhook.requests) == 1
    request = webhook.requests[0]
    assert request.json["from"] == "a@example.com" and request.json["to"] == ["b@example.org"]
    assert request.headers["X-Smtprelay-Signature"].startswith("sha256=")
    assert _outbox(relay) == []


def test_4_2_webhook_down_is_451(relay_process, webhook):
    webhook.script = lambda request: (503, None, 0)
    relay = relay_process({"webhook_url": webhook.url})
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail("a@example.com", ["b@example.org"], MESSAGE)
    assert err.value.smtp_code == 451
    assert _outbox(relay) == []


# -- SPEC 2.2: relative paths resolve against the ini's folder ---------------------

def test_2_2_relative_paths_resolve_against_ini_folder(relay_process, certs, tmp_path):
    """As a Windows service does: the process runs elsewhere (system32)."""
    app = tmp_path / "app"
    (app / "tls").mkdir(parents=True)
    shutil.copy(certs.cert_path, str(app / "tls" / "server.pem"))
    shutil.copy(certs.key_path, str(app / "tls" / "server.key"))
    _users_file(str(app), "users.txt")
    (app / "aliases.txt").write_text("postmaster@e2e.test b@example.org\n", encoding="utf-8")
    elsewhere = tmp_path / "system32"
    relay = relay_process({"listen": "starttls://127.0.0.1:0", "local_cert": "tls/server.pem",
                           "local_key": "tls/server.key", "allowed_users": "users.txt",
                           "aliases_file": "aliases.txt", "remotes": "file:outbox",
                           "logfile": "relay.log"},
                          ini_dir=app, cwd=elsewhere)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.starttls(context=certs.client_context())
        client.login("app1", "s3cret pass")
        client.sendmail("a@example.com", ["postmaster@e2e.test"], MESSAGE)
    assert relay.stop() == 0
    messages = _outbox(relay)
    assert len(messages) == 1
    assert messages[0][0]["to"] == ["b@example.org"]  # the aliases file was read
    assert "listening on" in relay.log_text("relay.log")
    assert sorted(os.listdir(str(elsewhere))) == ["relay-stderr.txt"]  # nothing written in the cwd


# -- SPEC 2.3: log_format json to a logfile -------------------------------------------

def test_2_3_log_format_json_to_logfile(relay_process):
    relay = relay_process({"logfile": "logs.json", "log_format": "json", "log_level": "debug"})
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.sendmail("a@example.com", ["b@example.org"], MESSAGE)
    assert relay.stop() == 0
    assert relay.stderr == ""  # everything went to the file
    lines = relay.log_text("logs.json").splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:  # the key names of the Go program's (zerolog's) JSON
        assert set(record) >= {"time", "level", "message"}
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d)$", record["time"]), record
    msgs = [r["message"] for r in records]
    assert "started" in msgs and msgs[-1] == "stopped"
    delivered = [r for r in records if r["message"] == "message"]
    assert len(delivered) == 1
    assert delivered[0]["from"] == "a@example.com" and delivered[0]["to"] == ["b@example.org"]
    # Every line of the session carries its id and the client's port.
    ours = [r for r in records if r.get("session") == delivered[0]["session"]]
    assert [r["message"] for r in ours] == ["connected", "message", "disconnected"]
    assert {r["port"] for r in ours} == {delivered[0]["port"]} and delivered[0]["port"] > 0
    assert "Hello from the test" not in "\n".join(lines)  # never a message body


def test_2_3_logfile_in_missing_folder_is_config_error(tmp_path):
    ini = tmp_path / "relay.ini"
    write_ini(ini, {"listen": "127.0.0.1:0", "remotes": "file:outbox", "logfile": "missing/relay.log"})
    proc = subprocess.Popen(relay_command() + [str(ini)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        proc.terminate()  # not kill: the one-file launcher passes SIGTERM on to the relay
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 2, stderr
    assert stderr.startswith("smtprelay: config: logfile: ") and "Traceback" not in stderr


# -- SPEC 1: the frozen program is self-contained ----------------------------------

@pytest.mark.skipif(not os.environ.get("SMTPRELAY_TEST_BINARY"), reason="only for the frozen binary")
def test_1_frozen_binary_runs_from_a_copy(tmp_path):
    """The deployment of the README: one file and its ini in a folder of their own."""
    app = tmp_path / "app"
    app.mkdir()
    binary = str(app / os.path.basename(relay_command()[0]))
    shutil.copy2(relay_command()[0], binary)
    write_ini(app / "smtprelay.ini", {"listen": "127.0.0.1:0", "remotes": "file:outbox"})
    started = time.monotonic()
    result = subprocess.run([binary, "-check", str(app / "smtprelay.ini")], cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "remotes = file:%s" % (app / "outbox") in result.stdout
    assert time.monotonic() - started < 20
