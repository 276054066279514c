"""``blockdrv fuse``: mount an image's guest disk as a regular file, as
qemu-storage-daemon's FUSE export does.

    blockdrv fuse [-r] [-f fmt] [-U] filename mountpoint

The mount point must be an existing regular file (qemu's rule): the mount
covers it with the guest disk.  The command stays in the foreground until
SIGTERM/SIGINT/SIGHUP or ``fusermount3 -u mountpoint``; then the image is
flushed and closed (its locks released) and the status is 0.
"""

from __future__ import annotations

import signal
import sys

from ..errors import BlockDriverError
from .common import PROBED_RAW_WARNING, ArgParser, CliError, describe

DESCRIPTION = """\
The mount point must be an existing regular file: the disk covers it (as with
qemu-storage-daemon --export fuse), so 'dd', 'e2fsck', 'mkfs', 'losetup' and
Python's open() work on MOUNTPOINT itself.  Writes go through the image
(locked while mounted); the disk's size is fixed (writes past the end fail
with ENOSPC, truncation with EINVAL: open without O_TRUNC, dd conv=notrunc);
fallocate punch-hole and zero-range zero ranges (punch-hole deallocates where
the format can); SEEK_DATA and SEEK_HOLE follow the image's allocation.  fsync
and every close(2) flush the image.  Stops on SIGTERM, SIGINT, SIGHUP or 'fusermount3 -u MOUNTPOINT'."""


def parser() -> ArgParser:
    p = ArgParser("fuse", DESCRIPTION)
    p.add_argument("filename", help="the image to export")
    p.add_argument("mountpoint", help="an existing regular file the disk is mounted over")
    p.add_argument("-r", "--read-only", action="store_true",
                   help="export read-only (writes fail with EROFS)")
    p.add_argument("-f", "--format", dest="fmt", metavar="fmt",
                   help="the image's format (probed when not given)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open without locks that keep writers out (with -r only)")
    return p


def run(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    if a.force_share and not a.read_only:
        raise CliError("-U (force-share) can only be used with read-only exports (-r)")
    from ..exports import fuse as export
    try:
        export.load_binding()
        export.check_fuse_device()
        export.check_mountpoint(a.mountpoint)
    except BlockDriverError as exc:
        raise CliError(describe(exc)) from None
    image = _open(a)
    try:
        export.serve(image, a.mountpoint, readonly=a.read_only,
                     fsname=f"blockdrv:{a.filename}")
    except BlockDriverError as exc:
        _close(image, a.filename)
        raise CliError(describe(exc)) from None
    except BaseException:
        _close(image, a.filename)
        raise
    # Unmounted: from here a signal must not kill the process half-way
    # through closing the image (the close flushes and unlocks it anyway).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        image.close()
    except BlockDriverError as exc:
        raise CliError(f"Failed to close '{a.filename}': {exc.message}") from None
    return 0


def _open(a):
    from ..api import Image
    from ..block import open_node
    from ..common import O_FORCE_SHARE, O_RDWR
    from ..engines.common import open_error
    flags = (0 if a.read_only else O_RDWR) | (O_FORCE_SHARE if a.force_share else 0)
    try:
        # discard=unmap: punch-hole deallocates, as qemu-storage-daemon's
        # exports are usually configured
        bs = open_node(a.filename, a.fmt, flags, {"discard": "unmap"})
    except BlockDriverError as exc:
        raise CliError(open_error(a.filename, exc)) from None
    if bs.probed_raw and not a.read_only:
        print(PROBED_RAW_WARNING.format(a.filename), file=sys.stderr, flush=True)
    return Image(bs)


def _close(image, filename: str) -> None:
    try:
        image.close()
    except BlockDriverError:
        pass
