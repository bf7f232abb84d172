"""The scanning webhook of SPEC 4.2: one signed JSON POST per message over urllib.

Owns the request (body, X-Smtprelay-Id, HMAC signature), the deadline over the
whole call, and turning the answer into a `Verdict`. Must not choose replies:
delivery maps a Verdict to the client's reply. A scanner that is broken, slow
or unreachable yields a "tempfail" verdict, never an exception.
"""

import base64
import binascii
import hashlib
import hmac
import json
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, NamedTuple, Optional

from relay_lib.deadline import Deadline
from relay_lib.netaddr import is_loopback

ACCEPT, REPLACE, REJECT, DISCARD, TEMPFAIL = "accept", "replace", "reject", "discard", "tempfail"
DEFER = "defer"  # a synonym of tempfail
ACTIONS = (ACCEPT, REPLACE, REJECT, DISCARD, TEMPFAIL, DEFER)  # what a scanner may answer
DEFAULT_REJECT_CODE = 550  # SPEC 4.2: a code outside 500-599 becomes 550
DEFAULT_REJECT_ENHANCED = "5.7.1"  # SPEC 4.2: unless the reason starts with its own
DEFAULT_REJECT_REASON = "Message rejected"
REASON_MAX = 300  # keeps the reply line under 512 octets [R5321 4.5.3.1.5]
_ENHANCED = re.compile(r"^5\.\d{1,3}\.\d{1,3}\s+")
_LINE_ENDS = re.compile(rb"\r?\n")


class Verdict(NamedTuple):
    """What the scanner decided; `reason` explains a reject or a tempfail."""

    action: str
    message: Optional[bytes] = None
    code: int = DEFAULT_REJECT_CODE
    enhanced: str = DEFAULT_REJECT_ENHANCED
    reason: str = ""


def signature(secret: str, body: bytes) -> str:
    """The X-Smtprelay-Signature value: `sha256=<hex HMAC-SHA256 of body>`."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def scan(url: str, payload: Dict[str, Any], secret: Optional[str], timeout: float,
         max_answer: int, context: Optional[ssl.SSLContext]) -> Verdict:
    """POST payload as JSON to url and return the scanner's verdict.

    `timeout` bounds the whole call (connect, send, every header and body
    byte), not each socket operation, so a scanner that trickles its answer
    cannot hold the client longer. An answer longer than `max_answer` bytes
    is a tempfail. `context` is the TLS context for an https:// URL (system
    trust store when None; pass one to avoid loading the store per call).
    Never raises.
    """
    body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    headers = {"Content-Type": "application/json", "X-Smtprelay-Id": str(payload.get("id", ""))}
    if secret:
        headers["X-Smtprelay-Signature"] = signature(secret, body)
    deadline = Deadline(timeout)
    handlers: List[urllib.request.BaseHandler] = [_NoRedirect()]
    if is_loopback(urllib.parse.urlsplit(url).hostname or ""):
        # A scanner on this machine is never reached through the http_proxy
        # an administrator set for the outside world.
        handlers.append(urllib.request.ProxyHandler({}))
    opener = deadline.opener(context, *handlers)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    deadline.start()
    try:
        with opener.open(request, timeout=timeout) as answer:
            data = answer.read(max_answer + 1)
    except urllib.error.HTTPError as exc:
        exc.close()
        return Verdict(TEMPFAIL, reason="HTTP %d" % exc.code)
    # Every failure of the scanner is a temporary failure (SPEC 4.2: a broken
    # scanner never makes the relay reject or drop mail), so this boundary
    # catches them all, including http.client's protocol errors.
    except Exception as exc:  # noqa: BLE001
        if deadline.fired:
            return Verdict(TEMPFAIL, reason="timed out after %gs" % timeout)
        return Verdict(TEMPFAIL, reason=_without_secret(_describe(exc), url))
    finally:
        deadline.expire()  # close anything urllib left open
    # A read cut short by the timer may look complete (a body delimited by
    # the connection close): never trust an answer that arrived too late.
    if deadline.fired:
        return Verdict(TEMPFAIL, reason="timed out after %gs" % timeout)
    if len(data) > max_answer:
        return Verdict(TEMPFAIL, reason="answer longer than %d bytes" % max_answer)
    return parse_answer(data)


def parse_answer(data: bytes) -> Verdict:
    """Turn a 2xx answer body into a Verdict; anything malformed is a tempfail."""
    if not data.strip():
        return Verdict(ACCEPT)
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return Verdict(TEMPFAIL, reason="answer is not JSON")
    if not isinstance(obj, dict):
        return Verdict(TEMPFAIL, reason="answer is not a JSON object")
    action = obj.get("action")
    if action in (ACCEPT, REPLACE):
        if obj.get("message") is None:
            if action == REPLACE:
                return Verdict(TEMPFAIL, reason="replace without a message")
            return Verdict(ACCEPT)
        message = _decode_message(obj["message"])
        if message is None:
            return Verdict(TEMPFAIL, reason="message is not base64 of a message")
        return Verdict(REPLACE, message=message)
    if action == REJECT:
        code = _reject_code(obj.get("code"))
        reason = obj.get("reason")
        reason = reason.strip()[:REASON_MAX] if isinstance(reason, str) and reason.strip() else DEFAULT_REJECT_REASON
        enhanced = DEFAULT_REJECT_ENHANCED
        match = _ENHANCED.match(reason)
        if match:  # the scanner wrote its own enhanced code: "5.7.1 Virus found"
            enhanced, reason = match.group(0).strip(), reason[match.end():] or DEFAULT_REJECT_REASON
        return Verdict(REJECT, code=code, enhanced=enhanced, reason=reason)
    if action == DISCARD:
        return Verdict(DISCARD)
    if action in (TEMPFAIL, DEFER):
        reason = obj.get("reason")
        return Verdict(TEMPFAIL, reason="scanner: %s" % reason if isinstance(reason, str) else "scanner")
    return Verdict(TEMPFAIL, reason="unknown action %s (valid: %s)" % (
        json.dumps(action)[:40], ", ".join(ACTIONS)))


def _reject_code(value) -> int:
    if isinstance(value, bool):
        return DEFAULT_REJECT_CODE
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and 500 <= value <= 599:
        return value
    return DEFAULT_REJECT_CODE


def _decode_message(value) -> Optional[bytes]:
    if not isinstance(value, str):
        return None
    try:
        message = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not message:
        return None
    # What is forwarded always has CRLF line ends (SPEC 3.3), whatever the scanner wrote.
    return _LINE_ENDS.sub(b"\r\n", message)


def _without_secret(text: str, url: str) -> str:
    """Error text of a URL with credentials may quote the password: mask it."""
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc.reason, str):
        exc = exc.reason
    text = str(exc) or type(exc).__name__
    return "%s: %s" % (type(exc).__name__, text)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer that is not 2xx: tempfail (SPEC 4.2)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None
