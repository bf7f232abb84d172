"""SPEC 3.2: every row of the command table, over real sockets on loopback.

TLS and AUTH rows live in test_smtp_tls_auth.py; hostile-client limits and
DATA framing in test_smtp_limits.py.
"""

import smtplib

import pytest

from conftest import outbox_messages
from smtp_talk import Talk


# -- 3.1 greeting ---------------------------------------------------------

def test_3_1_greeting_uses_welcome_msg(relay_factory):
    relay = relay_factory(welcome_msg="Hello printers")
    with Talk(relay.port) as t:
        assert t.reply() == "220 Hello printers"


def test_3_1_default_greeting_names_hostname(relay):
    with Talk(relay.port) as t:
        assert t.reply() == "220 relay.test ESMTP ready."


# -- EHLO / HELO ------------------------------------------------------------

def test_3_2_ehlo_lists_extensions(talk):
    lines = talk.cmd("EHLO client.test").split("\n")
    assert lines[0] == "250-relay.test"
    assert [l[4:] for l in lines[1:]] == ["PIPELINING", "SIZE 10240000", "8BITMIME",
                                         "ENHANCEDSTATUSCODES", "SMTPUTF8"]
    assert lines[-1].startswith("250 ")


def test_3_2_ehlo_size_follows_max_message_size(relay_factory):
    relay = relay_factory(max_message_size="5000")
    with Talk(relay.port) as t:
        t.reply()
        assert "250-SIZE 5000" in t.cmd("EHLO x").split("\n")


def test_3_2_ehlo_without_name_is_501(talk):
    assert talk.cmd("EHLO").startswith("501 5.5.4 ")


def test_3_2_helo(talk):
    assert talk.cmd("HELO client.test") == "250 relay.test"


def test_3_2_helo_without_name_is_501(talk):
    assert talk.cmd("HELO").startswith("501 5.5.4 ")


def test_3_2_ehlo_again_resets_the_envelope(ready):
    assert ready.cmd("MAIL FROM:<a@example.com>").startswith("250 2.1.0")
    assert ready.cmd("EHLO again").startswith("250-")
    assert ready.cmd("RCPT TO:<b@example.com>").startswith("503 5.5.1 ")
    assert ready.cmd("MAIL FROM:<a@example.com>").startswith("250 2.1.0")


def test_3_2_verbs_are_case_insensitive(talk):
    assert talk.cmd("ehlo x").startswith("250-relay.test")
    assert talk.cmd("mAiL fRoM:<a@example.com>") == "250 2.1.0 OK"
    assert talk.cmd("rcpt to:<b@example.com>") == "250 2.1.5 OK"
    assert talk.cmd("noop") == "250 2.0.0 OK"


def test_3_2_verbs_fold_ascii_only(ready):
    """'ſ'.upper() is 'S' in Python; an SMTP verb must not fold that way."""
    assert ready.cmd("RSET".replace("S", "\u017f")).startswith("500 5.5.2 ")
    assert ready.cmd("\u0131nfo").startswith("500 5.5.2 ")


# -- STARTTLS on a plain listener -------------------------------------------

def test_3_2_starttls_not_offered_is_502(ready):
    assert ready.cmd("STARTTLS").startswith("502 5.5.1 ")


# -- AUTH without allowed_users -----------------------------------------------

def test_3_2_auth_not_offered_is_502(ready):
    assert ready.cmd("AUTH PLAIN AGFAYg==") == "502 5.5.1 Command not implemented"


# -- MAIL -----------------------------------------------------------------------

def test_3_2_mail_ok(ready):
    assert ready.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 OK"


def test_3_2_mail_null_sender(ready):
    assert ready.cmd("MAIL FROM:<>") == "250 2.1.0 OK"


def test_3_2_mail_space_after_colon(ready):
    assert ready.cmd("MAIL FROM: <a@example.com>") == "250 2.1.0 OK"


def test_3_2_mail_before_ehlo_is_503(talk):
    assert talk.cmd("MAIL FROM:<a@example.com>").startswith("503 5.5.1 ")


def test_3_2_nested_mail_is_503(ready):
    assert ready.cmd("MAIL FROM:<a@example.com>").startswith("250 ")
    assert ready.cmd("MAIL FROM:<a@example.com>").startswith("503 5.5.1 ")


@pytest.mark.parametrize("arg", ["FROM:", "FROM:<a@example.com", "TO:<a@example.com>",
                                 "FROM", "", "FROM:<a b@example.com>", "FROM:<a@example.com>x",
                                 "FROM:<@route:a@example.com", "FROM:<a@>", "FROM:<@x>",
                                 "FROM:a@example.com>", "FROM:a@"],
                         ids=["no-address", "unclosed", "wrong-keyword", "no-colon", "empty",
                              "space", "junk-after", "route-unclosed", "no-domain", "no-local",
                              "bare-unopened", "bare-no-domain"])
def test_3_2_mail_syntax_is_501(ready, arg):
    assert ready.cmd("MAIL " + arg).startswith("501 5.5.4 ")


def test_3_2_mail_unknown_parameter_is_555(ready):
    """[R5321 4.1.1.11]: a parameter not recognised is 555, not a syntax error."""
    assert ready.cmd("MAIL FROM:<a@example.com> RET=FULL") == "555 5.5.4 Unrecognized parameter"
    assert ready.cmd("MAIL FROM:a@example.com ENVID=x") == "555 5.5.4 Unrecognized parameter"


@pytest.mark.parametrize("arg, params", [("FROM:a@example.com", ""), ("FROM: a@example.com", ""),
                                         ("from:a@example.com", " SIZE=10 BODY=8BITMIME"),
                                         ("FROM:scanner", "")])
def test_3_2_mail_without_angle_brackets(relay, arg, params):
    """Postfix and the Go program take the first word after the colon as the address."""
    with Talk(relay.port, ehlo="printer.lan") as t:
        assert t.cmd("MAIL " + arg + params) == "250 2.1.0 OK"
        assert t.cmd("RCPT TO:b@example.com") == "250 2.1.5 OK"
        assert t.cmd("DATA").startswith("354 ")
        assert t.cmd("Subject: x\r\n\r\nbody\r\n.").startswith("250 2.0.0 OK ")
    (meta, _), = outbox_messages(relay.outbox)
    assert (meta["from"], meta["to"]) == (arg.split(":")[1].strip(), ["b@example.com"])


@pytest.mark.parametrize("params", ["SIZE=1000", "BODY=8BITMIME", "BODY=7bit", "SMTPUTF8",
                                    "AUTH=<>", "AUTH=user@example.com",
                                    "SIZE=10 BODY=8BITMIME SMTPUTF8"])
def test_3_2_mail_parameters_accepted(ready, params):
    assert ready.cmd("MAIL FROM:<a@example.com> " + params) == "250 2.1.0 OK"


@pytest.mark.parametrize("params", ["SIZE=abc", "SIZE=", "BODY=BINARYMIME", "SMTPUTF8=yes"])
def test_3_2_mail_bad_parameter_value_is_501(ready, params):
    assert ready.cmd("MAIL FROM:<a@example.com> " + params).startswith("501 5.5.4 ")


def test_3_2_mail_size_too_big_is_552(relay_factory):
    relay = relay_factory(max_message_size="1000")
    with Talk(relay.port, ehlo="x") as t:
        assert t.cmd("MAIL FROM:<a@example.com> SIZE=1001").startswith("552 5.3.4 ")
        assert t.cmd("MAIL FROM:<a@example.com> SIZE=1000") == "250 2.1.0 OK"


def test_3_2_mail_sender_not_allowed_is_553(relay_factory):
    relay = relay_factory(allowed_sender=r"@example\.com$")
    with Talk(relay.port, ehlo="x") as t:
        assert t.cmd("MAIL FROM:<a@evil.test>").startswith("553 5.7.1 ")
        assert t.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 OK"


def test_3_2_mail_quoted_local_part(ready):
    assert ready.cmd('MAIL FROM:<"john >doe"@example.com>') == "250 2.1.0 OK"


def test_3_2_mail_source_route_is_stripped(relay):
    with Talk(relay.port, ehlo="x") as t:
        assert t.cmd("MAIL FROM:<@a.test,@b.test:a@example.com>") == "250 2.1.0 OK"
        assert t.cmd("RCPT TO:<@hop.test:b@example.com>") == "250 2.1.5 OK"
        assert t.cmd("DATA").startswith("354 ")
        assert t.cmd("Subject: x\r\n\r\nhi\r\n.").startswith("250 2.0.0 OK ")
    (meta, _), = outbox_messages(relay.outbox)
    assert meta["from"] == "a@example.com"
    assert meta["to"] == ["b@example.com"]


def test_3_2_non_ascii_address_without_smtputf8_is_553(ready):
    assert ready.cmd("MAIL FROM:<j\u00f6rg@example.com>").startswith("553 5.6.7 ")


def test_3_2_non_ascii_address_with_smtputf8(ready):
    assert ready.cmd("MAIL FROM:<j\u00f6rg@example.com> SMTPUTF8") == "250 2.1.0 OK"
    assert ready.cmd("RCPT TO:<m\u00fcller@example.com>") == "250 2.1.5 OK"


def test_3_2_non_ascii_recipient_without_smtputf8_is_553(ready):
    assert ready.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 OK"
    assert ready.cmd("RCPT TO:<m\u00fcller@example.com>").startswith("553 5.6.7 ")


def test_3_2_invalid_utf8_address_is_501(ready):
    ready.send(b"MAIL FROM:<\xff\xfe@example.com> SMTPUTF8\r\n")
    assert ready.reply().startswith("501 5.5.4 ")


# -- RCPT -----------------------------------------------------------------------

def test_3_2_rcpt_ok(ready):
    ready.cmd("MAIL FROM:<a@example.com>")
    assert ready.cmd("RCPT TO:<b@example.com>") == "250 2.1.5 OK"


def test_3_2_rcpt_postmaster_without_domain(ready):
    ready.cmd("MAIL FROM:<a@example.com>")
    assert ready.cmd("RCPT TO:<Postmaster>") == "250 2.1.5 OK"


def test_3_2_rcpt_without_mail_is_503(ready):
    assert ready.cmd("RCPT TO:<b@example.com>").startswith("503 5.5.1 ")


@pytest.mark.parametrize("arg", ["TO:", "TO:<>", "FROM:<b@example.com>", "TO:<b@example.com",
                                 "TO:<b>", "TO:b"],
                         ids=["no-address", "null", "wrong-keyword", "unclosed", "no-domain",
                              "bare-no-domain"])
def test_3_2_rcpt_syntax_is_501(ready, arg):
    ready.cmd("MAIL FROM:<a@example.com>")
    assert ready.cmd("RCPT " + arg).startswith("501 5.1.3 ")


def test_3_2_rcpt_parameters_are_refused_with_555(ready):
    ready.cmd("MAIL FROM:<a@example.com>")
    assert ready.cmd("RCPT TO:<b@example.com> NOTIFY=NEVER") == "555 5.5.4 Unrecognized parameter"
    assert ready.cmd("RCPT TO:b@example.com ORCPT=rfc822;b@example.com").startswith("555 5.5.4 ")
    assert ready.cmd("RCPT TO:b@example.com") == "250 2.1.5 OK"


def test_3_2_rcpt_not_allowed_is_550(relay_factory):
    relay = relay_factory(allowed_recipients=r"@example\.com$")
    with Talk(relay.port, ehlo="x") as t:
        t.cmd("MAIL FROM:<a@example.com>")
        assert t.cmd("RCPT TO:<b@elsewhere.test>") == "550 5.7.1 Recipient address not allowed"
        assert t.cmd("RCPT TO:<b@example.com>") == "250 2.1.5 OK"


def test_3_2_rcpt_without_a_route_is_550(relay_factory):
    relay = relay_factory(remotes=r"smtp://127.0.0.1:9?recipient=.*@example\.com")
    with Talk(relay.port, ehlo="x") as t:
        t.cmd("MAIL FROM:<a@example.com>")
        assert t.cmd("RCPT TO:<b@other.test>") == "550 5.7.1 No remote routes this recipient"
        assert t.cmd("RCPT TO:<b@EXAMPLE.com>") == "250 2.1.5 OK"


def test_3_2_rcpt_route_uses_aliases(relay_factory, tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text("printer@office.test ops@example.com\n")
    relay = relay_factory(remotes=r"smtp://127.0.0.1:9?recipient=.*@example\.com",
                          aliases_file=str(aliases))
    with Talk(relay.port, ehlo="x") as t:
        t.cmd("MAIL FROM:<a@example.com>")
        assert t.cmd("RCPT TO:<printer@office.test>") == "250 2.1.5 OK"


def test_3_2_too_many_recipients_is_452(relay_factory):
    relay = relay_factory(max_recipients="3")
    with Talk(relay.port, ehlo="x") as t:
        t.cmd("MAIL FROM:<a@example.com>")
        for i in range(3):
            assert t.cmd("RCPT TO:<r%d@example.com>" % i) == "250 2.1.5 OK"
        assert t.cmd("RCPT TO:<r9@example.com>") == "452 4.5.3 Too many recipients"
        assert t.cmd("DATA").startswith("354 ")
        assert t.cmd("x\r\n.").startswith("250 2.0.0 OK ")
    (meta, _), = outbox_messages(relay.outbox)
    assert len(meta["to"]) == 3


# -- DATA -----------------------------------------------------------------------

def test_3_2_data_delivers(relay, ready):
    ready.cmd("MAIL FROM:<a@example.com>")
    ready.cmd("RCPT TO:<b@example.com>")
    assert ready.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
    reply = ready.cmd("Subject: t\r\n\r\nhello\r\n.")
    assert reply.startswith("250 2.0.0 OK ")
    (meta, message), = outbox_messages(relay.outbox)
    assert reply.split()[-1] == meta["id"]
    assert message.endswith(b"Subject: t\r\n\r\nhello\r\n")


def test_3_2_data_without_rcpt_is_503(ready):
    assert ready.cmd("DATA").startswith("503 5.5.1 ")
    ready.cmd("MAIL FROM:<a@example.com>")
    assert ready.cmd("DATA").startswith("503 5.5.1 ")


def test_3_2_data_with_arguments_is_501(ready):
    ready.cmd("MAIL FROM:<a@example.com>")
    ready.cmd("RCPT TO:<b@example.com>")
    assert ready.cmd("DATA now").startswith("501 5.5.4 ")


def test_3_2_data_too_big_is_552_and_the_session_continues(relay_factory):
    relay = relay_factory(max_message_size="1000")
    with Talk(relay.port, ehlo="x") as t:
        t.to_data()
        t.send(b"x" * 5000 + b"\r\n")
        assert t.cmd(".") == "552 5.3.4 Message too big"
        assert t.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 OK"
        t.cmd("RCPT TO:<b@example.com>")
        t.cmd("DATA")
        assert t.cmd("small\r\n.").startswith("250 2.0.0 OK ")
    assert len(outbox_messages(relay.outbox)) == 1


def test_3_2_data_timeout_is_421(relay_factory):
    relay = relay_factory(data_timeout="1s")
    with Talk(relay.port, ehlo="x") as t:
        t.to_data()
        t.send(b"Subject: slow\r\n")
        assert t.reply() == "421 4.4.2 Timeout"
        assert t.closed()
    assert outbox_messages(relay.outbox) == []


def test_3_2_delivery_failure_reply_is_passed_on(relay_factory):
    relay = relay_factory(remotes="")
    with Talk(relay.port, ehlo="x") as t:
        t.to_data()
        assert t.cmd("x\r\n.") == "554 5.3.5 No remote configured"
        assert t.cmd("NOOP") == "250 2.0.0 OK"


# -- RSET, NOOP, VRFY, HELP, QUIT, unknown ------------------------------------

def test_3_2_rset_clears_the_envelope_and_keeps_ehlo(ready):
    ready.cmd("MAIL FROM:<a@example.com>")
    assert ready.cmd("RSET") == "250 2.0.0 OK"
    assert ready.cmd("RCPT TO:<b@example.com>").startswith("503 5.5.1 ")
    assert ready.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 OK"


def test_3_2_noop(talk):
    assert talk.cmd("NOOP") == "250 2.0.0 OK"


def test_3_2_vrfy(talk):
    assert talk.cmd("VRFY root") == "252 2.5.0 Cannot VRFY user, but will accept message"


def test_3_2_help(talk):
    assert talk.cmd("HELP").startswith("214 2.0.0 ")


def test_3_2_quit_closes(talk):
    assert talk.cmd("QUIT") == "221 2.0.0 Bye"
    assert talk.closed()


@pytest.mark.parametrize("line", ["EXPN list", "TURN", "BDAT 10 LAST", "X", "\x00\x01"])
def test_3_2_unknown_command_is_500(ready, line):
    assert ready.cmd(line) == "500 5.5.2 Command unrecognized"


def test_3_2_control_characters_are_not_echoed(ready):
    """No reply echoes client text raw; the connection stays in step."""
    ready.send(b"MAIL FROM:<a\x07b@example.com>\r\n")
    reply = ready.reply()
    assert reply.startswith("501 5.5.4 ") and "\x07" not in reply


# -- PIPELINING -----------------------------------------------------------------

def test_3_2_pipelined_transaction_gets_every_reply(relay, talk):
    talk.cmd("EHLO x")
    talk.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\n"
              b"NOOP\r\nDATA\r\n")
    assert talk.replies(5) == ["250 2.1.0 OK", "250 2.1.5 OK", "250 2.1.5 OK", "250 2.0.0 OK",
                               "354 End data with <CR><LF>.<CR><LF>"]
    talk.send(b"one\r\n.\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    replies = talk.replies(4)
    assert replies[0].startswith("250 2.0.0 OK ") and replies[1:] == [
        "250 2.1.0 OK", "250 2.1.5 OK", "354 End data with <CR><LF>.<CR><LF>"]
    talk.send(b"two\r\n.\r\nQUIT\r\n")
    assert talk.reply().startswith("250 2.0.0 OK ")
    assert talk.reply() == "221 2.0.0 Bye"
    assert len(outbox_messages(relay.outbox)) == 2


def test_3_2_smtplib_sendmail(relay):
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=5) as client:
        refused = client.sendmail("a@example.com", ["b@example.com", "c@example.com"],
                                  b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n")
    assert refused == {}
    (meta, message), = outbox_messages(relay.outbox)
    assert meta["to"] == ["b@example.com", "c@example.com"]
    assert message.endswith(b"\r\n\r\n.leading dot\r\nbody\r\n")


def test_3_3_received_header(relay):
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=5) as client:
        client.ehlo("printer(<lan>)")
        client.sendmail("a@example.com", ["b@example.com"], b"Subject: hi\r\n\r\nbody\r\n")
    (meta, message), = outbox_messages(relay.outbox)
    first = message.split(b"\r\n")[:3]
    assert first[0] == b"Received: from printerlan ([127.0.0.1])"
    assert first[1] == b"\tby relay.test (smtprelay) with ESMTP id " + meta["id"].encode()
    assert first[2].startswith(b"\tfor <b@example.com>; ")
