"""SPEC 2: the file format, the option table, layering and config errors."""

import ipaddress
import os
import subprocess

import pytest
from hypothesis import given, strategies as st

from relay_lib.config import command_line
from relay_lib.config import settings as config
from relay_lib.config.settings import ConfigError, Listener


def load_text(tmp_path, text, flags=None, environ=None, name="smtprelay.ini", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return config.load(str(path), flags, environ=environ or {})


def error_of(tmp_path, text="", **flags):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, flags=flags)
    return info.value


# -- 2.2 file format ------------------------------------------------------

def test_2_2_comments_blank_lines_and_sections(tmp_path):
    s = load_text(tmp_path, "; comment\n# another\n\n[smtprelay]\nhostname = mx.example.com\n")
    assert s.hostname == "mx.example.com"


def test_2_2_inline_comments_are_cut(tmp_path):
    s = load_text(tmp_path, "hostname = a.example # the name\nwelcome_msg = hi there # greeting\n")
    assert s.hostname == "a.example"
    assert s.welcome_msg == "hi there"


def test_2_2_semicolon_inside_a_value_is_kept(tmp_path):
    # The Go program cuts a value only at " #"; " ;" is text (SPEC 2.2).
    s = load_text(tmp_path, "welcome_msg = ready ; say hi\ncommand = /bin/true ;x\n")
    assert s.welcome_msg == "ready ; say hi"
    assert s.command == ("/bin/true", ";x")


def test_2_2_hash_without_space_is_part_of_value(tmp_path):
    s = load_text(tmp_path, "allowed_sender = ^a#b@x$\n")
    assert s.allowed_sender.search("a#b@x") and not s.allowed_sender.search("a")


def test_2_2_one_pair_of_quotes_removed(tmp_path):
    s = load_text(tmp_path, 'welcome_msg = "Hello ; world"\nhostname = ""x""\n')
    assert s.welcome_msg == "Hello ; world"
    assert s.hostname == '"x"'


def test_2_2_quoted_value_followed_by_comment(tmp_path):
    s = load_text(tmp_path, 'welcome_msg = "Hi # there" # comment\n')
    assert s.welcome_msg == "Hi # there"


def test_2_2_key_without_value_is_true(tmp_path):
    s = load_text(tmp_path, "local_forcetls\nstrict_sender\nremotes = smtp://h/a@b\n")
    assert s.local_forcetls is True and s.strict_sender is True


def test_2_2_crlf_and_bom_load(tmp_path):
    s = load_text(tmp_path, "\ufeffhostname = notepad.example\r\nmax_recipients = 7\r\n")
    assert s.hostname == "notepad.example"
    assert s.max_recipients == 7


def test_2_2_unknown_key_names_the_line(tmp_path):
    err = error_of(tmp_path, "hostname = a\n\nlsiten = 127.0.0.1:25\n")
    assert err.option == "lsiten"
    assert "line 3" in str(err)


def test_2_2_relative_paths_resolve_against_config_folder(tmp_path, monkeypatch):
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "aliases.txt").write_text("a b\n")
    (conf / "logs").mkdir()
    monkeypatch.chdir(tmp_path)
    s = load_text(conf, "logfile = logs/relay.log\naliases_file = aliases.txt\nremotes = file:outbox\n")
    assert s.logfile == os.path.join(str(conf), "logs", "relay.log")
    assert s.aliases_file == os.path.join(str(conf), "aliases.txt")
    assert s.remotes[0].path == os.path.join(str(conf), "outbox")


def test_2_3_logfile_folder_must_exist(tmp_path):
    err = error_of(tmp_path, logfile="missing/relay.log")
    assert err.option == "logfile" and "missing" in err.reason


def test_2_2_absolute_paths_stay(tmp_path):
    target = tmp_path / "elsewhere"
    s = load_text(tmp_path, "remotes = file:%s\n" % target)
    assert s.remotes[0].path == str(target)


# -- 2.1 precedence -------------------------------------------------------

def test_2_1_defaults_without_file():
    s = config.load(None, environ={})
    assert s.listen == (Listener("plain", "127.0.0.1", 25), Listener("plain", "::1", 25))
    assert s.hostname == "localhost.localdomain"
    assert s.welcome_msg == "localhost.localdomain ESMTP ready."
    assert (s.read_timeout, s.write_timeout, s.data_timeout) == (60, 60, 300)
    assert (s.max_connections, s.max_message_size, s.max_recipients) == (100, 10240000, 100)
    assert s.allowed_nets == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert s.remotes == () and s.command == ()
    assert (s.webhook_timeout, s.remote_timeout) == (30, 60)


def test_2_1_file_then_env_then_flags(tmp_path):
    text = "hostname = from-file\nmax_recipients = 5\nlog_level = debug\n"
    env = {"SMTPRELAY_HOSTNAME": "from-env", "SMTPRELAY_MAX_RECIPIENTS": "6"}
    s = load_text(tmp_path, text, flags={"hostname": "from-flag"}, environ=env)
    assert s.hostname == "from-flag"
    assert s.max_recipients == 6
    assert s.log_level == "debug"


def test_2_1_env_error_names_option(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "", environ={"SMTPRELAY_READ_TIMEOUT": "soon"})
    assert info.value.option == "read_timeout"


# -- 2.3 option values ------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [("500ms", 0.5), ("60s", 60), ("5m", 300), ("1h30m", 5400),
                                          ("1.5s", 1.5), ("2m30s", 150)])
def test_2_3_go_durations(text, seconds):
    assert config.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["60", "5x", "m5", "1h 30m", "-5s", ""])
def test_2_3_bad_durations(text):
    with pytest.raises(ValueError):
        config.parse_duration(text)


def test_2_3_read_timeout_at_least_one_second(tmp_path):
    err = error_of(tmp_path, read_timeout="500ms")
    assert err.option == "read_timeout" and "at least 1s" in err.reason


@pytest.mark.parametrize("text,value", [("true", True), ("1", True), ("TRUE", True), ("false", False),
                                        ("0", False), ("no", False)])
def test_2_3_booleans(tmp_path, text, value):
    assert load_text(tmp_path, "local_forcetls = %s\n" % text).local_forcetls is value


def test_2_3_bad_boolean(tmp_path):
    assert error_of(tmp_path, local_forcetls="maybe").option == "local_forcetls"


def test_2_3_cidr_lists(tmp_path):
    s = load_text(tmp_path, "allowed_nets = 10.0.0.0/8 192.168.1.0/24 2001:db8::/32 ::ffff:172.16.0.0/108\n")
    assert s.allowed_nets == tuple(ipaddress.ip_network(n) for n in
                                   ("10.0.0.0/8", "192.168.1.0/24", "2001:db8::/32", "172.16.0.0/12"))


def test_2_3_empty_allowed_nets_allows_any(tmp_path):
    assert load_text(tmp_path, 'allowed_nets = ""\n').allowed_nets == ()


def test_2_3_cidr_host_bits_are_an_error(tmp_path):
    err = error_of(tmp_path, allowed_nets="10.0.0.1/8")
    assert str(err) == "config: allowed_nets: 10.0.0.1/8 has host bits set (did you mean 10.0.0.0/8?)"


def test_2_3_cidr_garbage_is_an_error(tmp_path):
    err = error_of(tmp_path, allowed_nets="10.0.0.0/33")
    assert err.option == "allowed_nets" and "10.0.0.0/33" in err.reason


def test_2_3_listen_addresses():
    assert config.parse_listen("127.0.0.1:2525 starttls://[::1]:587 TLS://0.0.0.0:465 :26") == (
        Listener("plain", "127.0.0.1", 2525), Listener("starttls", "::1", 587),
        Listener("tls", "0.0.0.0", 465), Listener("plain", "", 26))


@pytest.mark.parametrize("value", ["smtp://127.0.0.1:25", "127.0.0.1", "[::1]", "1.2.3.4:70000"])
def test_2_3_bad_listen(tmp_path, value):
    assert error_of(tmp_path, listen=value).option == "listen"


def test_2_3_regex_options(tmp_path):
    s = load_text(tmp_path, r"allowed_sender = @example\.com$" + "\n")
    assert s.allowed_sender.search("a@example.com")
    err = error_of(tmp_path, allowed_recipients="(unclosed")
    assert err.option == "allowed_recipients" and "regex" in err.reason


@pytest.mark.parametrize("option,value", [("max_connections", "-2"), ("max_connections", "x"),
                                          ("max_message_size", "-5"), ("max_recipients", "-1")])
def test_2_3_bad_numbers(tmp_path, option, value):
    assert error_of(tmp_path, **{option: value}).option == option


def test_2_3_zero_limits_mean_the_default(tmp_path):
    # The Go program's server library reads 0 as its default for these three.
    s = load_text(tmp_path, "max_connections = 0\nmax_message_size = 0\nmax_recipients = 0\n")
    assert (s.max_connections, s.max_message_size, s.max_recipients) == (100, 10240000, 100)


def test_2_3_max_connections_unlimited(tmp_path):
    assert load_text(tmp_path, "max_connections = -1\n").max_connections == -1


@pytest.mark.parametrize("option,value", [("log_level", "verbose"), ("log_format", "xml"),
                                          ("tls_profile", "paranoid")])
def test_2_3_bad_choices(tmp_path, option, value):
    err = error_of(tmp_path, **{option: value})
    assert err.option == option and value in err.reason


def test_2_3_tls_listener_needs_cert(tmp_path):
    err = error_of(tmp_path, listen="tls://127.0.0.1:465")
    assert err.option == "listen" and "local_cert" in err.reason


def test_2_3_cert_without_key(tmp_path, certs):
    err = error_of(tmp_path, local_cert=certs.cert_path)
    assert err.option == "local_key"


def test_2_3_unreadable_cert(tmp_path, certs):
    err = error_of(tmp_path, listen="starttls://127.0.0.1:587", local_cert=str(tmp_path / "missing.pem"),
                   local_key=certs.key_path)
    assert err.option == "local_cert" and "missing.pem" in err.reason


def test_2_3_cert_that_is_not_a_cert(tmp_path, certs):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    err = error_of(tmp_path, listen="starttls://127.0.0.1:587", local_cert=str(bad), local_key=certs.key_path)
    assert err.option == "local_cert"


def test_2_3_remote_cert_needs_key(tmp_path, certs):
    assert error_of(tmp_path, remote_certificate=certs.client_cert_path).option == "remote_key"


def test_2_3_allowed_users_with_plain_listener(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("")
    err = error_of(tmp_path, allowed_users=str(users), listen="127.0.0.1:2525")
    assert err.option == "allowed_users" and "127.0.0.1:2525" in err.reason


def test_2_3_allowed_users_with_tls_listener(tmp_path, certs):
    users = tmp_path / "users.txt"
    users.write_text("")
    s = load_text(tmp_path, "", flags=dict(allowed_users=str(users), listen="starttls://127.0.0.1:0",
                                           local_cert=certs.cert_path, local_key=certs.key_path))
    assert s.allowed_users == str(users)


def test_2_3_missing_users_file(tmp_path, certs):
    err = error_of(tmp_path, allowed_users="nope.txt", listen="tls://127.0.0.1:0",
                   local_cert=certs.cert_path, local_key=certs.key_path)
    assert err.option == "allowed_users" and "nope.txt" in err.reason


def test_2_3_command_is_split_without_shell(tmp_path, monkeypatch):
    monkeypatch.setattr(command_line.os, "name", "posix")
    s = load_text(tmp_path, "command = /usr/bin/archiver --to 'a b'\n")
    assert s.command == ("/usr/bin/archiver", "--to", "a b")


@pytest.mark.parametrize("text,words", [
    (r'"C:\Program Files\Scan\scan.exe" --x', [r"C:\Program Files\Scan\scan.exe", "--x"]),
    ("C:\\Scan\\scan.exe --dir C:\\Mail\\", ["C:\\Scan\\scan.exe", "--dir", "C:\\Mail\\"]),
    (r'scan.exe "a b" c\"d', ["scan.exe", "a b", 'c"d']),
    (r'scan.exe "C:\Dir With Space\\" x', ["scan.exe", "C:\\Dir With Space\\", "x"]),
    ('scan.exe ""  \t last', ["scan.exe", "", "last"]),
])
def test_2_3_command_windows_rules(text, words):
    assert command_line.split_windows(text) == words


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=12), min_size=1, max_size=5))
def test_2_3_command_windows_rules_undo_subprocess_quoting(words):
    # subprocess.list2cmdline is how Popen joins a list on Windows: a round trip must hold.
    assert command_line.split_windows(subprocess.list2cmdline(words)) == words


def test_2_3_command_uses_windows_rules_on_windows(tmp_path, monkeypatch):
    program = tmp_path / "Program Files" / "Scan" / "scan.exe"
    program.parent.mkdir(parents=True)
    program.write_text("")
    monkeypatch.setattr(command_line.os, "name", "nt")
    # Quoted, as the README says; backslashes stay (on Windows they are the separator).
    s = load_text(tmp_path, 'command = "C:\\Program Files\\Scan\\scan.exe" --x C:\\out\n')
    assert s.command == ("C:\\Program Files\\Scan\\scan.exe", "--x", "C:\\out")
    # Unquoted with spaces: the longest leading words that name a file are the program.
    s = load_text(tmp_path, "command = %s --x\n" % program)
    assert s.command == (str(program), "--x")


def test_2_3_webhook_url_must_be_http(tmp_path):
    err = error_of(tmp_path, webhook_url="ftp://user:hunter2@scanner")
    assert err.option == "webhook_url" and "hunter2" not in str(err)


def test_2_3_settings_are_immutable(tmp_path):
    s = load_text(tmp_path, "")
    with pytest.raises(Exception):
        s.hostname = "other"


# -- 5.1 remote URLs, as config values --------------------------------------

def test_5_1_remote_urls_parsed(tmp_path):
    s = load_text(tmp_path, "remotes = smtp://mx.example.com starttls://u:p%40ss@mail.example.com"
                            " tls://[2001:db8::1]/bounce@example.com?skipVerify&auth=login"
                            " smtps://h:2465?recipient=.*%40example%5C.org&skipVerify=false\n")
    smtp, starttls, tls, smtps = s.remotes
    assert (smtp.scheme, smtp.host, smtp.port, smtp.username) == ("smtp", "mx.example.com", 25, None)
    assert (starttls.port, starttls.username, starttls.password) == (587, "u", "p@ss")
    assert (tls.host, tls.port, tls.sender, tls.auth, tls.skip_verify) == ("2001:db8::1", 465, "bounce@example.com",
                                                                          "login", True)
    assert smtps.port == 2465 and smtps.skip_verify is False
    assert smtps.admits("Bob@Example.ORG") and not smtps.admits("bob@example.org.evil")


@pytest.mark.parametrize("url,reason", [
    ("pop3://h", "unknown scheme"),
    ("smtp://u:pw@h?auth=cram-md5", "unknown auth"),
    ("smtp://h?recipient=(", "regex"),
    ("smtp://h?frobnicate=1", "unknown parameter"),
    ("smtp://h:99999", "invalid host or port"),
    ("smtp://", "missing host"),
    ("mx.example.com:25", "not a URL"),
])
def test_5_1_bad_remote_urls(tmp_path, url, reason):
    err = error_of(tmp_path, remotes=url)
    assert err.option == "remotes" and reason in err.reason


def test_5_1_password_never_in_error(tmp_path):
    for url in ("smtp://user:Secr3tPw@h:99999", "smtp://user:Secr3tPw@h?auth=x", "bogus://user:Secr3tPw@h",
                "smtp://user:Secr3tPw/x@h:25", "smtp://user:Secr3tPw#x@h", "smtp://user:Secr3tPw?x@h:25",
                "smtp://user:Secr3tPw://x@h:bad", "user:Secr3tPw@h:25"):
        assert "Secr3tPw" not in str(error_of(tmp_path, remotes=url))


def test_5_1_masked_url(tmp_path):
    s = load_text(tmp_path, "remotes = smtp://user:Secr3tPw@mail.example.com:2525/a@b.c\n")
    assert s.remotes[0].masked() == "smtp://user:***@mail.example.com:2525/a@b.c"
    assert "Secr3tPw" not in repr(s)


def test_6_describe_masks_secrets(tmp_path):
    s = load_text(tmp_path, "remotes = smtp://user:Secr3tPw@h\nwebhook_url = https://k:Hid3@scan.example/x\n"
                            "webhook_secret = Sh4red\n")
    text = "\n".join(config.describe(s))
    for secret in ("Secr3tPw", "Hid3", "Sh4red"):
        assert secret not in text
    assert "remotes = smtp://user:***@h:25" in text
    assert "webhook_secret = ***" in text
