"""``python -m blockdrv.cli.io``: the qemu-io clone as a program."""

import sys

from .session import main

sys.exit(main())
