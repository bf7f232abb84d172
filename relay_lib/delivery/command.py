"""The command step (SPEC 4.3): the message on the program's stdin.

Owns how the program is run (no shell, data_timeout, the envelope in
SMTPRELAY_* variables) and what its exit status means. Must not decide what
happens to the message next.
"""

import os
import subprocess

from relay_lib import replies
from relay_lib.config.settings import Settings
from relay_lib.envelope import Envelope
from relay_lib.logs import fields, log
from relay_lib.replies import Reply

EX_TEMPFAIL = 75  # sysexits.h: the command asks the client to retry (SPEC 4.3)


def run_command(settings: Settings, env: Envelope, message: bytes) -> Reply:
    """Run the command on one message: OK, or the reply its failure stands for."""
    if not settings.command:
        # A queued message still owes the step, but the configuration no
        # longer has it: as for a remote that is gone, try again later.
        log.error("command is no longer configured", extra=fields(id=env.id))
        return replies.COMMAND_TEMPFAIL
    environ = dict(os.environ, SMTPRELAY_FROM=env.mail_from, SMTPRELAY_TO=" ".join(env.rcpts),
                   SMTPRELAY_PEER=env.peer, SMTPRELAY_ID=env.id)
    try:
        done = subprocess.run(list(settings.command), input=message, env=environ,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=settings.data_timeout, check=False)
    except subprocess.TimeoutExpired:
        log.warning("command timed out", extra=fields(id=env.id, seconds=settings.data_timeout))
        return replies.COMMAND_TEMPFAIL
    except OSError as exc:
        # A missing or unrunnable program is the operator's to fix: retry later.
        log.error("command cannot run", extra=fields(id=env.id, command=settings.command[0],
                                                      error=str(exc)))
        return replies.COMMAND_TEMPFAIL
    if done.returncode == 0:
        return replies.OK
    stderr = " ".join(done.stderr.decode("utf-8", "replace").split())[-300:]
    log.warning("command failed", extra=fields(id=env.id, status=done.returncode, stderr=stderr))
    return replies.COMMAND_TEMPFAIL if done.returncode == EX_TEMPFAIL else replies.COMMAND_FAILED
