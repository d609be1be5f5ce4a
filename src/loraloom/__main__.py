"""``python -m loraloom``: the same as the ``loraloom`` command."""

import sys

from .cli import main

sys.exit(main())
