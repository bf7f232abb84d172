"""Helpers for the drop-in tests: the relay started as an existing Go
smtprelay setup starts it (no arguments, SMTPRELAY_CONFIG, a .env file, an
ini beside the program), and the program copied into a folder of its own.
"""

import os
import shutil
import subprocess

from conftest import ROOT, relay_command


def copy_program(folder):
    """The relay copied into `folder` (relay.py and relay_lib, or the frozen
    binary); returns the command that runs the copy."""
    os.makedirs(folder, exist_ok=True)
    command = relay_command()
    if len(command) == 1:  # the frozen binary
        binary = os.path.join(folder, os.path.basename(command[0]))
        shutil.copy2(command[0], binary)
        return [binary]
    shutil.copy2(os.path.join(ROOT, "relay.py"), folder)
    shutil.copytree(os.path.join(ROOT, "relay_lib"), os.path.join(folder, "relay_lib"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    return [command[0], os.path.join(folder, "relay.py")]


def environment(**extra):
    """os.environ without SMTPRELAY_CONFIG (a developer's shell may set it), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "SMTPRELAY_CONFIG"}
    env.update(extra)
    return env


def run(argv, cwd, **env):
    """Run the relay to its end (-check, -version, a config error)."""
    return subprocess.run(argv, cwd=str(cwd), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env=environment(**env))
