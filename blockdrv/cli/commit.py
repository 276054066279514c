"""``blockdrv commit``: qemu-img commit (Merge-VHD), over
:func:`blockdrv.engines.commit.commit`."""

from __future__ import annotations

from ..engines.commit import commit
from .common import ArgParser, qprint, usage_error
from .progress import Progress

DESCRIPTION = """\
Writes the data of filename into its backing file (or into base, further
down its backing chain), flushes it, then empties filename so that it reads
everything from its parent again.  -d keeps filename's data; -b implies -d,
and then the images between base and filename are left as they are (only
filename still reads as before).  A crash at any point leaves filename
reading what it read before."""


def parser() -> ArgParser:
    p = ArgParser("commit", DESCRIPTION)
    p.add_argument("-f", dest="fmt", metavar="fmt",
                   help="the image's format (probed when not given)")
    p.add_argument("-t", dest="cache", metavar="cache",
                   help="cache mode of the images written (default: writeback)")
    p.add_argument("-b", dest="base", metavar="base",
                   help="commit into this image of the backing chain (implies -d)")
    p.add_argument("-d", dest="drop", action="store_true",
                   help="do not empty filename after the commit")
    p.add_argument("-p", dest="progress", action="store_true",
                   help="show a progress line on stderr")
    p.add_argument("-q", dest="quiet", action="store_true",
                   help="quiet: no \"Image committed.\" line")
    p.add_argument("args", nargs="*", metavar="filename", help="the image")
    return p


def run(argv: list[str]) -> int:
    a = parser().parse_intermixed_args(argv)
    if len(a.args) != 1:
        usage_error("Expecting one image file name")
    progress = Progress(a.progress and not a.quiet)
    try:
        commit(a.args[0], fmt=a.fmt, base=a.base, drop=a.drop, cache=a.cache,
               progress=progress.update if progress.enabled else None)
    finally:
        progress.close()
    qprint(a.quiet, "Image committed.")
    return 0
