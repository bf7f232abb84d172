"""SPEC 2.1, 2.3 and 6: the command line and the real process, start to stop."""

import os
import socket
import subprocess

import bcrypt
import pytest

from conftest import ROOT, relay_command, write_ini
from relay_lib import __version__


def run_relay(*args, stdin=None, cwd=None, env=None):
    merged = dict(os.environ, **(env or {}))
    return subprocess.run(relay_command() + list(args), input=stdin, capture_output=True, text=True,
                          timeout=30, cwd=cwd, env=merged)


def assert_one_line_error(result, option):
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("smtprelay: config: %s: " % option), lines[0]
    assert "Traceback" not in result.stderr


def test_6_version():
    result = run_relay("-version")
    assert result.returncode == 0
    assert result.stdout.startswith("smtprelay/%s (commit " % __version__)


def test_6_check_shipped_ini():
    result = run_relay("-check", os.path.join(ROOT, "smtprelay.ini"))
    assert result.returncode == 0, result.stderr
    assert "listen = 127.0.0.1:2525" in result.stdout
    assert "remotes = file:%s" % os.path.join(ROOT, "outbox") in result.stdout


def test_6_check_masks_passwords(tmp_path):
    ini = tmp_path / "r.ini"
    write_ini(ini, {"remotes": "starttls://app%40x.com:Pa55w0rd@smtp.example.com", "webhook_secret": "Hm4cKey",
                    "webhook_url": "https://scan:Url5ecret@scanner.example/check"})
    result = run_relay("--check", "-config", str(ini))
    assert result.returncode == 0, result.stderr
    assert "starttls://app@x.com:***@smtp.example.com:587" in result.stdout
    for secret in ("Pa55w0rd", "Hm4cKey", "Url5ecret"):
        assert secret not in result.stdout + result.stderr


def test_2_1_flag_forms_override_env_and_file(tmp_path):
    ini = tmp_path / "r.ini"
    write_ini(ini, {"hostname": "file.example", "max_recipients": "3", "log_level": "warn", "read_timeout": "9s"})
    result = run_relay(str(ini), "-check", "-hostname", "flag.example", "--max_recipients=4",
                       "--log_level", "debug", env={"SMTPRELAY_READ_TIMEOUT": "8s", "SMTPRELAY_HOSTNAME": "env"})
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert "hostname = flag.example" in out
    assert "max_recipients = 4" in out
    assert "log_level = debug" in out
    assert "read_timeout = 8s" in out


@pytest.mark.parametrize("option,value", [
    ("allowed_nets", "10.0.0.1/8"),
    ("allowed_sender", "(["),
    ("read_timeout", "forever"),
    ("listen", "smtp://127.0.0.1:25"),
    ("remotes", "smtp://u:pw@host:bad"),
    ("local_cert", "/nonexistent/cert.pem"),
    ("tls_profile", "ultra"),
], ids=["bad-cidr", "bad-regex", "bad-duration", "bad-listen-scheme", "bad-remote", "unreadable-cert",
        "bad-profile"])
def test_2_3_config_error_is_one_line_exit_2(tmp_path, option, value):
    ini = tmp_path / "r.ini"
    options = {option: value}
    if option == "local_cert":
        options["local_key"] = "/nonexistent/cert.key"
    write_ini(ini, options)
    assert_one_line_error(run_relay(str(ini), "-check"), option)
    assert_one_line_error(run_relay(str(ini)), option)


def test_2_3_unknown_key_exit_2(tmp_path):
    ini = tmp_path / "r.ini"
    ini.write_text("hostname = a\nmax_recipents = 5\n")
    result = run_relay(str(ini))
    assert_one_line_error(result, "max_recipents")
    assert "line 2" in result.stderr


def test_2_3_allowed_users_with_plain_listener_exit_2(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("")
    ini = tmp_path / "r.ini"
    write_ini(ini, {"allowed_users": "users.txt", "listen": "127.0.0.1:2525"})
    assert_one_line_error(run_relay(str(ini)), "allowed_users")


def test_2_3_cert_without_key_exit_2(tmp_path, certs):
    ini = tmp_path / "r.ini"
    write_ini(ini, {"local_cert": certs.cert_path})
    assert_one_line_error(run_relay(str(ini)), "local_key")


def test_2_1_unknown_flag_exit_2():
    result = run_relay("-lissten", "127.0.0.1:25")
    assert result.returncode == 2 and "lissten" in result.stderr and "Traceback" not in result.stderr


def test_2_1_missing_config_file_exit_2(tmp_path):
    assert_one_line_error(run_relay(str(tmp_path / "absent.ini")), "config")


def test_6_hash_password_too_long_is_one_line():
    result = run_relay("-hash-password", stdin="x" * 73 + "\n")
    assert result.returncode == 1
    assert result.stderr.strip() == "smtprelay: password longer than 72 bytes, bcrypt's limit"


def test_6_hash_password_from_stdin():
    result = run_relay("-hash-password", stdin="s3cret pass\n")
    assert result.returncode == 0, result.stderr
    hashed = result.stdout.strip()
    assert hashed.startswith("$2b$")
    assert bcrypt.checkpw(b"s3cret pass", hashed.encode())
    assert "s3cret" not in result.stdout + result.stderr


def test_6_bind_failure_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        ini = tmp_path / "r.ini"
        write_ini(ini, {"listen": "127.0.0.1:%d" % taken.getsockname()[1], "remotes": "file:outbox"})
        result = run_relay(str(ini))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "listen" in result.stderr.strip().splitlines()[-1]


def test_10_test_remotes_process_prints_a_line_per_remote_and_exits_1_on_a_failure(tmp_path):
    ini = tmp_path / "probe.ini"
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = bound.getsockname()[1]
        write_ini(ini, {"remotes": "file:outbox smtp://u:pw-x@127.0.0.1:%d" % port})
        result = run_relay("-test-remotes", str(ini))
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        "ok   file:%s: writable folder" % (tmp_path / "outbox"),
        "FAIL smtp://u:***@127.0.0.1:%d: connect: Connection refused" % port]
    assert "pw-x" not in result.stdout + result.stderr
    write_ini(ini, {"remotes": "file:outbox"})
    assert run_relay("-test-remotes", str(ini)).returncode == 0
    write_ini(ini, {"remotes": "starttls://a%40b.test:pw-x@mail.test?auth=xoauth2"})
    result = run_relay("-test-remotes", str(ini))
    assert_one_line_error(result, "remotes")
    assert "pw-x" not in result.stderr
