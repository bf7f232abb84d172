"""Command line: Go-style flags, -check, -version, -hash-password, and the
run loop with signal handling (SPEC 2.1, 6).

Owns the process boundary: ConfigError becomes one line and exit 2 here and
nowhere else.
"""

import getpass
import signal
import sys
import threading
from typing import Dict, List, Optional, Tuple

from . import __version__
from .config import OPTION_NAMES, ConfigError, describe, load, parse_bool
from .logs import fields, log, setup_logging

BCRYPT_MAX_BYTES = 72  # bcrypt reads no further; bcrypt 5 refuses longer passwords
ACTIONS = ("check", "version", "hash_password", "help", "h", "queue", "flush")
USAGE = """usage: smtprelay [-config FILE | FILE] [-check] [-version] [-hash-password]
                 [-test-remotes FILE] [-queue | -flush | -delete ID|ALL]
                 [-option value | --option=value ...]
Options are those of the config file (see smtprelay.ini); flags override the
environment (SMTPRELAY_<OPTION>), which overrides the file."""


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
        password = sys.stdin.readline().rstrip("\r\n")
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
    from .delivery import make_dispatcher

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


def _install_signal_handlers(stop: threading.Event) -> None:
    def handler(signum, frame):
        stop.set()

    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):  # SIGBREAK: Ctrl+Break on Windows
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)


def run(settings) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully (SPEC 6)."""
    from .server import Relay

    try:
        setup_logging(settings.logfile, settings.log_format, settings.log_level)
    except OSError as exc:
        raise ConfigError("logfile", "cannot open %s: %s" % (settings.logfile, exc.strerror or exc)) from None
    if not settings.remotes and not settings.command:
        log.warning("no remotes and no command configured: every message will be refused with 554")
    stop = threading.Event()
    _install_signal_handlers(stop)
    relay = Relay(settings)
    try:
        relay.start()
    except OSError as exc:
        log.error("cannot listen", extra=fields(error=exc.strerror or str(exc)))
        print("smtprelay: listen: %s" % (exc.strerror or exc), file=sys.stderr)
        relay.stop()
        return 1
    log.info("started", extra=fields(version=__version__))
    # A timed wait keeps the main thread responsive to signals on Windows.
    while not stop.wait(0.5):
        pass
    log.info("shutting down")
    relay.stop()
    log.info("stopped")
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
            print("smtprelay/%s" % __version__)
            return 0
        if "hash_password" in actions:
            return hash_password()
        settings = load(config_path, flags)
        if "test_remotes" in actions:
            return test_remotes(settings)
        if actions.keys() & {"queue", "flush", "delete"}:
            from . import spool
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
            from .server import make_server_context

            make_server_context(settings)  # a tls_profile this OpenSSL cannot do fails here too
            print("\n".join(describe(settings)))
            return 0
        return run(settings)
    except ConfigError as exc:
        print("smtprelay: %s" % exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
