"""Command line: Go-style flags, -check, -version, -hash-password,
-test-remotes, the queue commands (-queue, -flush, -delete), and the run loop
with signal handling (SPEC 2.1, 6, 9, 10).

Owns the process boundary: ConfigError becomes one line and exit 2 here and
nowhere else; a listen failure one line and exit 1.
"""

import errno
import getpass
import os
import signal
import sys
import threading
from typing import Dict, List, Optional, Tuple

from relay_lib import __version__
from relay_lib.config import sources
from relay_lib.config.settings import OPTION_NAMES, ConfigError, describe, load, parse_bool
from relay_lib.inbound import policy
from relay_lib.logs import fields, log, setup_logging
from relay_lib.ops import build

BCRYPT_MAX_BYTES = 72  # bcrypt reads no further; bcrypt 5 refuses longer passwords
ACTIONS = ("check", "version", "hash_password", "help", "h", "queue", "flush")
USAGE = """usage: smtprelay [-config FILE | FILE] [-check] [-version] [-hash-password]
                 [-test-remotes FILE] [-queue | -flush | -delete ID|ALL]
                 [-option value | --option=value ...]
Options are those of the config file (see smtprelay.ini); flags override the
environment (SMTPRELAY_<OPTION>), which overrides the file."""
NO_CONFIG = """smtprelay: no config file: name one (smtprelay FILE or -config FILE), set
SMTPRELAY_CONFIG, or put smtprelay.ini beside the program (%s)."""
# What to do about a listen address that cannot be bound (SPEC 6). Windows
# reports the WSAE* codes, which errno also names there.
_LISTEN_HINTS = (
    (("EACCES", "WSAEACCES"), "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE, "
                              "or use a port above 1023)"),
    (("EADDRINUSE", "WSAEADDRINUSE"), "already in use (another program listens there)"),
    (("EADDRNOTAVAIL", "WSAEADDRNOTAVAIL"), "cannot assign (no interface has this address)"),
)


def parse_args(argv: List[str]) -> Tuple[Optional[str], Dict[str, str], Dict[str, str]]:
    """Split argv into (config path, option flags, actions with their argument).

    Raises:
        ConfigError: unknown flag or a flag without its value.
    """
    config_path: Optional[str] = None
    flags: Dict[str, str] = {}
    actions: Dict[str, str] = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("-") or arg == "-":
            if config_path is not None:
                raise ConfigError("config", "more than one config file given (%s, %s)" % (config_path, arg))
            config_path = arg
            continue
        name, has_value, value = arg.lstrip("-").partition("=")
        key = name.replace("-", "_")
        if key in ACTIONS:
            try:
                wanted = parse_bool(value) if has_value else True  # -check=false, as Go's flag package
            except ValueError as exc:
                raise ConfigError(name, str(exc)) from None
            if wanted:
                actions[key] = ""
        elif key == "delete":
            if not has_value:
                if not args:
                    raise ConfigError("delete", "flag needs a message id or ALL")
                value = args.pop(0)
            actions[key] = value
        elif key in ("config", "test_remotes"):
            if not has_value:
                if not args:
                    raise ConfigError(name, "flag needs a file name")
                value = args.pop(0)
            config_path = value
            if key == "test_remotes":
                actions[key] = ""
        elif key in OPTION_NAMES:
            if not has_value:
                if OPTION_NAMES[key].parse is parse_bool:
                    value = "true"  # a bare boolean flag means true, as in Go
                elif args:
                    value = args.pop(0)
                else:
                    raise ConfigError(key, "flag needs a value")
            flags[key] = value
        else:
            raise ConfigError(name, "unknown flag (see -help)")
    return config_path, flags, actions


def hash_password() -> int:
    """Print a bcrypt hash of a password read from stdin or asked for."""
    import bcrypt

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if password != getpass.getpass("Again: "):
            print("smtprelay: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline()
        for ending in ("\r\n", "\n", "\r"):  # one line end: the one echo or a here-string adds
            if password.endswith(ending):
                password = password[:-len(ending)]
                break
    if password != password.strip():
        print("smtprelay: warning: the password begins or ends with white space, which is part of it",
              file=sys.stderr)
    if not password:
        print("smtprelay: empty password", file=sys.stderr)
        return 1
    if len(password.encode("utf-8")) > BCRYPT_MAX_BYTES:
        print("smtprelay: password longer than %d bytes, bcrypt's limit" % BCRYPT_MAX_BYTES, file=sys.stderr)
        return 1
    print(bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt()).decode("ascii"))
    return 0


def test_remotes(settings) -> int:
    """-test-remotes: check every remote without sending mail, one line each (SPEC 10)."""
    from relay_lib.delivery.steps import make_dispatcher

    if not settings.remotes:
        print("no remotes configured")
        return 1
    dispatcher = make_dispatcher(settings)
    failed = 0
    try:
        for remote in settings.remotes:
            ok, detail = dispatcher.probe(remote)
            token = dispatcher.tokens.current if remote.auth == "xoauth2" else None
            if token is not None:
                detail += " (%s)" % token.describe()
            if ok:
                print("ok   %s: %s" % (remote.masked(), detail))
            else:
                failed += 1
                print("FAIL %s: %s" % (remote.masked(), detail))
    finally:
        dispatcher.close()
    return 1 if failed else 0


def _install_signal_handlers(stop: threading.Event, received: List[str]) -> None:
    def handler(signum, frame):
        received.append(signal.Signals(signum).name)
        stop.set()

    def hangup(signum, frame):
        log.info("SIGHUP ignored (the users and aliases files reload by themselves)")

    # SIGBREAK: Ctrl+Break on Windows; SIGQUIT stops gracefully as in the Go program.
    for name in ("SIGINT", "SIGTERM", "SIGQUIT", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)
    if hasattr(signal, "SIGHUP"):  # closing the terminal must not stop the relay
        signal.signal(signal.SIGHUP, hangup)


def listen_failure(exc: OSError) -> str:
    """The one line for a listen address that cannot be bound (SPEC 6)."""
    reason = exc.strerror or str(exc)
    for names, hint in _LISTEN_HINTS:
        if exc.errno in [getattr(errno, n) for n in names if hasattr(errno, n)]:
            reason = hint
    return "smtprelay: listen: %s: %s" % (getattr(exc, "address", "?"), reason)


def _log_warnings(settings) -> None:
    """The configuration's warnings, once, at start-up and in -check."""
    for text in settings.warnings:
        log.warning("%s", text)


def run(settings) -> int:
    """Serve until SIGTERM, SIGINT or SIGQUIT, then shut down gracefully (SPEC 6)."""
    from relay_lib.listen import ListenError
    from relay_lib.service import Service

    try:
        setup_logging(settings.logfile, settings.log_format, settings.log_level)
    except OSError as exc:
        raise ConfigError("logfile", "cannot open %s: %s" % (settings.logfile, exc.strerror or exc)) from None
    _log_warnings(settings)
    stop = threading.Event()
    received: List[str] = []
    _install_signal_handlers(stop, received)
    relay = Service(settings)
    try:
        relay.start()
    except ListenError as exc:
        line = listen_failure(exc)
        if settings.logfile:  # on stderr the line below says it once
            log.error("cannot listen", extra=fields(error=line))
        print(line, file=sys.stderr)
        relay.stop()
        return 1
    log.info("started", extra=fields(version=__version__, commit=build.commit()[:12]))
    # A timed wait keeps the main thread responsive to signals on Windows.
    while not stop.wait(0.5):
        pass
    log.info("shutting down", extra=fields(signal=received[0] if received else "?"))
    relay.stop()
    log.info("stopped")
    return 0


def check(settings) -> int:
    """-check: the effective settings on stdout, the warnings a start would log
    on stderr, then `configuration OK` (SPEC 6)."""
    from relay_lib.inbound.server import make_server_context

    make_server_context(settings)  # a tls_profile this OpenSSL cannot do fails here too
    setup_logging(None, settings.log_format, "warn")
    _log_warnings(settings)
    # The tables log each malformed line as they load, as the relay's do at start.
    if settings.allowed_users:
        policy.Users(settings.allowed_users, settings.auth_cache_ttl, settings.read_timeout)
    if settings.aliases_file:
        policy.Aliases(settings.aliases_file)
    print("\n".join(describe(settings)))
    print("configuration OK")
    return 0


def main(argv: List[str]) -> int:
    # A Windows console or redirected stdout may not encode every character.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        config_path, flags, actions = parse_args(argv)
        if "help" in actions or "h" in actions:
            print(USAGE)
            return 0
        if "version" in actions:
            print(build.version_line())
            return 0
        if "hash_password" in actions:
            return hash_password()
        source = sources.find(config_path, os.environ)
        if source is None:
            print(NO_CONFIG % sources.program_dir(), file=sys.stderr)
            print(USAGE, file=sys.stderr)
            return 2
        settings = load(source.path, flags, dotenv=source.dotenv)
        if "test_remotes" in actions:
            return test_remotes(settings)
        if actions.keys() & {"queue", "flush", "delete"}:
            from relay_lib.spool import queue as spool
        if "queue" in actions:
            print("\n".join(spool.list_queue(settings)))
            return 0
        if "flush" in actions:
            print(spool.request_flush(settings))
            return 0
        if "delete" in actions:
            status, text = spool.delete(settings, actions["delete"])
            print(text, file=sys.stderr if status else sys.stdout)
            return status
        if "check" in actions:
            return check(settings)
        return run(settings)
    except ConfigError as exc:
        print("smtprelay: %s" % exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
