"""``python -m wrapkit``: the command line (see ``wrapkit._summary.cli``).

The ``wrapkit`` console script calls ``main`` too.
"""

import sys

from ._summary.cli import PROG, main

if __name__ == "__main__":
    sys.exit(main(prog=PROG))
