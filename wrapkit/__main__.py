"""``python -m wrapkit``: the command line (see ``wrapkit._summary.cli``)."""

import sys

from ._summary.cli import main

if __name__ == "__main__":
    sys.exit(main())
