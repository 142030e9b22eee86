"""``python -m nanodit``: the ``nanodit`` command (nanodit/cli.py)."""

import sys

from nanodit.cli import main

sys.exit(main())
