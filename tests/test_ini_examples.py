"""SPEC 2: every example in the shipped smtprelay.ini works when uncommented.

Each commented `;option = value` line (and each `; Example:` or indented
`;   option = value` line) is uncommented on its own, replacing the active
line of that option, and the result must pass `-check`. Options that only
make sense with others (AUTH needs a TLS listener) get those companions.
"""

import os
import re
import shlex
import shutil
import ssl
import subprocess

import pytest

from conftest import ROOT
from relay_lib import cli
from smtp_talk import Talk, write_users

INI = os.path.join(ROOT, "smtprelay.ini")
EXAMPLE = re.compile(r"^;(?: Example:)? *([a-z_]+) =(?: (.*))?$")


def examples():
    with open(INI, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return [(number, m.group(1), m.group(2) or "") for number, line in enumerate(lines)
            for m in [EXAMPLE.match(line)] if m]


def test_2_ini_has_examples_for_every_option():
    from relay_lib.config.settings import OPTIONS

    assert {name for _, name, _ in examples()} >= {o.name for o in OPTIONS} - {"remotes"}


# AUTH is offered only under TLS: the users file needs a TLS listener; a
# certificate needs its key; an xoauth2 remote needs a token endpoint.
COMPANIONS = {"allowed_users": {"listen": "starttls://127.0.0.1:2525"},
              "local_cert": {"local_key": "smtpd.key"}, "local_key": {"local_cert": "smtpd.pem"}}
OAUTH = {"oauth_token_url": "https://login.microsoftonline.com/tenant/oauth2/v2.0/token",
         "oauth_client_id": "app-id", "oauth_client_secret": "secret-value"}


@pytest.mark.parametrize("number,name,value", examples(), ids=lambda v: str(v))
def test_2_ini_example_line_passes_check(tmp_path, certs, capsys, number, name, value):
    with open(INI, encoding="utf-8") as f:
        lines = f.read().splitlines()
    extra = dict(COMPANIONS.get(name, {}), **{name: value})
    if "auth=xoauth2" in value:
        extra.update(OAUTH)
    if "tls://" in extra.get("listen", "") or "starttls://" in extra.get("listen", ""):
        extra.update(local_cert="smtpd.pem", local_key="smtpd.key")
    kept = [line for i, line in enumerate(lines)
            if i != number and not re.match(r"(%s) *=" % "|".join(extra), line)]
    (tmp_path / "smtprelay.ini").write_text(
        "\n".join(kept + ["%s = %s" % item for item in extra.items()]) + "\n", encoding="utf-8")
    shutil.copy(certs.cert_path, str(tmp_path / "smtpd.pem"))
    shutil.copy(certs.key_path, str(tmp_path / "smtpd.key"))
    write_users(tmp_path / "users.txt", {"app1": ("pw", None)})
    (tmp_path / "aliases.txt").write_text("postmaster@example.com admin@example.com\n", encoding="utf-8")
    status = cli.main(["-check", str(tmp_path / "smtprelay.ini")])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "%s = " % name in out


def test_3_1_ini_welcome_msg_example_is_the_greeting(relay_factory):
    (value,) = [value for _, name, value in examples() if name == "welcome_msg"]
    relay = relay_factory(welcome_msg=value)
    with Talk(relay.port) as t:
        assert t.reply() == "220 " + value
    assert "<" not in value  # a real value, not a placeholder


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl program")
def test_3_1_readme_openssl_certificate_serves_tls(relay_factory, tmp_path):
    """The README's one-line certificate works for a tls:// listener and a
    client that checks the name against it."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        (line,) = re.findall(r"^openssl req .*$", f.read(), re.M)
    subprocess.run(shlex.split(line), cwd=str(tmp_path), check=True, capture_output=True, timeout=60)
    relay = relay_factory(listen="tls://127.0.0.1:0", local_cert="smtpd.pem", local_key="smtpd.key")
    context = ssl.create_default_context(cafile=str(tmp_path / "smtpd.pem"))
    with Talk(relay.port, tls=context) as t:
        assert t.reply() == "220 relay.test ESMTP ready."
