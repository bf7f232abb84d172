"""smtprelay: run `python relay.py smtprelay.ini`."""

import sys

from relay_lib.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
