"""``blockdrv snapshot``: qemu-img snapshot (which has no ``-f``: probed).  ``-l`` lists an image's internal
snapshots as qemu-img 7.2 prints them; ``-c``, ``-a`` and ``-d`` write the
image, which no blockdrv format can do for internal snapshots yet, so they
are refused (never silently ignored)."""

from __future__ import annotations

import time

from ..common import O_NO_BACKING, SnapshotInfo
from .common import ArgParser, CliError, open_image, size_to_str, usage_error

DESCRIPTION = """\
-l lists the image's internal snapshots (the table qemu-img snapshot -l
prints; dates in local time, TZ applies).  -c (create), -a (apply) and -d
(delete) are not supported yet: blockdrv cannot write internal snapshots."""

_ACTIONS = {"c": "create", "a": "apply", "d": "delete"}


def table(snapshots: list[SnapshotInfo]) -> list[str]:
    """qemu's "Snapshot list:" block (bdrv_snapshot_dump), one string a line."""
    lines = ["Snapshot list:",
             "%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK",
                                              "ICOUNT")]
    for sn in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn.date_sec))
        secs = sn.vm_clock_nsec // 10**9
        clock = "%02d:%02d:%02d.%03d" % (secs // 3600, secs // 60 % 60, secs % 60,
                                         sn.vm_clock_nsec // 10**6 % 1000)
        icount = "" if sn.icount is None else str(sn.icount)
        lines.append(f"{_ljust(sn.id, 9)} {_ljust(sn.name, 16)} "
                     + "%8s%20s%13s%11s" % (size_to_str(sn.vm_state_size), date, clock,
                                            icount))
    return lines


def _ljust(text: str, width: int) -> str:
    # printf's %-Ns pads to N bytes, not characters: UTF-8 names get fewer spaces
    return text + " " * (width - len(text.encode("utf-8", "surrogateescape")))


def parser() -> ArgParser:
    p = ArgParser("snapshot", DESCRIPTION)
    p.add_argument("-l", dest="list", action="store_true",
                   help="list the internal snapshots")
    for flag, verb in _ACTIONS.items():
        p.add_argument(f"-{flag}", dest=verb, metavar="snapshot",
                       help=f"{verb} a snapshot (not supported yet)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open without locks that keep writers out")
    p.add_argument("args", nargs="*", metavar="filename", help="the image")
    return p


def run(argv: list[str]) -> int:
    a = parser().parse_intermixed_args(argv)
    actions = [verb for verb in _ACTIONS.values() if getattr(a, verb) is not None]
    if a.list + len(actions) > 1:
        usage_error("Cannot mix '-l', '-a', '-c', '-d'")
    if len(a.args) != 1:
        usage_error("Expecting one image file name")
    filename = a.args[0]
    bs = open_image(filename, None, flags=O_NO_BACKING, force_share=a.force_share)
    try:
        if actions:
            verb = actions[0]
            raise CliError(f"Could not {verb} snapshot '{getattr(a, verb)}': not supported "
                           "(blockdrv cannot write internal snapshots yet)")
        snapshots = bs.snapshot_list() if a.list else None
    finally:
        bs.close()
    if snapshots:               # qemu-img prints nothing for none (or no support)
        print("\n".join(table(snapshots)))
    return 0
