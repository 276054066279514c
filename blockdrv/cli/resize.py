"""``blockdrv resize``: qemu-img resize, ``[+|-]size`` and ``--shrink``."""

from __future__ import annotations

import sys

from ..errors import BlockDriverError
from ..common import O_RESIZE
from .common import (PROG, SIZE_LIMIT, ArgParser, CliError, describe, open_image,
                     prealloc_error, qprint, strtosz, usage_error, warn)


DESCRIPTION = """\
Sets the image's virtual size to size, or grows (+) or shrinks (-) it by
size.  Shrinking needs --shrink: the data beyond the new end is lost."""


def parser() -> ArgParser:
    p = ArgParser("resize", DESCRIPTION)
    p.add_argument("-f", dest="fmt", metavar="fmt",
                   help="the image's format (probed when not given)")
    p.add_argument("-q", dest="quiet", action="store_true",
                   help="quiet: no \"Image resized.\" line")
    p.add_argument("--shrink", action="store_true",
                   help="allow a smaller size (the data beyond it is lost)")
    p.add_argument("--preallocation", default="off", metavar="prealloc",
                   help="allocation of the grown part: off (default), metadata, "
                        "falloc, full")
    p.add_argument("args", nargs="*", metavar="filename",
                   help="the image, then [+ | -]size")
    return p


def run(argv: list[str]) -> int:
    if argv in (["-h"], ["--help"]):
        parser().parse_args(argv)          # prints the help and exits 0
    # The size is taken off first, so that "-1G" is not read as an option.
    if len(argv) < 2:
        usage_error("Not enough arguments")
    size_arg = argv[-1]
    a = parser().parse_intermixed_args(argv[:-1])
    bad_prealloc = prealloc_error(a.preallocation)
    if bad_prealloc:
        raise CliError(bad_prealloc)
    if len(a.args) != 1:
        usage_error("Expecting image file name and size")
    filename = a.args[0]
    relative = {"+": 1, "-": -1}.get(size_arg[:1], 0)
    size_text = size_arg[1:] if relative else size_arg
    value = strtosz(size_text, warn)
    if value is None:
        raise CliError("Parameter 'size' expects a non-negative number below 2^64 "
                       "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                       "tera-, peta- and exabytes, respectively.")
    if value >= SIZE_LIMIT:
        raise CliError(f"Value '{size_text}' is out of range for parameter 'size'")
    bs = open_image(filename, a.fmt, writable=True, flags=O_RESIZE)
    try:
        current = bs.total_size
        total = _int64(current + relative * _int64(value) if relative else value)
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


def _int64(value: int) -> int:
    """``value`` wrapped to int64_t, as qemu-img computes the new size."""
    return (value + (1 << 63)) % (1 << 64) - (1 << 63)


class ShrinkRefused(CliError):
    def __init__(self) -> None:
        super().__init__("Use the --shrink option to perform a shrink operation.")

    def after(self) -> None:
        print(f"{PROG}: warning: Shrinking an image will delete all data beyond the "
              "shrunken image's end. Before performing such an operation, make sure "
              "there is no important data there.", file=sys.stderr)
