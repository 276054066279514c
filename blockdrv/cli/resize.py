"""``blockdrv resize``: qemu-img resize, ``[+|-]size`` and ``--shrink``."""

from __future__ import annotations

import sys

from ..errors import BlockDriverError
from .common import (PROG, ArgParser, CliError, describe, open_image, qprint, strtosz,
                     usage_error)

PREALLOC_MODES = ("off", "metadata", "falloc", "full")


def run(argv: list[str]) -> int:
    # The size is taken off first, so that "-1G" is not read as an option.
    if len(argv) < 2:
        usage_error("Not enough arguments")
    size_arg = argv[-1]
    p = ArgParser("resize")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("--shrink", action="store_true")
    p.add_argument("--preallocation", default="off")
    p.add_argument("args", nargs="*")
    a = p.parse_intermixed_args(argv[:-1])
    if a.preallocation not in PREALLOC_MODES:
        raise CliError(f"Invalid preallocation mode '{a.preallocation}'")
    if len(a.args) != 1:
        usage_error("Expecting image file name and size")
    filename = a.args[0]
    relative = {"+": 1, "-": -1}.get(size_arg[:1], 0)
    value = strtosz(size_arg[1:] if relative else size_arg)
    if value is None or value >= 1 << 64:
        raise CliError("Parameter 'size' expects a non-negative number below 2^64 "
                       "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                       "tera-, peta- and exabytes, respectively.")
    bs = open_image(filename, a.fmt, writable=True)
    try:
        current = bs.total_size
        total = current + relative * value if relative else value
        if total <= 0:
            raise CliError("New image size must be positive")
        if total <= current and a.preallocation != "off":
            raise CliError("Preallocation can only be used for growing images")
        if total < current and not a.shrink:
            raise ShrinkRefused()
        if bs.drv.bdrv_co_truncate is None:
            raise CliError("Image format driver does not support resize")
        try:
            bs.truncate(total, exact=True, prealloc=a.preallocation)
            bs.flush()
        except BlockDriverError as exc:
            raise CliError(describe(exc)) from None
    finally:
        bs.close()
    qprint(a.quiet, "Image resized.")
    return 0


class ShrinkRefused(CliError):
    def __init__(self) -> None:
        super().__init__("Use the --shrink option to perform a shrink operation.")

    def after(self) -> None:
        print(f"{PROG}: warning: Shrinking an image will delete all data beyond the "
              "shrunken image's end. Before performing such an operation, make sure "
              "there is no important data there.", file=sys.stderr)
