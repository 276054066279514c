"""``blockdrv compare``: exit 0 identical, 1 different, 2+ error (qemu-img's
codes), over :func:`blockdrv.engines.compare.compare`."""

from __future__ import annotations

from ..engines.compare import CompareReadError, CompareStatusError, compare
from .common import ArgParser, CliError, qprint, usage_error
from .progress import Progress

DESCRIPTION = """\
Exits 0 when the images read the same, 1 when they differ (printing the
first differing offset), 2 when an image cannot be opened, 3 when its
block status cannot be read, 4 when it cannot be read.  Images of different
sizes are identical when the longer one's extra part reads as zeros, unless
-s."""


def parser() -> ArgParser:
    p = ArgParser("compare", DESCRIPTION)
    p.add_argument("-f", dest="fmt1", metavar="fmt",
                   help="format of filename1 (probed when not given)")
    p.add_argument("-F", dest="fmt2", metavar="fmt",
                   help="format of filename2 (probed when not given)")
    p.add_argument("-s", dest="strict", action="store_true",
                   help="strict: the sizes and the allocation must match too")
    p.add_argument("-q", dest="quiet", action="store_true",
                   help="quiet: print nothing, the exit status tells")
    p.add_argument("-p", dest="progress", action="store_true",
                   help="show a progress line on stderr")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open the images without locks that keep writers out")
    p.add_argument("args", nargs="*", metavar="filename",
                   help="filename1 and filename2")
    return p


def run(argv: list[str]) -> int:
    a = parser().parse_intermixed_args(argv)
    if len(a.args) != 2:
        usage_error("Expecting two image file names")
    progress = Progress(a.progress and not a.quiet)
    try:
        # errors opening an image leave with status 2 (the command's error status)
        res = compare(*a.args, fmt_a=a.fmt1, fmt_b=a.fmt2, strict=a.strict,
                      force_share=a.force_share,
                      progress=progress.update if progress.enabled else None)
    except CompareReadError as exc:
        raise CliError(exc.message, 4) from None
    except CompareStatusError as exc:
        raise CliError(exc.message, 3) from None
    finally:
        progress.close()
    common = min(res.size1, res.size2)
    if res.mismatch == "size":
        qprint(a.quiet, "Strict mode: Image size mismatch!")
    elif res.mismatch == "block-status":
        qprint(a.quiet, f"Strict mode: Offset {res.offset} block status mismatch!")
    else:
        # qemu-img warns once it reaches the end of the shorter image
        if res.size_mismatch and (res.identical or res.offset >= common):
            qprint(a.quiet, "Warning: Image size mismatch!")
        if res.identical:
            qprint(a.quiet, "Images are identical.")
            return 0
        qprint(a.quiet, f"Content mismatch at offset {res.offset}!")
    return 1
