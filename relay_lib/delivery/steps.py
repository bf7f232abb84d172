"""After the final dot: aliases and the Received header, then the webhook,
the command and each destination, in that order (SPEC 4, 5.3, 11).

Owns the order of the steps and what each (destination, recipient) pair did
(`Job`, `Pair`). Must not touch the client socket and knows nothing of a
queue: it reports the first Failure or none, and whoever handles the
session's message (`Delivery.deliver`, or the spool around it) turns that
into the client's reply through the outcome policy.
"""

# Annotations stay unevaluated: _forward defines its nested functions for
# every message, and evaluating List[...] and Tuple[...] each time shows.
from __future__ import annotations

import base64
import logging
import ssl
import time
from datetime import datetime, timezone
from typing import Dict, List, NamedTuple, Optional, Set, Tuple, Union

from relay_lib import failure, metrics, replies
from relay_lib.config.remotes import Remote
from relay_lib.config.settings import Settings
from relay_lib.delivery import outcome, routing, webhook
from relay_lib.delivery.aliases import Aliases
from relay_lib.delivery.command import run_command
from relay_lib.delivery.jobs import DELIVERED, DISCARDED, PENDING, REFUSED, Job, Pair, follow_routes, unique
from relay_lib.delivery.received import received_header
from relay_lib.envelope import Envelope
from relay_lib.failure import Failure
from relay_lib.logs import fields, log
from relay_lib.outbound import oauth, outbox
from relay_lib.outbound.accounts import Accounts, state_file
from relay_lib.outbound.dispatcher import Dispatcher, Sent
from relay_lib.replies import Reply, clean_echo

# Base64 grows a message by 4/3; the scanner may add headers or a disclaimer.
WEBHOOK_ANSWER_SLACK = 1024 * 1024


class Attempt(NamedTuple):
    """One run of the steps over a new message: its job (None when it never
    got one: nowhere to go, or a bug), the first failure, one short result
    per step for the message log line, and when it started."""

    env: Envelope
    job: Optional[Job]
    failure: Optional[Failure]
    results: List[str]
    started: float


class Delivery:
    """Runs the delivery steps of SPEC 4 for each message; safe to share between threads."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.aliases = Aliases(settings.aliases_file)
        self.dispatcher = make_dispatcher(settings)
        # Built once: loading the system trust store per webhook call is slow.
        self.webhook_context = ssl.create_default_context() if settings.webhook_url else None

    def deliver(self, env: Envelope, body: bytes) -> Reply:
        """The session's handler without a spool: the first failure decides
        the client's reply (SPEC 4.1); never raises.

        `body` is the message after dot-unstuffing, with CRLF line ends and
        without the Received header, which is prepended here.
        """
        attempt = self.attempt(env, body)
        reply = outcome.client_reply(attempt.failure) if attempt.failure else replies.accepted(env.id)
        self.record(attempt, reply)
        return reply

    def attempt(self, env: Envelope, body: bytes, keep_going: bool = False,
                scan_only: bool = False) -> Attempt:
        """Prepare a new message and run its steps once (see run_steps); never raises."""
        started = time.monotonic()
        results: List[str] = []
        try:
            job, found = self._first(env, body, results, keep_going, scan_only)
        # The session must always get a reply and the client keeps the
        # message on a 4xx; a bug here must not kill the session thread.
        except Exception:  # noqa: BLE001
            log.exception("delivery failed", extra=fields(id=env.id))
            job, found = None, failure.temporary(failure.INTERNAL, "", "internal error",
                                                 replies.FORWARD_TEMPFAIL)
        return Attempt(env, job, found, results, started)

    def record(self, attempt: Attempt, reply: Reply, queued: bool = False) -> None:
        """Count the message and log its one line (SPEC 6), with the client's reply."""
        env = attempt.env
        metrics.MESSAGES.labels(outcome.message_result(reply, queued)).inc()
        # Asked first: below info level the fields would be built for nothing,
        # once per message (hot path).
        if log.isEnabledFor(logging.INFO):
            log.info("message", extra=fields(
                id=env.id, peer=env.peer, user=env.user or "", **{"from": env.mail_from},
                to=list(env.rcpts), size=env.size, remote="; ".join(attempt.results),
                result=str(reply), ms=int((time.monotonic() - attempt.started) * 1000)))

    def stop_waiting(self) -> None:
        """Shutdown: messages waiting for room at a remote stop waiting (SPEC 13)."""
        self.dispatcher.stop_waiting()

    def close(self) -> None:
        """Close the pooled remote connections."""
        self.dispatcher.close()

    def _first(self, env: Envelope, body: bytes, results: List[str], keep_going: bool,
               scan_only: bool) -> Tuple[Optional[Job], Optional[Failure]]:
        s = self.settings
        env.rcpts = unique(self.aliases.resolve(r) for r in env.rcpts)
        message = received_header(s, env) + body
        env.size = len(message)
        if not s.remotes and not s.command:
            return None, outcome.step_failure(failure.ROUTE, replies.NO_REMOTE)
        plan = routing.route(s.remotes, env.mail_from, env.rcpts, s.strict_sender)
        routed = {r for _, rcpts in plan for r in rcpts}
        if s.remotes and any(r not in routed for r in env.rcpts):
            # Refused at RCPT normally (SPEC 5.2); reaching here means the
            # aliases or remotes changed since. Never drop after a 250.
            results.append("no remote routes a recipient")
            return None, outcome.step_failure(failure.ROUTE, replies.NO_ROUTE)
        job = self.new_job(env, message, plan, scan=bool(s.webhook_url))
        return job, self.run_steps(job, results, keep_going, scan_only, plan)

    def run_steps(self, job: Job, results: List[str], keep_going: bool = False,
                  scan_only: bool = False, plan=None) -> Optional[Failure]:
        """Run the steps `job` still owes, in order; returns the first failure, or None.

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
            if verdict.action == webhook.DISCARD:
                job.settle_pending(DISCARDED, "discarded by the webhook")  # quarantined by the scanner
                return None
            if verdict.action == webhook.REPLACE:
                job.message = verdict.message
            elif verdict.action != webhook.ACCEPT:
                found = self._verdict_failure(env, verdict)
                if outcome.refuses(found):
                    job.settle_pending(REFUSED, str(found.reply))
                else:
                    job.error = str(found.reply)
                return found
            job.scan = False
        if scan_only:
            return None
        if job.command:
            reply = run_command(self.settings, env, job.message)
            results.append("command %d" % reply.code)
            if reply is not replies.OK:
                found = outcome.step_failure(failure.COMMAND, reply)
                if outcome.refuses(found):
                    job.settle_pending(REFUSED, str(reply))
                job.error = str(reply)
                return found
            job.command = False
            if not self.settings.remotes:
                job.settle_pending(DELIVERED, "command 0")
        return self._forward(job, results, keep_going, plan)

    def new_job(self, env: Envelope, message: bytes, plan, scan: bool) -> Job:
        """A job with every step to do: one pair per routed recipient of each
        destination, keyed by the destination's name (stable across restarts)."""
        if not self.settings.remotes:  # the command is the only destination
            pairs = [Pair("command", rcpt) for rcpt in env.rcpts]
        else:
            pairs = [Pair(dest.name, rcpt) for dest, rcpts in plan for rcpt in rcpts]
        return Job(env, message, scan=scan, command=bool(self.settings.command), pairs=pairs)

    def _verdict_failure(self, env: Envelope, verdict: webhook.Verdict) -> Failure:
        """The failure a reject or tempfail verdict stands for (SPEC 4.2)."""
        if verdict.action == webhook.REJECT:
            log.warning("webhook rejected the message", extra=fields(
                id=env.id, code=verdict.code, reason=clean_echo(verdict.reason)))
            reply = replies.scan_rejected(verdict.code, verdict.enhanced, verdict.reason)
        else:
            log.warning("webhook failed", extra=fields(id=env.id, reason=verdict.reason))
            reply = replies.SCAN_UNAVAILABLE
        return outcome.step_failure(failure.WEBHOOK, reply, verdict.reason)

    def _forward(self, job: Job, results: List[str], keep_going: bool, plan) -> Optional[Failure]:
        """One transaction per destination with pending pairs, in the order
        listed; a failover group tries its members (SPEC 5.3, 11). Without
        `keep_going` the first failure stops; with it each destination gets
        its try and the pairs record what it did (SPEC 9)."""
        env, message = job.env, job.message
        failures: List[Failure] = []
        current: Dict[str, Pair] = {}
        answered: Set[str] = set()  # recipients a remote refused one by one
        deadline = self.dispatcher.deadline()  # one wait for room per message (SPEC 13)

        def reserve(members: List[Remote], counts: List[int]):
            return self.dispatcher.reserve_any(members, counts, deadline)

        def send(remote: Remote, rcpts: List[str], hold, last: bool) -> Union[Tuple[str, List[str]], Failure]:
            if remote.scheme == "file":
                try:
                    outbox.write_file(remote.path, env.id, self._envelope_json(env, rcpts, message), message)
                except OSError as exc:
                    return failure.temporary(failure.OUTBOX, remote.masked(), exc.strerror or str(exc))
                sent = Sent("ok", {})
            else:
                result = self.dispatcher.send(remote, env.mail_from, rcpts, message, keep_going=keep_going,
                                              deadline=deadline, hold=hold, patient=last)
                if isinstance(result, Failure):
                    return result
                sent = result
            owed: List[str] = []  # refused for now: still pending, for the next member or retry
            for rcpt, refusal in sent.refused.items():
                failures.append(refusal)
                answered.add(rcpt)
                _record(job, current[rcpt], refusal)
                if current[rcpt].state == PENDING:
                    owed.append(rcpt)
            if sent.reply is None:  # every recipient refused: the member failed as a whole
                return next(iter(sent.refused.values()))
            for rcpt in rcpts:
                if current[rcpt].state == PENDING and rcpt not in owed:
                    current[rcpt].state, current[rcpt].reply = DELIVERED, sent.reply
            return sent.reply, owed

        def attempted(remote: Remote, result: Union[Tuple[str, List[str]], Failure]) -> None:
            if isinstance(result, Failure):
                reply = outcome.client_reply(result)
                results.append("%s %s" % (remote.masked(), reply.code))
                log.warning("remote failed", extra=fields(
                    id=env.id, remote=remote.masked(), error=result.describe(), reply=str(reply)))
            else:
                results.append("%s %s" % (remote.masked(), result[0]))

        if plan is None:
            # A retry: route again, and move the pairs whose destination
            # changed meanwhile. The plan a new job was just made from needs
            # neither (every pair is where it routes), so a first attempt
            # skips both: this runs for every message.
            plan = routing.route(self.settings.remotes, env.mail_from, [p.rcpt for p in job.pending()],
                                 self.settings.strict_sender)
            follow_routes(job, plan, {dest.name for dest in routing.destinations(self.settings.remotes)})
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
                failures.append(failure.temporary(failure.ROUTE, name, job.error))
                continue
            failed = routing.deliver(dest, list(current), send, attempted, self.dispatcher.is_down, reserve)
            if failed is None:
                continue
            remote, found = failed
            if not keep_going:
                return found
            failures.append(found)
            job.error = found.describe()
            for pair in current.values():
                # Recipients the failing member never had stay pending for the next try.
                if pair.state == PENDING and pair.rcpt not in answered and remote.admits(pair.rcpt):
                    _record(job, pair, found)
        return failures[0] if failures else None

    def _scan(self, env: Envelope, message: bytes) -> webhook.Verdict:
        s = self.settings
        payload = self._envelope_json(env, env.rcpts, message)
        payload["message"] = base64.b64encode(message).decode("ascii")
        limit = s.max_message_size * 4 // 3 + WEBHOOK_ANSWER_SLACK
        return webhook.scan(s.webhook_url, payload, s.webhook_secret, s.webhook_timeout, limit,
                            self.webhook_context)

    @staticmethod
    def _envelope_json(env: Envelope, rcpts: List[str], message: bytes) -> dict:
        """The envelope as the `file:` remote's .json and the webhook's request carry it."""
        return {"id": env.id, "peer": env.peer, "helo": env.helo, "username": env.user,
                "tls": bool(env.tls), "from": env.mail_from, "to": rcpts, "size": len(message),
                "received_at": _utc(env.received_at)}


def make_dispatcher(settings: Settings) -> Dispatcher:
    """The remote connection pool, with the remotes' limits (SPEC 13) and the
    OAuth token source when a remote needs one."""
    tokens = None
    if any(r.auth == "xoauth2" for r in settings.remotes):
        tokens = oauth.TokenSource(settings.oauth_token_url, settings.oauth_client_id,
                                   settings.oauth_client_secret, settings.oauth_scope,
                                   settings.oauth_refresh_token, settings.remote_timeout)
    accounts = Accounts(settings.remote_limits, settings.remote_wait, settings.remote_quota_pause,
                        state_file(settings.spool_dir))
    return Dispatcher(
        settings.hostname, settings.remote_timeout,
        client_cert=settings.remote_certificate, client_key=settings.remote_key,
        pool_size=settings.remote_pool_size, pool_idle=settings.remote_pool_idle,
        failover_skip=settings.failover_skip, tokens=tokens, accounts=accounts)


def _record(job: Job, pair: Pair, found: Failure) -> None:
    """Record a failure for one pair: refused for good, or pending with the reason."""
    if outcome.refuses(found):
        pair.state, pair.reply = REFUSED, str(outcome.client_reply(found))
    else:
        pair.reply = found.describe()
        job.error = pair.reply


def _utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
