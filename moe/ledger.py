"""The reward ledger's public names and CLI: `python -m moe.ledger verify|show|export PATH`.

The implementation lives in `moe.incentives.ledger`; this module keeps the documented entry point.
"""

import sys

from moe.incentives.ledger import *  # noqa: F403  (the public API, listed in its __all__)
from moe.incentives.ledger import __all__, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
