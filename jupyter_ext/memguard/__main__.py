"""``python -m memguard``: the command line in memguard.cli (install, uninstall)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
