"""Configuration: the option table, the Go smtprelay file format, and the
layering defaults < file < SMTPRELAY_* environment < flags (SPEC 2).

Owns every raw option string. Nothing outside this module parses one: it
hands out a frozen `Settings`. Parsers raise ValueError(reason); `load`
turns that into ConfigError(option, reason). No logging, no exit here.
"""

import ipaddress
import os
import re
import ssl
import urllib.parse
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from types import MappingProxyType
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, NamedTuple, Optional, Pattern, Tuple

from relay_lib.config import goregex, sources
from relay_lib.config.command_line import parse_command
from relay_lib.config.remote_limits import DEFAULT_CONNECTIONS, RemoteLimits, account_key, effective_limits
from relay_lib.config.remotes import Remote, parse_remote
from relay_lib.limits import Rate, parse_rate
from relay_lib.logs import FORMATS, LEVELS, mask_url
from relay_lib.netaddr import is_loopback

ENV_PREFIX = "SMTPRELAY_"
# SMTPRELAY_* variables that are no option: the config file, the ones the
# relay gives `command`, and the test suite's.
ENV_NOT_OPTIONS = (sources.CONFIG_VARIABLE, "SMTPRELAY_FROM", "SMTPRELAY_TO", "SMTPRELAY_PEER", "SMTPRELAY_ID")
ENV_TEST_PREFIX = "SMTPRELAY_TEST_"
TLS_PROFILES = ("default", "modern", "intermediate", "legacy")
LISTEN_SCHEMES = {"": "plain", "tls://": "tls", "starttls://": "starttls"}


OPTION_SHOWN, REASON_SHOWN = 100, 400  # characters of a config error; a 10 MB line must not become one


def _bounded(text: str, limit: int) -> str:
    """`text` printable (control characters escaped) and at most about `limit`
    characters: a longer one keeps its start and its end, which says why."""
    if not text.isprintable():
        text = ascii(text)[1:-1]
    if len(text) <= limit:
        return text
    return "%s...(%d characters)...%s" % (text[:limit // 2], len(text), text[-(limit // 2):])


class ConfigError(Exception):
    """A configuration mistake: which option, and why.

    Its text is one printable line of bounded length whatever bytes the file
    held: control characters are escaped, a long name or reason is cut short.
    """

    def __init__(self, option: str, reason: str):
        super().__init__("config: %s: %s" % (_bounded(option, OPTION_SHOWN), _bounded(reason, REASON_SHOWN)))
        self.option = option
        self.reason = reason


class Listener(NamedTuple):
    scheme: str  # plain, tls or starttls
    host: str    # without brackets; "" is every address
    port: int

    def __str__(self) -> str:
        host = "[%s]" % self.host if ":" in self.host else self.host
        prefix = "" if self.scheme == "plain" else self.scheme + "://"
        return "%s%s:%d" % (prefix, host, self.port)


# -- value parsers: text in, value out, ValueError(reason) on a mistake ------

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """A Go duration string (`500ms`, `60s`, `1h30m`) in seconds."""
    text = text.strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if not m:
            raise ValueError("%r is not a duration (examples: 500ms, 60s, 5m, 1h30m)" % text)
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not text:
        raise ValueError("empty duration (examples: 500ms, 60s, 5m, 1h30m)")
    return total


def _timeout(minimum: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        seconds = parse_duration(text)
        if seconds < minimum:
            raise ValueError("%s is too short (at least %gs)" % (text, minimum))
        return seconds
    return parse


_TRUE = ("1", "t", "true", "yes", "on")
_FALSE = ("0", "f", "false", "no", "off", "")


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("%r is not a boolean (use true or false)" % text)


def _positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError("%s must be longer than 0" % text)
    return seconds


def _integer(minimum: int, allow_unlimited: bool = False, zero: Optional[int] = None) -> Callable[[str], int]:
    """A whole number of at least `minimum`; with `zero`, 0 means that value
    (the Go program's server library reads 0 as its default)."""
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError("%r is not a whole number" % text) from None
        if allow_unlimited and value == -1:
            return value
        if zero is not None and value == 0:
            return zero
        if value < minimum:
            raise ValueError("%d is below the minimum %d%s" % (value, minimum, " (or -1 for unlimited)" if allow_unlimited else ""))
        return value
    return parse


def _unmap(net):
    """An IPv4-mapped IPv6 network (::ffff:a.b.c.d/n) as the IPv4 network it means."""
    if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped is not None:
        return ipaddress.ip_network("%s/%d" % (net.network_address.ipv4_mapped, net.prefixlen - 96))
    return net


def parse_nets(text: str) -> tuple:
    """Space- or comma-separated CIDRs; a bare address means just that host."""
    nets = []
    for item in text.replace(",", " ").split():
        try:
            nets.append(_unmap(ipaddress.ip_network(item, strict=True)))
        except ValueError:
            try:
                loose = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError("%s is not a network in CIDR form (like 10.0.0.0/8)" % item) from None
            raise ValueError("%s has host bits set (did you mean %s?)" % (item, loose)) from None
    return tuple(nets)


def parse_regex(text: str) -> Optional[Pattern]:
    """A Go (RE2) regex, compiled as the Python pattern with the same meaning."""
    if not text:
        return None
    return re.compile(goregex.translate(text)[0])


def parse_listen(text: str) -> Tuple[Listener, ...]:
    listeners = []
    for item in text.split():
        scheme = "plain"
        for prefix, name in LISTEN_SCHEMES.items():
            if prefix and item.lower().startswith(prefix):
                scheme, item = name, item[len(prefix):]
        if "://" in item:
            raise ValueError("unknown scheme in %r (use tls://, starttls:// or none)" % item)
        m = re.fullmatch(r"\[([0-9A-Fa-f:.%\w]+)\]:(\d+)|([^:\[\]]*):(\d+)", item)
        if not m:
            raise ValueError("%r is not host:port (IPv6 as [::1]:25)" % item)
        host = m.group(1) if m.group(1) is not None else m.group(3)
        port = int(m.group(2) or m.group(4))
        if port > 65535:
            raise ValueError("port %d in %r is out of range" % (port, item))
        listeners.append(Listener(scheme, host, port))
    if not listeners:
        raise ValueError("no listen address given")
    return tuple(listeners)


def parse_metrics_listen(text: str) -> Optional[Listener]:
    """One plain host:port for /metrics and /healthz, or None when empty."""
    if not text:
        return None
    listeners = parse_listen(text)
    if len(listeners) != 1 or listeners[0].scheme != "plain":
        raise ValueError("%r is not one host:port without a scheme (like 127.0.0.1:9101)" % text)
    return listeners[0]


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        low = text.strip().lower()
        if low not in allowed:
            raise ValueError("%r is not one of %s" % (text, ", ".join(allowed)))
        return low
    return parse


def _text(text: str) -> str:
    return text


DEFAULT_SCOPE = "https://outlook.office365.com/.default"  # Exchange Online, app-only (SPEC 10)


def check_token_url(url: str) -> str:
    """The oauth_token_url value: https, or http only to a loopback host (SPEC 10).

    Raises:
        ValueError: any other URL.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        host, parts = "", None
    if parts is None or not host or parts.scheme not in ("http", "https"):
        raise ValueError("%s is not an http(s) URL" % mask_url(url))
    if parts.scheme == "http" and not is_loopback(host):
        raise ValueError("%s: use https (http only to this machine, for tests)" % mask_url(url))
    return url


def parse_token_url(text: str) -> Optional[str]:
    return check_token_url(text) if text else None


def _optional(text: str) -> Optional[str]:
    return text or None


def parse_optional_rate(text: str) -> Optional[Rate]:
    """N/UNIT (SPEC 13), or None (no limit) when empty."""
    return parse_rate(text) if text else None


def parse_webhook_url(text: str) -> Optional[str]:
    if text and not re.match(r"https?://[^/\s]", text, re.IGNORECASE):
        raise ValueError("%s is not an http:// or https:// URL" % mask_url(text))
    return text or None


class Option(NamedTuple):
    """One row of the option table: it drives file, env, flags and -check."""

    name: str
    default: str
    parse: Callable[[str], Any]
    help: str
    path: bool = False     # relative to the config file's folder
    secret: bool = False   # masked in -check output


OPTIONS: Tuple[Option, ...] = (
    Option("logfile", "", _optional, "log file; empty logs to stderr (rotated at 10 MB, 3 kept)", path=True),
    Option("log_format", "default", _choice(*FORMATS), "default, plain, pretty or json"),
    Option("log_level", "info", _choice(*LEVELS), "panic, fatal, error, warn (warning), info, debug, trace or disabled"),
    Option("hostname", "localhost.localdomain", _text, "name in the greeting, EHLO reply and Received header"),
    Option("welcome_msg", "", _text, "greeting text; empty means '<hostname> ESMTP ready.'"),
    Option("listen", "127.0.0.1:25 [::1]:25", parse_listen, "addresses to listen on; tls:// or starttls:// prefixes"),
    Option("local_cert", "", _optional, "PEM certificate chain for tls:// and starttls:// listeners", path=True),
    Option("local_key", "", _optional, "PEM private key for local_cert", path=True),
    Option("tls_profile", "default", _choice(*TLS_PROFILES), "default, modern, intermediate or legacy"),
    Option("local_forcetls", "false", parse_bool, "refuse MAIL and AUTH before STARTTLS"),
    Option("read_timeout", "60s", _timeout(1.0), "deadline for reading each command line"),
    Option("write_timeout", "60s", _timeout(1.0), "limit for each reply write"),
    Option("data_timeout", "5m", _timeout(1.0), "limit for receiving one whole message"),
    Option("max_connections", "100", _integer(1, allow_unlimited=True, zero=100),
           "concurrent sessions; -1 is unlimited, 0 the default"),
    Option("max_message_size", "10240000", _integer(1, zero=10240000), "largest message in bytes; 0 is the default"),
    Option("max_recipients", "100", _integer(1, zero=100), "most RCPT per message; 0 is the default"),
    Option("allowed_nets", "127.0.0.0/8 ::1/128", parse_nets, "networks allowed to connect; empty is any"),
    Option("proxy_nets", "", parse_nets, "load balancers whose connections start with a PROXY protocol header"),
    Option("allowed_sender", "", parse_regex, "regex a MAIL FROM address must match"),
    Option("allowed_recipients", "", parse_regex, "regex each RCPT TO address must match"),
    Option("allowed_users", "", _optional, "users file; when set, AUTH is required", path=True),
    Option("auth_cache_ttl", "1h", parse_duration, "how long a checked AUTH password is remembered; 0 is off"),
    Option("aliases_file", "", _optional, "aliases file: 'alias target' per line", path=True),
    Option("remotes", "", _text, "space-separated remote URLs"),
    Option("strict_sender", "false", parse_bool, "use only remotes whose /sender is the envelope sender"),
    Option("remote_certificate", "", _optional, "client certificate for TLS to remotes", path=True),
    Option("remote_key", "", _optional, "private key for remote_certificate", path=True),
    Option("remote_timeout", "60s", _timeout(0.001), "connect and per-command timeout towards remotes"),
    Option("failover_skip", "30s", _timeout(0.001), "skip a failover member this long after it failed to connect"),
    Option("remote_pool_size", "20", _integer(0), "idle connections kept per remote; 0 disables reuse"),
    Option("remote_pool_idle", "30s", _timeout(0.001), "close a pooled remote connection idle this long"),
    Option("remote_connections", str(DEFAULT_CONNECTIONS), _integer(1),
           "most connections open to each remote account at once, idle ones included"),
    Option("remote_rate", "", parse_optional_rate,
           "messages to each remote account: N at once, then N per UNIT (s, m, h, d), like 30/m; empty is none"),
    Option("remote_recipients", "", parse_optional_rate,
           "recipients to each remote account, N/UNIT like 10000/d; empty is none"),
    Option("remote_wait", "30s", parse_duration, "how long a message may wait for room at its remote"),
    Option("remote_quota_pause", "1h", _positive_duration,
           "how long a remote that said its sending quota is spent gets nothing"),
    Option("command", "", parse_command, "program that receives each message on stdin"),
    Option("webhook_url", "", parse_webhook_url, "scanning webhook URL"),
    Option("webhook_timeout", "30s", _timeout(0.001), "total time for one webhook call"),
    Option("webhook_secret", "", _optional, "HMAC-SHA256 key for the webhook signature header", secret=True),
    Option("metrics_listen", "", parse_metrics_listen, "host:port serving GET /metrics and /healthz; empty is off"),
    Option("oauth_token_url", "", parse_token_url, "OAuth 2.0 token endpoint for auth=xoauth2 remotes"),
    Option("oauth_client_id", "", _optional, "OAuth application (client) id"),
    Option("oauth_client_secret", "", _optional, "OAuth client secret", secret=True),
    Option("oauth_scope", DEFAULT_SCOPE, _text, "scope of the client credentials grant"),
    Option("oauth_refresh_token", "", _optional, "refresh token; when set, the refresh_token grant is used",
           secret=True),
    Option("spool_dir", "", _optional, "folder of the queue; empty turns the spool off", path=True),
    Option("spool_mode", "fallback", _choice("fallback", "always"), "fallback: queue what failed temporarily; always: queue every message"),
    Option("queue_retry_min", "1m", _timeout(0.001), "first retry delay; doubles each attempt"),
    Option("queue_retry_max", "1h", _timeout(0.001), "longest delay between attempts"),
    Option("queue_lifetime", "120h", _timeout(0.001), "after this age a queued message is bounced and moved to failed/"),
    Option("spool_max_size", "1073741824", _integer(0), "bytes the queue may hold"),
    Option("bounce", "true", parse_bool, "send a delivery status notification when a queued message fails for good"),
    Option("client_max_connections", "0", _integer(0),
           "sessions one client address may hold at once; 0 is no limit"),
    Option("client_message_rate", "", parse_optional_rate,
           "messages one client may send: N at once, then N per UNIT (s, m, h, d), like 10/m; empty is none"),
    Option("client_recipient_rate", "", parse_optional_rate,
           "recipients one client may send to, N/UNIT like 500/h; empty is none"),
    Option("client_limits_exempt", "", parse_nets, "networks (CIDR) that no client limit applies to"),
)
OPTION_NAMES = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """The effective, validated configuration. Immutable; passed as an argument.

    `given` names the options that the file, the environment or a flag set
    to a value that is not empty, as opposed to those left at their default.
    The limits of a remote (SPEC 13), its own or its account's, come from
    `remote_limits(remote)`; the ini options remote_connections, remote_rate
    and remote_recipients are only what those limits start from.
    """

    logfile: Optional[str]
    log_format: str
    log_level: str
    hostname: str
    welcome_msg: str
    listen: Tuple[Listener, ...]
    local_cert: Optional[str]
    local_key: Optional[str]
    tls_profile: str
    local_forcetls: bool
    read_timeout: float
    write_timeout: float
    data_timeout: float
    max_connections: int
    max_message_size: int
    max_recipients: int
    allowed_nets: tuple
    proxy_nets: tuple
    allowed_sender: Optional[Pattern]
    allowed_recipients: Optional[Pattern]
    allowed_users: Optional[str]
    auth_cache_ttl: float
    aliases_file: Optional[str]
    remotes: Tuple[Remote, ...]
    strict_sender: bool
    remote_certificate: Optional[str]
    remote_key: Optional[str]
    remote_timeout: float
    failover_skip: float
    remote_pool_size: int
    remote_pool_idle: float
    remote_connections: int
    remote_rate: Optional[Rate]
    remote_recipients: Optional[Rate]
    remote_wait: float
    remote_quota_pause: float
    command: Tuple[str, ...]
    webhook_url: Optional[str]
    webhook_timeout: float
    webhook_secret: Optional[str] = field(repr=False)
    metrics_listen: Optional[Listener]
    oauth_token_url: Optional[str]
    oauth_client_id: Optional[str]
    oauth_client_secret: Optional[str] = field(repr=False)
    oauth_scope: str
    oauth_refresh_token: Optional[str] = field(repr=False)
    spool_dir: Optional[str]
    spool_mode: str
    queue_retry_min: float
    queue_retry_max: float
    queue_lifetime: float
    spool_max_size: int
    bounce: bool
    client_max_connections: int
    client_message_rate: Optional[Rate]
    client_recipient_rate: Optional[Rate]
    client_limits_exempt: tuple
    config_path: Optional[str] = None
    base_dir: str = "."
    raw: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    warnings: Tuple[str, ...] = ()  # logged once at start-up and printed by -check
    given: FrozenSet[str] = frozenset()
    _limits: Mapping[Tuple[str, str, int, str], RemoteLimits] = field(default_factory=dict, repr=False,
                                                                      compare=False)

    def remote_limits(self, remote: Remote) -> Optional[RemoteLimits]:
        """The limits in effect for `remote`, shared with every remote of its
        account (`RemoteLimits.account`), computed once at load; None for a
        file: remote, which has none.

        Raises:
            KeyError: a remote whose account is none of this configuration's.
        """
        if remote.scheme == "file":
            return None
        return self._limits[account_key(remote)]


# -- the Go smtprelay file format (SPEC 2.2) ----------------------------------

def read_file(path: str) -> Dict[str, Tuple[str, int]]:
    """Parse an ini file into {option: (value, line number)}.

    Raises:
        ConfigError: unreadable file or unknown key.
    """
    try:
        with open(path, encoding="utf-8-sig", newline=None) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("config", "cannot read %s: %s" % (path, getattr(exc, "strerror", None) or exc)) from None
    values = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;" or (line.startswith("[") and line.endswith("]")):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        value = _strip_value(value) if sep else "true"
        if key not in OPTION_NAMES:
            raise ConfigError(key, "unknown option (%s line %d)" % (os.path.basename(path), number))
        values[key] = (value, number)
    return values


def _strip_value(value: str) -> str:
    """The value as the Go program reads it: trimmed, one pair of quotes
    removed, cut at the first ` #` (a ` ;` is part of the value there)."""
    value = value.strip()
    if value.startswith('"'):
        # The closing quote is the first one followed by nothing or a comment.
        end = value.find('"', 1)
        while end > 0:
            rest = value[end + 1:]
            if not rest.strip() or (rest[:1].isspace() and rest.lstrip()[:1] == "#"):
                return value[1:end]
            end = value.find('"', end + 1)
    cut = value.find(" #")
    if cut >= 0:
        value = value[:cut]
    return value.strip()


# -- layering and validation ----------------------------------------------

def read_dotenv(path: str) -> Dict[str, Tuple[str, int]]:
    """Parse a .env file (sources.read_dotenv) into {option: (value, line number)}.

    Raises:
        ConfigError: unreadable file, a malformed line or an unknown key.
    """
    try:
        values = sources.read_dotenv(path, ENV_PREFIX)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("config", "cannot read %s: %s" % (path, getattr(exc, "strerror", None) or exc)) from None
    except ValueError as exc:
        raise ConfigError("config", "%s: %s" % (path, exc)) from None
    for key, (_, number) in values.items():
        if key == "config":
            raise ConfigError("config", "%s line %d names a config file, which the Go program ignores "
                              "there; use -config FILE instead" % (sources.DOTENV, number))
        if key not in OPTION_NAMES:
            raise ConfigError(key, "unknown option (%s line %d)" % (sources.DOTENV, number))
    return values


def load(config_path: Optional[str] = None, flags: Optional[Mapping[str, str]] = None,
         environ: Optional[Mapping[str, str]] = None, dotenv: bool = False) -> Settings:
    """Build Settings from defaults < file < environment < flags. The file is
    in the ini format, or the .env format with `dotenv`. An environment
    variable that is set but empty is ignored, as in the Go program.

    Raises:
        ConfigError: the first mistake found, naming its option.
    """
    environ = os.environ if environ is None else environ
    raw = {o.name: o.default for o in OPTIONS}
    given = set()
    base_dir = os.getcwd()
    warnings: List[str] = []
    if config_path:
        config_path = os.path.abspath(config_path)
        base_dir = os.path.dirname(config_path)
        for key, (value, _) in (read_dotenv if dotenv else read_file)(config_path).items():
            raw[key] = value
            given.add(key)
    for option in OPTIONS:
        env_value = environ.get(ENV_PREFIX + option.name.upper())
        if env_value:
            raw[option.name] = env_value
            given.add(option.name)
    known = set(ENV_NOT_OPTIONS) | {ENV_PREFIX + o.name.upper() for o in OPTIONS}
    unknown = sorted(name for name in environ if name.upper().startswith(ENV_PREFIX) and name not in known
                     and not name.upper().startswith(ENV_TEST_PREFIX))
    if unknown:
        warnings.append("environment variable %s is no option and is ignored (SMTPRELAY_<OPTION>, "
                        "see smtprelay.ini)" % ", ".join(unknown))
    for key, value in (flags or {}).items():
        if key not in OPTION_NAMES:
            raise ConfigError(key, "unknown option")
        raw[key] = value
        given.add(key)
    if not raw["hostname"].strip():
        raw["hostname"] = OPTION_NAMES["hostname"].default  # empty means the default, as in the Go program
    values: Dict[str, Any] = {}
    for option in OPTIONS:
        text = raw[option.name].strip()
        try:
            value = option.parse(text)
        except ValueError as exc:
            raise ConfigError(option.name, str(exc)) from None
        if option.path and value:
            try:
                value = resolve_path(value, base_dir)
            except ValueError as exc:
                raise ConfigError(option.name, str(exc)) from None
        values[option.name] = value
    values["remotes"] = _parse_remotes(raw["remotes"], base_dir)
    if not values["welcome_msg"]:
        values["welcome_msg"] = "%s ESMTP ready." % values["hostname"]
    chosen = frozenset(name for name in given if raw[name].strip())
    # An option left at its default is no choice: the known provider rule
    # comes before it (SPEC 13), so only options given are passed on.
    ini_limits = {limit: values[option] for limit, option in _LIMIT_OPTIONS if option in chosen}
    settings = Settings(config_path=config_path, base_dir=base_dir, raw=MappingProxyType(dict(raw)),
                        given=chosen, _limits=MappingProxyType(effective_limits(values["remotes"], ini_limits)),
                        **values)
    _validate(settings)
    return replace(settings, warnings=tuple(warnings + _meaningless(settings)))


_LIMIT_OPTIONS = (("connections", "remote_connections"), ("rate", "remote_rate"),
                  ("recipients", "remote_recipients"))


def _meaningless(s: Settings) -> List[str]:
    """Warnings for values that are accepted but have no effect (SPEC 2.3)."""
    found = []
    if not s.remotes and not s.command:
        found.append("no remotes and no command configured: every message will be refused with 554")
    schemes = {listener.scheme for listener in s.listen}
    if s.local_forcetls and "starttls" not in schemes:
        found.append("local_forcetls has no effect: no starttls:// listener")
    if schemes == {"plain"}:
        if s.local_cert:
            found.append("local_cert and local_key are not used: no tls:// or starttls:// listener")
        if s.raw.get("tls_profile", "default").strip().lower() != "default":
            found.append("tls_profile has no effect: no tls:// or starttls:// listener")
    return found


def resolve_path(path: str, base_dir: str) -> str:
    """A path from the config, relative to the config file's folder (SPEC 2.2).

    Raises:
        ValueError: a Windows path like D:relay.log, relative to a drive's
            current folder, which a service cannot predict.
    """
    drive, rest = os.path.splitdrive(path)
    if drive.endswith(":") and not rest.startswith(("\\", "/")):
        raise ValueError("%s is relative to the current folder of drive %s; write %s\\%s"
                         % (path, drive, drive, rest))
    return os.path.normpath(os.path.join(base_dir, path))


def from_file(path: str) -> Settings:
    """Load a file alone, ignoring the environment (the tests' relays use it)."""
    return load(path, environ={})


def _parse_remotes(text: str, base_dir: str) -> Tuple[Remote, ...]:
    remotes = []
    for url in text.split():
        try:
            remote = parse_remote(url)
            if remote.path:
                remote = replace(remote, path=resolve_path(remote.path, base_dir))
            remotes.append(remote)
        except ValueError as exc:
            raise ConfigError("remotes", str(exc)) from None
    return tuple(remotes)


def _validate(s: Settings) -> None:
    """Rules that involve more than one option or the file system."""
    tls_listeners = [listener for listener in s.listen if listener.scheme != "plain"]
    if bool(s.local_cert) != bool(s.local_key):
        raise ConfigError("local_cert" if s.local_key else "local_key",
                          "local_cert and local_key go together; set both or neither")
    if tls_listeners and not s.local_cert:
        raise ConfigError("listen", "%s needs local_cert and local_key" % (tls_listeners[0],))
    if s.local_cert:
        _check_cert_pair("local_cert", s.local_cert, "local_key", s.local_key)
    if bool(s.remote_certificate) != bool(s.remote_key):
        raise ConfigError("remote_certificate" if s.remote_key else "remote_key",
                          "remote_certificate and remote_key go together; set both or neither")
    if s.remote_certificate:
        _check_cert_pair("remote_certificate", s.remote_certificate, "remote_key", s.remote_key)
    if s.allowed_users:
        plain = [listener for listener in s.listen if listener.scheme == "plain"]
        if plain:
            raise ConfigError("allowed_users", "AUTH needs TLS, but listener %s is plain "
                              "(use starttls:// or tls://)" % (plain[0],))
    if s.logfile and not os.path.isdir(os.path.dirname(s.logfile)):
        raise ConfigError("logfile", "folder %s does not exist" % os.path.dirname(s.logfile))
    for name in ("allowed_users", "aliases_file"):
        path = getattr(s, name)
        if path and not os.path.isfile(path):
            raise ConfigError(name, "cannot read %s: no such file" % path)
    if s.queue_retry_max < s.queue_retry_min:
        raise ConfigError("queue_retry_max", "shorter than queue_retry_min")
    if s.strict_sender and not any(r.sender for r in s.remotes):
        raise ConfigError("strict_sender", "no remote has a /sender, so no message could be sent")
    if any(r.auth == "xoauth2" for r in s.remotes):
        for name in ("oauth_token_url", "oauth_client_id"):
            if not getattr(s, name):
                raise ConfigError(name, "a remote uses auth=xoauth2, which needs this option")
        if not s.oauth_refresh_token and not s.oauth_client_secret:
            raise ConfigError("oauth_client_secret", "the client credentials grant needs it "
                              "(or set oauth_refresh_token for the refresh token grant)")


def _check_cert_pair(cert_option: str, cert: str, key_option: str, key: str) -> None:
    """Both files readable, the certificate one, the key its own (SPEC 2.3)."""
    for option, path in ((cert_option, cert), (key_option, key)):
        if not os.path.isfile(path):
            raise ConfigError(option, "cannot read %s: no such file" % path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=cert)
    except (ssl.SSLError, OSError):
        raise ConfigError(cert_option, "%s is not a certificate: %s holds no PEM certificate "
                          "(-----BEGIN CERTIFICATE-----)" % (cert_option, cert)) from None
    try:
        # An empty passphrase: an encrypted key fails instead of prompting on the terminal.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            raise ConfigError(key_option, "%s does not belong to %s: %s is the key of another "
                              "certificate than %s" % (key_option, cert_option, key, cert)) from None
        raise ConfigError(key_option, "%s is not a private key: %s holds no unencrypted PEM private key"
                          % (key_option, key)) from None


TRANSLATION_SHOWN = 200  # characters of a regex translation -check prints (\pL is thousands)


def _shown(pattern: str) -> str:
    if len(pattern) <= TRANSLATION_SHOWN:
        return pattern
    return "%s... (%d characters)" % (pattern[:TRANSLATION_SHOWN], len(pattern))


def describe(settings: Settings) -> List[str]:
    """`option = value` lines of the effective settings, secrets masked (-check):
    each remote on a line of its own with all its parameters and the limits
    in effect with their source (SPEC 13), and the Python form of a regex
    that had to be translated."""
    lines = []
    for option in OPTIONS:
        value = settings.raw.get(option.name, option.default)
        if option.secret and value:
            value = "***"
        elif option.name == "remotes":
            value = " ".join(r.masked() for r in settings.remotes)
        elif option.name in ("webhook_url", "oauth_token_url"):
            value = mask_url(value)
        elif option.name in ("welcome_msg", "hostname", "max_connections", "max_message_size", "max_recipients"):
            value = getattr(settings, option.name)
        elif option.path and getattr(settings, option.name):
            value = getattr(settings, option.name)
        elif option.parse is parse_regex and value.strip():
            pattern, translated = goregex.translate(value.strip())
            if translated:
                value = "%s   (as Python: %s)" % (value.strip(), _shown(pattern))
        lines.append("%s = %s" % (option.name, value))
        if option.name == "remotes":
            for number, remote in enumerate(settings.remotes, 1):
                params = " ".join("%s=%s" % (name, _shown(text)) for name, text in remote.parameters())
                line = ("  remote %d: %s %s" % (number, remote.masked(), params)).rstrip()
                limits = settings.remote_limits(remote)
                if limits is not None:
                    line += " limits: " + limits.describe()
                    shared = [str(n) for n, other in enumerate(settings.remotes, 1)
                              if n != number and other.scheme != "file" and account_key(other) == limits.account]
                    if shared:
                        line += " (account shared with remote %s)" % ", ".join(shared)
                lines.append(line)
    return lines


def _check_table() -> None:
    names = [f.name for f in dataclass_fields(Settings)][:len(OPTIONS)]
    assert names == [o.name for o in OPTIONS], "Settings fields and OPTIONS disagree"


_check_table()
