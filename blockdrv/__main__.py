"""``python -m blockdrv``: the same as the ``blockdrv`` command."""

import sys

from .cli import main

sys.exit(main())
