"""SPEC 13 configuration: the limit parameters and options, their
precedence, accounts, the known provider rule, -check, and bad input."""

import subprocess

import pytest

from conftest import relay_command, write_ini
from relay_lib.config import settings as config

SECRET = "Pa55word"


def load(tmp_path, **options):
    merged = {"listen": "127.0.0.1:0"}
    merged.update(options)
    ini = tmp_path / "relay.ini"
    write_ini(ini, merged)
    return config.from_file(str(ini)), ini


def limits(settings, number=0):
    found = settings.remote_limits(settings.remotes[number])
    return found.connections, str(found.rate) if found.rate else None, \
        str(found.recipients) if found.recipients else None, dict(found.sources)


def test_13_defaults_are_20_connections_and_no_rates(tmp_path):
    settings, _ = load(tmp_path, remotes="smtp://mx.example.com")
    assert limits(settings) == (20, None, None, {"connections": "default", "rate": "default",
                                                 "recipients": "default"})
    assert settings.remote_wait == 30 and settings.remote_quota_pause == 3600


def test_13_url_parameters_set_the_limits(tmp_path):
    settings, _ = load(tmp_path, remotes="smtp://mx.example.com?connections=3&rate=30/m&recipients=10000/d")
    assert limits(settings)[:3] == (3, "30/m", "10000/d")


def test_13_known_provider_office365_gets_its_limits(tmp_path):
    settings, _ = load(tmp_path, remotes="starttls://u%40contoso.com:" + SECRET + "@smtp.office365.com:587 "
                                         "starttls://v%40contoso.com:" + SECRET + "@SMTP-MAIL.outlook.com:587")
    for number in (0, 1):
        assert limits(settings, number) == (3, "30/m", "10000/d", {
            "connections": "known provider", "rate": "known provider", "recipients": "known provider"})


def test_13_ini_overrides_provider_and_url_overrides_ini(tmp_path):
    settings, _ = load(tmp_path, remote_connections="2", remote_rate="10/m",
                       remotes="starttls://u%40contoso.com:x@smtp.office365.com:587?rate=5/m")
    assert limits(settings) == (2, "5/m", "10000/d", {"connections": "ini", "rate": "url",
                                                      "recipients": "known provider"})


def test_13_an_account_shares_the_lowest_of_each_limit(tmp_path):
    settings, _ = load(tmp_path, remotes="smtp://u@mx.example.com?connections=5&rate=60/h "
                                         "smtp://u@MX.example.com?connections=2&rate=2/m&recipient=.*@a\\.test "
                                         "smtp://other@mx.example.com?connections=7")
    first, second, other = (settings.remote_limits(r) for r in settings.remotes)
    assert first == second and first.connections == 2 and str(first.rate) == "60/h"  # 1/min beats 2/min
    assert other.connections == 7 and other.account != first.account


def test_13_check_prints_every_remote_with_its_limits_and_sources(tmp_path):
    _, ini = load(tmp_path, remotes="starttls://u%40contoso.com:" + SECRET + "@smtp.office365.com:587?connections=1")
    out = subprocess.run(relay_command() + ["-check", str(ini)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    [line] = [ln for ln in out.stdout.splitlines() if ln.startswith("  remote 1:")]
    assert line.endswith("limits: connections=1 (url) rate=30/m (known provider) recipients=10000/d (known provider)")
    assert "remote_wait = 30s" in out.stdout and "remote_quota_pause = 1h" in out.stdout
    assert SECRET not in out.stdout + out.stderr


@pytest.mark.parametrize("query, parameter", [
    ("connections=0", "connections=0"), ("connections=-1", "connections=-1"), ("connections=x", "connections=x"),
    ("rate=30", "rate=30"), ("rate=30/w", "rate=30/w"), ("rate=30/min", "rate=30/min"), ("rate=0/m", "rate=0/m"),
    ("recipients=ten/d", "recipients=ten/d"), ("connections=3&connections=4", "connections"),
], ids=["zero", "negative", "text", "no-unit", "other-unit", "long-unit", "zero-rate", "text-rate", "twice"])
def test_13_bad_parameter_is_one_line_naming_remote_and_parameter_with_password_masked(tmp_path, query, parameter):
    with pytest.raises(config.ConfigError) as err:
        load(tmp_path, remotes="smtp://user:%s@mx.example.com:25?%s" % (SECRET, query))
    line = str(err.value)
    assert "\n" not in line and SECRET not in line
    assert "remotes" in line and "mx.example.com" in line and parameter in line


@pytest.mark.parametrize("option, value", [
    ("remote_connections", "0"), ("remote_connections", "many"), ("remote_rate", "30"),
    ("remote_recipients", "5/week"), ("remote_wait", "soon"), ("remote_quota_pause", "0s"),
])
def test_13_bad_option_is_a_config_error_naming_it(tmp_path, option, value):
    with pytest.raises(config.ConfigError) as err:
        load(tmp_path, remotes="smtp://mx.example.com", **{option: value})
    assert option in str(err.value)
