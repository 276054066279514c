"""``blockdrv rebase``: qemu-img rebase (and Set-VHD -ParentPath), over
:func:`blockdrv.engines.rebase.rebase`."""

from __future__ import annotations

from ..engines.rebase import rebase
from .common import ArgParser, usage_error
from .progress import Progress

DESCRIPTION = """\
Makes backing_file the backing file of filename.  Safe mode (default)
first copies into filename every range it does not hold itself where the
old and the new backing file differ, so its content does not change; -u
(unsafe) only rewrites the recorded parent -- to repair a moved or renamed
parent.  A vhdx child accepts a parent whose DataWriteGuid matches its
parent_linkage; --ignore-id-mismatch links it to the new parent as it is.
An empty backing_file ("") removes the backing file (not for vhdx
differencing images: convert makes a flat copy)."""


def parser() -> ArgParser:
    p = ArgParser("rebase", DESCRIPTION)
    p.add_argument("-f", dest="fmt", metavar="fmt",
                   help="the image's format (probed when not given)")
    p.add_argument("-t", dest="cache", metavar="cache",
                   help="the image's cache mode (default: writeback)")
    p.add_argument("-T", dest="src_cache", metavar="src_cache",
                   help="the backing files' cache mode (default: writeback)")
    p.add_argument("-p", dest="progress", action="store_true",
                   help="show a progress line on stderr")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="unsafe: only change the recorded backing file")
    p.add_argument("-b", dest="backing", metavar="backing_file",
                   help="the new backing file (relative to the image's directory)")
    p.add_argument("-F", dest="backing_fmt", metavar="backing_fmt",
                   help="the new backing file's format")
    p.add_argument("--ignore-id-mismatch", action="store_true",
                   help="vhdx: link to the new parent even if its DataWriteGuid is not "
                        "the image's parent_linkage")
    p.add_argument("args", nargs="*", metavar="filename", help="the image")
    return p


def run(argv: list[str]) -> int:
    a = parser().parse_intermixed_args(argv)
    if len(a.args) != 1:
        usage_error("Expecting one image file name")
    if a.backing is None:
        usage_error("Must specify backing file (-b) or use unsafe mode (-u) with -b \"\"")
    progress = Progress(a.progress and not a.quiet)
    try:
        rebase(a.args[0], a.backing, fmt=a.fmt, backing_fmt=a.backing_fmt,
               unsafe=a.unsafe, ignore_id_mismatch=a.ignore_id_mismatch, cache=a.cache,
               src_cache=a.src_cache,
               progress=progress.update if progress.enabled else None)
    finally:
        progress.close()
    return 0
