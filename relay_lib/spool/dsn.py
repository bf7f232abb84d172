"""Delivery status notifications [R3464]: the bounce of a queued message.

Owns the shape of a bounce: a multipart/report with a human-readable part,
the message/delivery-status part and the original headers. Must not send or
store anything: it turns an envelope and the failed recipients into bytes.
"""

import email.policy
from datetime import datetime, timezone
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, make_msgid
from typing import List, Tuple

from relay_lib.replies import is_enhanced_code

UNKNOWN_PERMANENT = "5.0.0"  # [R3463 3.1] when a reply carries no enhanced code


def status_of(reply: str) -> str:
    """The enhanced status code of a reply line such as `550 5.1.1 host: unknown user`."""
    words = reply.split()
    if len(words) > 1 and is_enhanced_code(words[1]):
        return words[1]
    return UNKNOWN_PERMANENT


def build(hostname: str, sender: str, message_id: str, arrived: datetime,
          failures: List[Tuple[str, str]], original: bytes) -> bytes:
    """A bounce to `sender` for `failures` [(recipient, last reply)] of message `message_id`.

    `original` is the queued message; only its header section is included.
    """
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = "MAILER-DAEMON@%s" % hostname
    report["To"] = sender
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = format_datetime(datetime.now(timezone.utc))
    report["Message-ID"] = make_msgid(domain=hostname)
    report["Auto-Submitted"] = "auto-replied"  # [R3834 5]: no auto-reply to this
    lines = ["This is the mail system at %s." % hostname, "",
             "Your message %s could not be delivered to these recipients:" % message_id, ""]
    lines += ["<%s>: %s" % (rcpt, reply) for rcpt, reply in failures]
    report.attach(_text("\n".join(lines) + "\n", "plain"))

    per_message = Message()
    per_message["Reporting-MTA"] = "dns; %s" % hostname
    per_message["X-Smtprelay-Queue-ID"] = message_id
    per_message["Arrival-Date"] = format_datetime(arrived)
    blocks = [per_message]
    for rcpt, reply in failures:
        block = Message()
        block["Final-Recipient"] = "rfc822; %s" % rcpt
        block["Action"] = "failed"
        block["Status"] = status_of(reply)
        block["Diagnostic-Code"] = "smtp; %s" % reply
        blocks.append(block)
    status = MIMEBase("message", "delivery-status")
    status.set_payload(blocks)  # type: ignore[arg-type]  # a list of header blocks, as RFC 3464 wants
    report.attach(status)

    headers = original.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace") + "\r\n"
    report.attach(_text(headers, "rfc822-headers"))
    # An internationalized address, or a remote's reply in UTF-8, can only
    # be written as UTF-8 header text [R6532 3.2, R6533 3].
    plain = all(text.isascii() for text in [hostname, sender] + [t for f in failures for t in f])
    return report.as_bytes(policy=email.policy.SMTP if plain else email.policy.SMTPUTF8)


def _text(text: str, subtype: str) -> MIMEText:
    """A text part, readable as it is unless it needs UTF-8."""
    return MIMEText(text, subtype, "us-ascii" if text.isascii() else "utf-8")
