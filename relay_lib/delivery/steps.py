"""After the final dot: the Received header, then aliases, webhook, command
and remotes, and the mapping of each outcome to its SPEC 4.1 reply.

Owns the order of delivery steps and what each (destination, recipient) pair
still owes (`Job`, `Pair`: the spool stores them and retries the rest, SPEC
9). Must not touch the client socket: it takes an envelope and the message
bytes and returns the one reply for the client.
"""

# Annotations stay unevaluated: _forward defines its nested functions for
# every message, and evaluating List[...] and Tuple[...] each time shows.
from __future__ import annotations

import base64
import itertools
import logging
import os
import re
import secrets
import smtplib
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Dict, List, Optional, Tuple

from relay_lib import metrics, replies
from relay_lib.outbound import oauth
from relay_lib.outbound import outbox
from relay_lib.config import remotes
from relay_lib.outbound import dispatcher as upstream
from relay_lib.delivery import webhook
from relay_lib.config.settings import Settings
from relay_lib.logs import fields, log
from relay_lib.inbound.policy import Aliases
from relay_lib.replies import Reply, clean_echo

EX_TEMPFAIL = 75  # sysexits.h: the command asks the client to retry (SPEC 4.3)
# Base64 grows a message by 4/3; the scanner may add headers or a disclaimer.
WEBHOOK_ANSWER_SLACK = 1024 * 1024


@dataclass
class Envelope:
    """What the session learned about one message before its body."""

    id: str
    peer: str
    helo: str
    user: Optional[str]
    tls: Optional[Tuple[str, str]]
    esmtp: bool
    mail_from: str
    rcpts: List[str] = field(default_factory=list)
    received_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    size: int = 0


# Unique across restarts (time, a random per-process part) and within the
# process (a counter), with no system call per message.
_ID_PROCESS = secrets.token_hex(4)
_id_counter = itertools.count(1)


def new_message_id() -> str:
    """A short unique id for logs, the Received header, the webhook and file names."""
    return "%x%s%x" % (int(time.time()), _ID_PROCESS, next(_id_counter))


_NOT_IN_HELO = re.compile(r"[^!-~]|[()<>]")  # SPEC 3.3: printable ASCII without ()<>


def _printable_helo(helo: str) -> str:
    return _NOT_IN_HELO.sub("", helo) or "unknown"


_last_date = (None, "")  # (whole second, its RFC 5322 text): one format per second


def _rfc5322_date(moment: datetime) -> str:
    """The Received header's date [R5322 3.3], formatted once a second (it is on the hot path)."""
    global _last_date
    second = moment.replace(microsecond=0)
    cached = _last_date
    if cached[0] != second:
        cached = (second, format_datetime(second))
        _last_date = cached  # one tuple assignment: safe to race between threads
    return cached[1]


def received_header(settings: Settings, env: Envelope) -> bytes:
    """The trace header of SPEC 3.3 [R5321 4.4]."""
    proto = "ESMTP" if env.esmtp else "SMTP"
    if env.tls:
        proto += "S"
    if env.user:
        proto += "A"
    tls = " (%s %s)" % env.tls if env.tls else ""
    # `for` only with one recipient, as Postfix: every copy carries this
    # header, and naming one recipient would show a Bcc to the others.
    rcpt = "\r\n\tfor <%s>" % env.rcpts[0] if len(env.rcpts) == 1 else ""
    text = "Received: from %s ([%s])\r\n\tby %s (smtprelay) with %s%s id %s%s; %s\r\n" % (
        _printable_helo(env.helo), env.peer, settings.hostname, proto, tls, env.id,
        rcpt, _rfc5322_date(env.received_at))
    return text.encode("utf-8", "replace")


# The state of one (destination, recipient) pair (SPEC 9).
PENDING, DELIVERED, REFUSED, DISCARDED = "pending", "delivered", "refused", "discarded"


@dataclass
class Pair:
    """One recipient at one destination: its state and the last reply about it."""

    dest: str
    rcpt: str
    state: str = PENDING
    reply: str = ""
    notified: bool = False  # a bounce was made for this refusal


@dataclass
class Job:
    """A message part way through the steps: what is done and what is left.

    `scan` and `command` are the webhook and command steps still to run;
    `pairs` say what each destination still owes. A retry runs the same
    steps from the first undone one, so nothing that succeeded runs again.
    """

    env: Envelope
    message: bytes
    scan: bool
    command: bool
    pairs: List[Pair]
    error: str = ""  # why the last attempt left something pending

    def pending(self) -> List[Pair]:
        return [p for p in self.pairs if p.state == PENDING]


class Delivery:
    """Runs the delivery steps of SPEC 4 for each message; safe to share between threads."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.aliases = Aliases(settings.aliases_file)
        self.dispatcher = make_dispatcher(settings)
        # Built once: loading the system trust store per webhook call is slow.
        self.webhook_context = ssl.create_default_context() if settings.webhook_url else None
        # With a spool, `spool.settle(job, failure) -> Reply` takes over the
        # reply (SPEC 9); the spool sets it so this module never imports it.
        self.spool = None

    def deliver(self, env: Envelope, body: bytes) -> Reply:
        """Deliver one message; returns the client's reply, never raises.

        `body` is the message after dot-unstuffing, with CRLF line ends and
        without the Received header, which is prepended here.
        """
        started = time.monotonic()
        results: List[str] = []
        try:
            reply = self._deliver(env, body, results)
        # The session must always get a reply and the client keeps the
        # message on a 4xx; a bug here must not kill the session thread.
        except Exception:  # noqa: BLE001
            log.exception("delivery failed", extra=fields(id=env.id))
            reply = replies.FORWARD_TEMPFAIL
        # Without a spool no reply is "queued": skip building one to compare (hot path).
        queued = self.spool is not None and reply == replies.queued(env.id)
        metrics.MESSAGES.labels("queued" if queued else metrics.message_result(reply.code)).inc()
        # Asked first: below info level the fields would be built for nothing,
        # once per message (hot path).
        if log.isEnabledFor(logging.INFO):
            log.info("message", extra=fields(
                id=env.id, peer=env.peer, user=env.user or "", **{"from": env.mail_from},
                to=list(env.rcpts), size=env.size, remote="; ".join(results),
                result=str(reply), ms=int((time.monotonic() - started) * 1000)))
        return reply

    def close(self) -> None:
        """Close the pooled remote connections."""
        self.dispatcher.close()

    def _deliver(self, env: Envelope, body: bytes, results: List[str]) -> Reply:
        """The steps of SPEC 4 in order; the first one that fails decides the reply."""
        s = self.settings
        env.rcpts = _unique(self.aliases.resolve(r) for r in env.rcpts)
        message = received_header(s, env) + body
        env.size = len(message)
        if not s.remotes and not s.command:
            return replies.NO_REMOTE
        plan = remotes.route(s.remotes, env.mail_from, env.rcpts, s.strict_sender)
        routed = {r for _, rcpts in plan for r in rcpts}
        if s.remotes and any(r not in routed for r in env.rcpts):
            # Refused at RCPT normally (SPEC 5.2); reaching here means the
            # aliases or remotes changed since. Never drop after a 250.
            results.append("no remote routes a recipient")
            return replies.NO_ROUTE
        job = self.new_job(env, message, plan, scan=bool(s.webhook_url))
        if self.spool is None:
            return self.run_steps(job, results, plan=plan) or replies.accepted(env.id)
        failure = self.run_steps(job, results, keep_going=True,
                                 scan_only=s.spool_mode == "always", plan=plan)
        return self.spool.settle(job, failure)

    def run_steps(self, job: Job, results: List[str], keep_going: bool = False,
                  scan_only: bool = False, plan=None) -> Optional[Reply]:
        """Run the steps `job` still owes, in order; returns the first failure's reply, or None.

        A webhook or command failure stops there; a permanent one refuses
        every pending pair. Remotes are tried in order; without `keep_going`
        the first failure stops (SPEC 5.3), with it every destination gets its
        try and the pairs record what each one did (SPEC 9). `plan` is the
        routing the job was just made from; without it the remotes are routed
        again (a retry: the configuration may have changed meanwhile).
        """
        env = job.env
        if job.scan:
            verdict = self._scan(env, job.message)
            metrics.WEBHOOK_CALLS.labels(verdict.action).inc()
            results.append("webhook %s" % verdict.action)
            if verdict.action == webhook.REPLACE:
                job.message = verdict.message
            elif verdict.action != webhook.ACCEPT:
                reply = self._verdict_reply(env, verdict)
                if verdict.action == webhook.DISCARD:
                    _settle_pending(job, DISCARDED, "discarded by the webhook")
                elif reply.code >= 500:
                    _settle_pending(job, REFUSED, str(reply))
                else:
                    job.error = str(reply)
                    return reply
                return None if verdict.action == webhook.DISCARD else reply
            job.scan = False
        if scan_only:
            return None
        if job.command:
            reply = self._run_command(env, job.message)
            results.append("command %d" % reply.code)
            if reply is not replies.OK:
                if reply.code >= 500:
                    _settle_pending(job, REFUSED, str(reply))
                job.error = str(reply)
                return reply
            job.command = False
            if not self.settings.remotes:
                _settle_pending(job, DELIVERED, "command 0")
        return self._forward(job, results, keep_going, plan)

    def new_job(self, env: Envelope, message: bytes, plan, scan: bool) -> Job:
        """A job with every step to do: one pair per routed recipient of each
        destination, keyed by the destination's name (stable across restarts)."""
        if not self.settings.remotes:  # the command is the only destination
            pairs = [Pair("command", rcpt) for rcpt in env.rcpts]
        else:
            pairs = [Pair(dest.name, rcpt) for dest, rcpts in plan for rcpt in rcpts]
        return Job(env, message, scan=scan, command=bool(self.settings.command), pairs=pairs)

    def _verdict_reply(self, env: Envelope, verdict: webhook.Verdict) -> Reply:
        """The reply for a webhook verdict that stops the message (SPEC 4.2)."""
        if verdict.action == webhook.REJECT:
            log.warning("webhook rejected the message", extra=fields(
                id=env.id, code=verdict.code, reason=clean_echo(verdict.reason)))
            return replies.scan_rejected(verdict.code, verdict.enhanced, verdict.reason)
        if verdict.action == webhook.DISCARD:
            return replies.accepted(env.id)  # quarantined by the scanner: nothing to forward
        log.warning("webhook failed", extra=fields(id=env.id, reason=verdict.reason))
        return replies.SCAN_UNAVAILABLE

    def _forward(self, job: Job, results: List[str], keep_going: bool, plan) -> Optional[Reply]:
        """One transaction per destination with pending pairs, in the order
        listed; a failover group tries its members (SPEC 5.3, 11). Without
        `keep_going` the first failure stops; with it each destination gets
        its try and the pairs record what it did (SPEC 9)."""
        env, message = job.env, job.message
        first_failure: List[Reply] = []
        current: Dict[str, Pair] = {}

        def send(remote: remotes.Remote, rcpts: List[str]) -> Tuple[str, List[str]]:
            owed: List[str] = []  # refused for now: still pending, for the next member or retry
            if remote.scheme == "file":
                outbox.write_file(remote.path, env.id, self._envelope_json(env, rcpts, message), message)
                outcome = "ok"
            else:
                refused: Optional[Dict[str, tuple]] = {} if keep_going else None
                outcome = self.dispatcher.send(remote, env.mail_from, rcpts, message, refused=refused)
                for rcpt, answer in (refused or {}).items():  # refused one by one, the others took it
                    failure = smtplib.SMTPRecipientsRefused({rcpt: answer})
                    first_failure.append(remote_reply(remote, failure))
                    _refused_one(job, current[rcpt], remote, failure)
                    if current[rcpt].state == PENDING:
                        owed.append(rcpt)
            for rcpt in rcpts:
                if current[rcpt].state == PENDING and rcpt not in owed:
                    current[rcpt].state, current[rcpt].reply = DELIVERED, outcome
            return outcome, owed

        def attempted(remote: remotes.Remote, outcome: remotes.Outcome) -> None:
            if isinstance(outcome, Exception):
                reply = remote_reply(remote, outcome)
                results.append("%s %s" % (remote.masked(), reply.code))
                log.warning("remote failed", extra=fields(
                    id=env.id, remote=remote.masked(), error=_describe(outcome), reply=str(reply)))
            else:
                results.append("%s %s" % (remote.masked(), outcome))

        if plan is None:
            # A retry: route again, and move the pairs whose destination
            # changed meanwhile. The plan a new job was just made from needs
            # neither (every pair is where it routes), so a first attempt
            # skips both: this runs for every message.
            plan = remotes.route(self.settings.remotes, env.mail_from, [p.rcpt for p in job.pending()],
                                 self.settings.strict_sender)
            _follow_routes(job, plan, {dest.name for dest in remotes.destinations(self.settings.remotes)})
        routes = {dest.name: dest for dest, _ in plan}
        # Each destination's pending pairs, in the order listed, found in one
        # pass over the pairs. A destination's pairs change only while it is
        # tried, so finding them first is the same.
        owed_by: Dict[str, Dict[str, Pair]] = {}
        for pair in job.pending():
            owed_by.setdefault(pair.dest, {})[pair.rcpt] = pair
        for name, current in owed_by.items():
            dest = routes.get(name)
            if dest is None:  # the configuration changed while the message was queued
                job.error = "%s is no longer configured" % name
                first_failure.append(replies.FORWARD_TEMPFAIL)
                continue
            failed = remotes.deliver(dest, list(current), send, attempted, self.dispatcher.is_down)
            if failed is None:
                continue
            reply = remote_reply(*failed)
            if not keep_going:
                return reply
            first_failure.append(reply)
            remote, exc = failed
            job.error = _describe(exc)
            for pair in current.values():
                # Recipients the failing member never had stay pending for the next try.
                if pair.state == PENDING and remote.admits(pair.rcpt):
                    _refused_one(job, pair, remote, exc)
        return first_failure[0] if first_failure else None

    def _scan(self, env: Envelope, message: bytes) -> webhook.Verdict:
        s = self.settings
        payload = self._envelope_json(env, env.rcpts, message)
        payload["message"] = base64.b64encode(message).decode("ascii")
        limit = s.max_message_size * 4 // 3 + WEBHOOK_ANSWER_SLACK
        return webhook.scan(s.webhook_url, payload, s.webhook_secret, s.webhook_timeout, limit,
                            self.webhook_context)

    def _run_command(self, env: Envelope, message: bytes) -> Reply:
        """The command step of SPEC 4.3: message on stdin, no shell, data_timeout."""
        s = self.settings
        if not s.command:
            # A queued message still owes the step, but the configuration no
            # longer has it: as for a remote that is gone, try again later.
            log.error("command is no longer configured", extra=fields(id=env.id))
            return replies.COMMAND_TEMPFAIL
        environ = dict(os.environ, SMTPRELAY_FROM=env.mail_from, SMTPRELAY_TO=" ".join(env.rcpts),
                       SMTPRELAY_PEER=env.peer, SMTPRELAY_ID=env.id)
        try:
            done = subprocess.run(list(s.command), input=message, env=environ,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  timeout=s.data_timeout, check=False)
        except subprocess.TimeoutExpired:
            log.warning("command timed out", extra=fields(id=env.id, seconds=s.data_timeout))
            return replies.COMMAND_TEMPFAIL
        except OSError as exc:
            # A missing or unrunnable program is the operator's to fix: retry later.
            log.error("command cannot run", extra=fields(id=env.id, command=s.command[0],
                                                          error=str(exc)))
            return replies.COMMAND_TEMPFAIL
        if done.returncode == 0:
            return replies.OK
        stderr = " ".join(done.stderr.decode("utf-8", "replace").split())[-300:]
        log.warning("command failed", extra=fields(id=env.id, status=done.returncode, stderr=stderr))
        return replies.COMMAND_TEMPFAIL if done.returncode == EX_TEMPFAIL else replies.COMMAND_FAILED

    @staticmethod
    def _envelope_json(env: Envelope, rcpts: List[str], message: bytes) -> dict:
        """The envelope as the `file:` remote's .json and the webhook's request carry it."""
        return {"id": env.id, "peer": env.peer, "helo": env.helo, "username": env.user,
                "tls": bool(env.tls), "from": env.mail_from, "to": rcpts, "size": len(message),
                "received_at": _utc(env.received_at)}


def make_dispatcher(settings: Settings) -> upstream.Dispatcher:
    """The remote connection pool, with the OAuth token source when a remote needs one."""
    tokens = None
    if any(r.auth == "xoauth2" for r in settings.remotes):
        tokens = oauth.TokenSource(settings.oauth_token_url, settings.oauth_client_id,
                                   settings.oauth_client_secret, settings.oauth_scope,
                                   settings.oauth_refresh_token, settings.remote_timeout)
    return upstream.Dispatcher(
        settings.hostname, settings.remote_timeout,
        client_cert=settings.remote_certificate, client_key=settings.remote_key,
        pool_size=settings.remote_pool_size, pool_idle=settings.remote_pool_idle,
        failover_skip=settings.failover_skip, tokens=tokens)


def _settle_pending(job: Job, state: str, reply: str) -> None:
    for pair in job.pending():
        pair.state, pair.reply = state, reply


def _follow_routes(job: Job, plan, configured) -> None:
    """A pending pair whose destination no longer takes its recipient (the
    configuration changed while it was queued: a remote's URL was fixed, a
    group renamed) goes to the recipient's current destinations that have no
    pair for it. Never while a pair that is done names a destination that is
    gone: that one may be among the current ones under a new name (SPEC 9)."""
    admitted = {(dest.name, rcpt) for dest, rcpts in plan for rcpt in rcpts}
    for pair in job.pending():
        if (pair.dest, pair.rcpt) in admitted or any(
                p.rcpt == pair.rcpt and p.state != PENDING and p.dest not in configured for p in job.pairs):
            continue
        taken = {p.dest for p in job.pairs if p.rcpt == pair.rcpt}
        names = [dest.name for dest, rcpts in plan if pair.rcpt in rcpts and dest.name not in taken]
        if names:
            pair.dest = names[0]
            job.pairs.extend(Pair(name, pair.rcpt) for name in names[1:])


def _refused_one(job: Job, pair: Pair, remote: remotes.Remote, exc: Exception) -> None:
    """Record a failed send for one pair: a 5xx refuses it, anything else leaves it pending."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        answer = exc.recipients.get(pair.rcpt)
        exc = smtplib.SMTPRecipientsRefused({pair.rcpt: answer}) if answer else OSError(
            "the remote refused the other recipients")
    reply = remote_reply(remote, exc)
    pair.reply = str(reply) if reply.code >= 500 else _describe(exc)
    if reply.code >= 500:
        pair.state = REFUSED
    else:
        job.error = pair.reply


def remote_reply(remote: remotes.Remote, exc: BaseException) -> Reply:
    """SPEC 4.1: a remote's 5xx passes through, prefixed by its host; the rest is 451 4.4.1."""
    code, text = remotes.failure_code(exc)
    if not 500 <= code <= 599:
        return replies.FORWARD_TEMPFAIL
    words = upstream.reply_text(text).split(" ", 1)
    enhanced = "%d.0.0" % (code // 100)
    if words[0][:2] == "5." and replies.is_enhanced_code(words[0]):
        enhanced = words[0]
        words = words[1:]
    return replies.remote_refused(code, enhanced, remote.host, " ".join(words))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "recipient refused: %s" % "; ".join(
            "%s %d %s" % (rcpt, code, upstream.reply_text(text)) for rcpt, (code, text) in exc.recipients.items())
    if isinstance(exc, smtplib.SMTPResponseException):
        return "%s: %d %s" % (type(exc).__name__, exc.smtp_code, upstream.reply_text(exc.smtp_error))
    return "%s: %s" % (type(exc).__name__, str(exc) or "no detail")


def _unique(addrs) -> List[str]:
    """Recipients in order without repeats (two aliases may share a target)."""
    seen, out = set(), []
    for addr in addrs:
        key = addr.lower()
        if key not in seen:
            seen.add(key)
            out.append(addr)
    return out


def _utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
