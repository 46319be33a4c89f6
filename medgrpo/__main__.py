"""``python -m medgrpo <command>``: the :mod:`medgrpo.cli` command line."""

import sys

from medgrpo.cli import main

if __name__ == "__main__":
    sys.exit(main())
