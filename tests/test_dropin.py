"""SPEC 2.1-2.3 and 6: an existing Go smtprelay setup, started as it is.

Each test runs the relay as a process (`python relay.py`, or the frozen
binary under `make test-exe`) with an ini, a .env file or environment
variables written the way a Go smtprelay user has them.
"""

import errno
import os
import re
import signal
import smtplib
import socket
import stat
import subprocess

import bcrypt
import pytest

from conftest import outbox_messages, relay_command, wait_until
from dropin_kit import copy_program, run
from relay_lib import __version__, cli
from test_e2e import RelayProcess, stop_cleanly

GO_INI = r"""; smtprelay configuration, as the Go program's users write it
# Hostname for this SMTP server (empty: the default)
hostname =
welcome_msg = Go relay ; at your service
listen = 127.0.0.1:0
; Regexes are Go (RE2) syntax
allowed_sender = ^[[:alnum:]._-]+@example\.com$
max_connections = 0
remotes = file:outbox
"""
MESSAGE = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: go\r\n\r\nHello.\r\n"


@pytest.fixture
def go_relay(tmp_path):
    """Start the relay with a command line of the test's choosing:
    go_relay(argv, cwd, log_folder, env). Each must exit 0 at teardown."""
    started = []

    def start(argv, cwd, log_folder, env=None):
        relay = RelayProcess(os.path.join(str(log_folder), "relay.ini"), str(cwd), env=env, argv=argv)
        started.append(relay)
        return relay.wait_listening()

    yield start
    stop_cleanly(started)


def folders(tmp_path):
    conf, cwd = tmp_path / "conf", tmp_path / "cwd"
    conf.mkdir()
    cwd.mkdir()
    return conf, cwd


def check_output(*args, cwd, **env):
    result = run(relay_command() + ["-check"] + list(args), cwd, **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "configuration OK"
    return result


# -- 2.1 where the configuration comes from ---------------------------------------

def test_2_1_empty_env_var_is_ignored(tmp_path, go_relay):
    conf, cwd = folders(tmp_path)
    (conf / "smtprelay.ini").write_text(GO_INI + "hostname = go.example\n")
    env = {"SMTPRELAY_ALLOWED_SENDER": "", "SMTPRELAY_HOSTNAME": "", "SMTPRELAY_ALLOWED_NETS": "",
           "SMTPRELAY_ALLOWED_USERS": ""}
    relay = go_relay(relay_command() + [str(conf / "smtprelay.ini")], cwd, conf, env)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        code, text = client.ehlo("client.test")
        assert code == 250 and text.startswith(b"go.example")
        assert client.mail("intruder@evil.test") == (553, b"5.7.1 Sender address not allowed")
    result = check_output(str(conf / "smtprelay.ini"), cwd=cwd, **env)
    assert "allowed_nets = 127.0.0.0/8 ::1/128" in result.stdout.splitlines()


def test_2_1_smtprelay_config_names_the_file(tmp_path, go_relay):
    conf, cwd = folders(tmp_path)
    (conf / "smtprelay.ini").write_text(GO_INI + "hostname = from-env.example\n")
    relay = go_relay(relay_command(), cwd, conf, {"SMTPRELAY_CONFIG": str(conf / "smtprelay.ini")})
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        assert client.ehlo("client.test")[1].startswith(b"from-env.example")
        client.sendmail("good@example.com", ["b@example.org"], MESSAGE)
    assert len(outbox_messages(str(conf / "outbox"))) == 1  # relative to the named file


def test_2_1_flag_beats_smtprelay_config(tmp_path):
    conf, cwd = folders(tmp_path)
    (conf / "env.ini").write_text("hostname = env.example\nremotes = file:outbox\n")
    (conf / "flag.ini").write_text("hostname = flag.example\nremotes = file:outbox\n")
    env = {"SMTPRELAY_CONFIG": str(conf / "env.ini")}
    assert "hostname = flag.example" in check_output("-config", str(conf / "flag.ini"), cwd=cwd, **env).stdout
    assert "hostname = flag.example" in check_output(str(conf / "flag.ini"), cwd=cwd, **env).stdout
    assert "hostname = env.example" in check_output(cwd=cwd, **env).stdout


def test_2_1_dotenv_in_working_folder(tmp_path, go_relay):
    conf, cwd = folders(tmp_path)
    (cwd / ".env").write_text(
        "# smtprelay in docker\n"
        "SMTPRELAY_LISTEN=127.0.0.1:0\n"
        "SMTPRELAY_HOSTNAME=\"dotenv.example\"\n"
        "remotes = file:outbox\n"
        "SMTPRELAY_ALLOWED_SENDER=^[[:alnum:]]+@example\\.com$\n")
    relay = go_relay(relay_command(), cwd, conf, {"SMTPRELAY_HOSTNAME": ""})
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        assert client.ehlo("client.test")[1].startswith(b"dotenv.example")
        assert client.mail("not.alnum@example.com")[0] == 553
        client.rset()
        client.sendmail("alnum@example.com", ["b@example.org"], MESSAGE)
    assert len(outbox_messages(str(cwd / "outbox"))) == 1
    # A named file wins over .env, as SMTPRELAY_CONFIG does.
    (conf / "r.ini").write_text("hostname = ini.example\nremotes = file:outbox\n")
    assert "hostname = ini.example" in check_output(str(conf / "r.ini"), cwd=cwd).stdout


@pytest.mark.parametrize("line,option", [("COMPOSE_PROJECT_NAME=relay", "COMPOSE_PROJECT_NAME"),
                                         ("SMTPRELAY_HOSTNAME=", "config"),
                                         ("SMTPRELAY_CONFIG=/etc/smtprelay.ini", "config")],
                         ids=["foreign-key", "empty-value", "config-file"])
def test_2_1_dotenv_mistake_is_one_line_exit_2(tmp_path, line, option):
    conf, cwd = folders(tmp_path)
    (cwd / ".env").write_text("SMTPRELAY_REMOTES=file:outbox\n%s\n" % line)
    result = run(relay_command(), cwd)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("smtprelay: config: %s: " % option), result.stderr
    assert "line 2" in result.stderr and len(result.stderr.splitlines()) == 1


def test_2_1_ini_beside_the_program(tmp_path, go_relay):
    """A service installed without -config: the ini sits beside the exe."""
    program = copy_program(str(tmp_path / "app"))
    (tmp_path / "app" / "smtprelay.ini").write_text(GO_INI)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    relay = go_relay(program, cwd, tmp_path / "app")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        assert client.ehlo("client.test")[1].startswith(b"localhost.localdomain")
        client.sendmail("good@example.com", ["b@example.org"], MESSAGE)
    assert len(outbox_messages(str(tmp_path / "app" / "outbox"))) == 1


def test_2_1_no_config_file_is_usage_and_exit_2(tmp_path):
    program = copy_program(str(tmp_path / "app"))
    result = run(program, tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("smtprelay: no config file: ")
    assert "usage: smtprelay" in result.stderr
    assert "listening" not in result.stderr and "Traceback" not in result.stderr


def test_2_1_unknown_smtprelay_variable_is_warned_once(tmp_path, go_relay):
    conf, cwd = folders(tmp_path)
    (conf / "relay.ini").write_text(GO_INI)
    # Names are case-sensitive as in Go, except on Windows, where the environment is not.
    env = {"SMTPRELAY_HOSTNAM": "typo.example", "SMTPRELAY_TEST_OWN": "x", "SMTPRELAY_FROM": "a@b",
           "smtprelay_hostname" if os.name != "nt" else "SMTPRELAY_X": "lower.example"}
    result = check_output(str(conf / "relay.ini"), cwd=cwd, **env)
    assert result.stderr.count("SMTPRELAY_HOSTNAM,") == 1
    assert ("smtprelay_hostname" if os.name != "nt" else "SMTPRELAY_X") in result.stderr
    assert "SMTPRELAY_TEST_OWN" not in result.stderr and "SMTPRELAY_FROM" not in result.stderr
    relay = go_relay(relay_command() + [str(conf / "relay.ini")], cwd, conf, env)
    assert relay.stderr.count("SMTPRELAY_HOSTNAM,") == 1


def test_2_1_flag_equals_booleans(tmp_path):
    conf, cwd = folders(tmp_path)
    (conf / "r.ini").write_text("remotes = smtp://h/me@example.com\nlocal_forcetls = true\n")
    out = check_output(str(conf / "r.ini"), "-local_forcetls=false", "--strict_sender=true", cwd=cwd).stdout
    assert "local_forcetls = false" in out.splitlines() and "strict_sender = true" in out.splitlines()
    version = run(relay_command() + ["-version=false", "-check", str(conf / "r.ini")], cwd)
    assert version.stdout.splitlines()[-1] == "configuration OK"


# -- 2.2 / 2.3 values as the Go program reads them --------------------------------

def test_2_2_go_ini_values_mean_what_they_mean_there(tmp_path, go_relay):
    conf, cwd = folders(tmp_path)
    (conf / "relay.ini").write_text(GO_INI + "local_forcetls = true\n"
                                    "remotes = file:outbox smtp://127.0.0.1:9/?skipVerify=yes&recipient=nobody@x\n")
    relay = go_relay(relay_command() + [str(conf / "relay.ini")], cwd, conf)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        assert client.ehlo("client.test")[1].startswith(b"localhost.localdomain")  # hostname = (empty)
        client.sendmail("good@example.com", ["b@example.org"], MESSAGE)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        assert sock.makefile("rb").readline() == b"220 Go relay ; at your service\r\n"
    warning = "local_forcetls has no effect: no starttls:// listener"
    assert wait_until(lambda: warning in relay.stderr) and relay.stderr.count(warning) == 1
    check = check_output(str(conf / "relay.ini"), cwd=cwd)
    assert "max_connections = 100" in check.stdout.splitlines()
    assert "skipVerify=true" in check.stdout and warning in check.stderr


@pytest.mark.parametrize("url,reason", [
    ("smtp://h?recipient=a@x&recipient=b@x", "parameter recipient is given twice"),
    ("file:outbox?skipVerify", "a file: remote takes no ?parameters"),
    ("smtp://h?skipVerify=no", "skipVerify=no is ambiguous"),
])
def test_6_remote_url_mistakes_are_config_errors(tmp_path, url, reason):
    conf, cwd = folders(tmp_path)
    (conf / "r.ini").write_text("remotes = %s\n" % url)
    result = run(relay_command() + ["-check", str(conf / "r.ini")], cwd)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("smtprelay: config: remotes: ") and reason in result.stderr


# -- 2.3 regexes are Go's ---------------------------------------------------------------

def test_2_3_go_regexes_match_as_in_go(tmp_path, go_relay, sink):
    conf, cwd = folders(tmp_path)
    (conf / "relay.ini").write_text(
        "listen = 127.0.0.1:0\n"
        "allowed_sender = ^[[:alpha:]]+\\.\\pL+@\\Qexample.com\\E\\z\n"
        "allowed_recipients = ^[[:^punct:]]+@(?i)EXAMPLE\\.ORG$\n"
        "remotes = smtp://127.0.0.1:%d/?recipient=[[:digit:]]+@example\\.org\n" % sink.port)
    relay = go_relay(relay_command() + [str(conf / "relay.ini")], cwd, conf)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("anna.ærø@examplexcom", ["SMTPUTF8"])[0] == 553  # \Q...\E: the dot is a dot
        assert client.mail("an1a.b@example.com")[0] == 553   # [[:alpha:]]
        assert client.mail("anna.ærø@example.com", ["SMTPUTF8"])[0] == 250  # \pL takes æ
        assert client.rcpt("a.b@example.org")[0] == 550  # [[:^punct:]]
        assert client.rcpt("ab@example.org")[0] == 550       # no remote for a non-digit local part
        assert client.rcpt("42@Example.Org")[0] == 250
        client.data(MESSAGE)
    assert wait_until(lambda: len(sink.box) == 1) and sink.box[0].rcpt_tos == ["42@Example.Org"]
    check = check_output(str(conf / "relay.ini"), cwd=cwd).stdout
    assert re.search(r"^allowed_sender = .*\(as Python: \^\[A-Za-z\]\+", check, re.M)
    assert "recipient=(?i)[0-9]+@example\\.org" in check


@pytest.mark.parametrize("option,regex,why", [
    ("allowed_sender", "^(?!root@)", "look-ahead"),
    ("allowed_recipients", "(a)\\1", "back reference"),
    ("allowed_sender", "@x\\Z", "\\z"),
    ("allowed_sender", "\\p{Greek}", "scripts"),
])
def test_2_3_regex_without_go_meaning_stops_start(tmp_path, option, regex, why):
    conf, cwd = folders(tmp_path)
    (conf / "r.ini").write_text("listen = 127.0.0.1:0\nremotes = file:outbox\n%s = %s\n" % (option, regex))
    result = run(relay_command() + [str(conf / "r.ini")], cwd)
    assert result.returncode == 2
    assert result.stderr.startswith("smtprelay: config: %s: " % option) and why in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "listening" not in result.stderr


# -- 2.3 TLS files -------------------------------------------------------------------

@pytest.mark.parametrize("pick,message", [
    (lambda c: (c.key_path, c.key_path), "config: local_cert: local_cert is not a certificate"),
    (lambda c: (c.cert_path, c.client_key_path), "config: local_key: local_key does not belong to local_cert"),
])
def test_2_3_tls_file_errors_say_what_is_wrong(tmp_path, certs, pick, message):
    conf, cwd = folders(tmp_path)
    cert, key = pick(certs)
    (conf / "r.ini").write_text("listen = starttls://127.0.0.1:0\nlocal_cert = %s\nlocal_key = %s\n"
                                "remotes = file:outbox\n" % (cert, key))
    result = run(relay_command() + [str(conf / "r.ini")], cwd)
    assert result.returncode == 2 and result.stderr.startswith("smtprelay: " + message), result.stderr


# -- 6 -check ---------------------------------------------------------------------------

def test_6_check_prints_remotes_warnings_and_ok(tmp_path, certs):
    conf, cwd = folders(tmp_path)
    good = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    (conf / "users").write_text("printer %s\nscanner Scann3rPw\nbroken\n" % good)
    (conf / "r.ini").write_text(
        "listen = starttls://127.0.0.1:0\nallowed_users = users\n"
        "local_cert = %s\nlocal_key = %s\n"
        "remotes = starttls://app:Rem0tePw@smtp.example.com?auth=login&skipVerify "
        "tls://smtp2.example.com?recipient=.*@b\\.example\n" % (certs.cert_path, certs.key_path))
    result = check_output(str(conf / "r.ini"), cwd=cwd)
    lines = result.stdout.splitlines()
    remotes = [line for line in lines if line.startswith("  remote ")]
    assert remotes[0].startswith(
        "  remote 1: starttls://app:***@smtp.example.com:587 auth=login skipVerify=true recipient=(none)")
    assert remotes[1].startswith(
        "  remote 2: tls://smtp2.example.com:465 auth=plain skipVerify=false recipient=(?i).*@b\\.example")
    assert all(" failover=" in line for line in remotes)  # every field of Remote is shown
    assert "plain-text password" in result.stderr and "line=2" in result.stderr
    assert "line=3" in result.stderr
    for secret in ("Rem0tePw", "Scann3rPw"):
        assert secret not in result.stdout + result.stderr


def test_6_check_warns_about_no_remotes(tmp_path):
    conf, cwd = folders(tmp_path)
    (conf / "r.ini").write_text("listen = 127.0.0.1:0\n")
    result = check_output(str(conf / "r.ini"), cwd=cwd)
    assert result.stderr.count("no remotes and no command configured") == 1


# -- 4.3 command ---------------------------------------------------------------------

@pytest.mark.skipif(os.name == "nt", reason="a POSIX shell script")
def test_4_3_go_command_path_with_spaces_runs(tmp_path, go_relay):
    """The Go program's `command` is one path, spaces and all, no quotes."""
    conf, cwd = folders(tmp_path)
    scripts = conf / "my scripts"
    scripts.mkdir()
    script = scripts / "scan tool.sh"
    script.write_text("#!/bin/sh\ncat > \"$(dirname \"$0\")/got-$SMTPRELAY_ID.eml\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (conf / "relay.ini").write_text("listen = 127.0.0.1:0\ncommand = %s\n" % script)
    relay = go_relay(relay_command() + [str(conf / "relay.ini")], cwd, conf)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.sendmail("a@example.com", ["b@example.org"], MESSAGE)
    got = [name for name in os.listdir(str(scripts)) if name.startswith("got-")]
    assert len(got) == 1 and (scripts / got[0]).read_bytes().endswith(MESSAGE)


# -- 6 signals -----------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(signal, "SIGQUIT"), reason="no SIGHUP or SIGQUIT on Windows")
def test_6_sighup_is_ignored_and_sigquit_stops(tmp_path, go_relay):
    conf, cwd = folders(tmp_path)
    (conf / "relay.ini").write_text(GO_INI)
    relay = go_relay(relay_command() + [str(conf / "relay.ini")], cwd, conf)
    relay.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "SIGHUP ignored" in relay.stderr)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        assert client.noop()[0] == 250
    relay.proc.send_signal(signal.SIGQUIT)
    assert relay.proc.wait(timeout=30) == 0
    assert "signal=SIGQUIT" in relay.stderr and "stopped" in relay.stderr


# -- 6 listen failures -----------------------------------------------------------------

def test_6_listen_address_in_use_is_one_line(tmp_path):
    conf, cwd = folders(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        (conf / "r.ini").write_text("listen = 127.0.0.1:%d\nremotes = file:outbox\n" % port)
        result = run(relay_command() + [str(conf / "r.ini")], cwd)
    assert result.returncode == 1
    line = "smtprelay: listen: 127.0.0.1:%d: already in use (another program listens there)" % port
    assert result.stderr.count(line) == 1 and result.stderr.count("listen: ") == 1, result.stderr


def test_6_listen_address_of_no_interface_is_one_line(tmp_path):
    conf, cwd = folders(tmp_path)
    (conf / "r.ini").write_text("listen = 192.0.2.1:2525\nremotes = file:outbox\n")
    result = run(relay_command() + [str(conf / "r.ini")], cwd)
    assert result.returncode == 1
    assert result.stderr.count(
        "smtprelay: listen: 192.0.2.1:2525: cannot assign (no interface has this address)") == 1, result.stderr


def test_6_listen_permission_denied_names_the_fix():
    class Failure(OSError):
        address = "127.0.0.1:25"

    assert cli.listen_failure(Failure(errno.EACCES, "Permission denied")) == (
        "smtprelay: listen: 127.0.0.1:25: permission denied (ports below 1024 need root or "
        "CAP_NET_BIND_SERVICE, or use a port above 1023)")


# -- 6 -hash-password and -version ---------------------------------------------------------

def test_6_hash_password_strips_one_line_end():
    result = subprocess.run(relay_command() + ["-hash-password"], input=b"s3cret\r\n\n", capture_output=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert bcrypt.checkpw(b"s3cret", result.stdout.strip())
    assert result.stderr == b""


def test_6_hash_password_warns_about_edge_spaces():
    result = subprocess.run(relay_command() + ["-hash-password"], input=b" pw \n", capture_output=True,
                            timeout=60)
    assert result.returncode == 0
    assert bcrypt.checkpw(b" pw ", result.stdout.strip())
    assert b"begins or ends with white space" in result.stderr


def test_6_version_names_the_commit(tmp_path):
    result = run(relay_command() + ["-version"], tmp_path)
    assert result.returncode == 0
    m = re.fullmatch(r"smtprelay/(\S+) \(commit ([0-9a-f]{12}|unknown)\)\n", result.stdout)
    assert m and m.group(1) == __version__, result.stdout
    head = _git_head()
    if head:
        assert m.group(2) == head[:12]


def _git_head():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__), capture_output=True,
                             text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None
