"""``python -m nanodit.validate``: the command line of the validation package (``nanodit.validation.cli``)."""

import sys

from nanodit.validation.cli import main

if __name__ == "__main__":
    sys.exit(main())
