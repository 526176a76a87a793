"""``python -m autoglm serve ...``: the ``autoglm`` command (see ``autoglm.cli``)."""

import sys

from .cli import main

sys.exit(main())
