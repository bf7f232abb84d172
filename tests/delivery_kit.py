"""Helpers for the delivery, remotes and webhook tests (this module has no tests):
Settings from ini options, envelopes, one-shot delivery.
The downstream servers and `relay_log` live in conftest.py.
"""

import socket

from conftest import write_ini
from relay_lib.config import settings as config
from relay_lib.delivery.steps import Delivery
from relay_lib.envelope import Envelope, new_message_id

BODY = (b"From: app@example.com\r\nTo: b@example.org\r\nSubject: test\r\n\r\n"
        b"Hello.\r\n.leading dot line\r\n8-bit: \xc3\xa9t\xc3\xa9\r\n")


def ipv6_loopback_works():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def settings_for(tmp_path, **options):
    """Settings loaded through the real config parser from ini options."""
    merged = {"hostname": "relay.test", "remote_timeout": "3s", "data_timeout": "5s"}
    merged.update({k: str(v) for k, v in options.items()})
    ini = tmp_path / ("delivery-%s.ini" % new_message_id())
    write_ini(ini, merged)
    return config.from_file(str(ini))


def envelope(mail_from="app@example.com", rcpts=("b@example.org",), **kw):
    values = dict(id=new_message_id(), peer="127.0.0.1", helo="printer.lan", user=None, tls=None,
                  esmtp=True, mail_from=mail_from, rcpts=list(rcpts))
    values.update(kw)
    return Envelope(**values)


def deliver_once(tmp_path, body=BODY, env=None, **options):
    """Deliver one message with a fresh Delivery; returns (reply, envelope)."""
    delivery = Delivery(settings_for(tmp_path, **options))
    env = env or envelope()
    try:
        return delivery.deliver(env, body), env
    finally:
        delivery.close()


def reply_line(reply):
    return str(reply)
