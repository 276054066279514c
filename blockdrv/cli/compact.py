"""``blockdrv compact``: Optimize-VHD for VHDX files, over
:func:`blockdrv.engines.compact.compact`."""

from __future__ import annotations

from ..errors import BlockDriverError
from .common import ArgParser, CliError, describe, qprint, size_to_str
from .progress import Progress

DESCRIPTION = """\
Gives a dynamic or differencing VHDX image's unused space back, offline:
blocks that hold only zeros become ZERO blocks, blocks at the end of the
file move into the holes, and the file is truncated.  Guest data never
changes.  The image must not be in use; a pending log is replayed first.
Make the guest's free space visible first (fstrim through 'blockdrv nbd
--discard=unmap', or zero it): see the README's VHDX section."""


def parser() -> ArgParser:
    p = ArgParser("compact", DESCRIPTION)
    p.add_argument("-f", dest="fmt", metavar="fmt",
                   help="the image's format (vhdx; probed when not given)")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet: no report")
    p.add_argument("--dry-run", action="store_true",
                   help="only say how much compaction would free (opens read-only)")
    p.add_argument("filename", help="the image")
    return p


def _size(n: int) -> str:
    return f"{n} bytes ({size_to_str(n)})"


def run(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    from ..engines.compact import compact
    bar = Progress(a.progress and not a.quiet)
    try:
        r = compact(a.filename, fmt=a.fmt, dry_run=a.dry_run, progress=bar.update)
    except BlockDriverError as exc:
        raise CliError(describe(exc)) from None
    finally:
        bar.close()
    detail = (f"{r.zeroed_blocks} zero blocks, {r.moved_blocks} blocks "
              f"{'to move' if r.dry_run else 'moved'}"
              + (f", {r.freed_bitmaps} sector bitmap blocks freed" if r.freed_bitmaps else ""))
    if r.dry_run:
        qprint(a.quiet, f"Compaction would free {_size(r.freed)}: file "
                        f"{r.length_before} -> {r.length_after} bytes ({detail}).")
    else:
        qprint(a.quiet, f"Image compacted: {_size(r.freed)} freed, file "
                        f"{r.length_before} -> {r.length_after} bytes ({detail}).")
    return 0
