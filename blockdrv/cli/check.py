"""``blockdrv check``: qemu-img check's report and exit codes over
:func:`blockdrv.engines.check.img_check`."""

from __future__ import annotations

import errno
import sys
from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

from ..common import CheckResult
from ..engines.check import img_check, repair_flags
from ..errors import BlockDriverError
from .common import (ArgParser, CliError, add_output_option, open_image, output_format,
                     qjson, qprint, usage_error)
from .common import report as report_line

DESCRIPTION = """\
Checks the image's metadata for consistency and, with -r, repairs it and
checks it again.  Exit status: 0 no problem, 2 corruptions, 3 leaked
clusters, 1 the check failed, 63 the format has no check."""


def check_dict(res: CheckResult, filename: str, fmt: str) -> dict[str, Any]:
    """ImageCheck: optional counters only when non-zero (qemu's has_* rule)."""
    out: dict[str, Any] = {"filename": filename, "format": fmt,
                           "check-errors": res.check_errors}
    for key, value in (("image-end-offset", res.image_end_offset),
                       ("corruptions", res.corruptions), ("leaks", res.leaks),
                       ("corruptions-fixed", res.corruptions_fixed),
                       ("leaks-fixed", res.leaks_fixed),
                       ("total-clusters", res.total_clusters),
                       ("allocated-clusters", res.allocated_clusters),
                       ("fragmented-clusters", res.fragmented_clusters),
                       ("compressed-clusters", res.compressed_clusters)):
        if value:
            out[key] = value
    return out


def human_check(c: dict[str, Any]) -> str:
    corruptions, leaks, errors = (c.get("corruptions", 0), c.get("leaks", 0),
                                  c["check-errors"])
    out = []
    if not (corruptions or leaks or errors):
        out.append("No errors were found on the image.\n")
    else:
        if corruptions:
            out.append(f"\n{corruptions} errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image "
                       "may corrupt it.\n")
        if leaks:
            out.append(f"\n{leaks} leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.\n")
        if errors:
            out.append(f"\n{errors} internal errors have occurred during the check.\n")
    total, alloc = c.get("total-clusters", 0), c.get("allocated-clusters", 0)
    if total and alloc:
        out.append("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed "
                   "clusters\n" % (alloc, total, alloc * 100.0 / total,
                                   c.get("fragmented-clusters", 0) * 100.0 / alloc,
                                   c.get("compressed-clusters", 0) * 100.0 / alloc))
    if c.get("image-end-offset"):
        out.append(f"Image end offset: {c['image-end-offset']}\n")
    return "".join(out)


def parser() -> ArgParser:
    p = ArgParser("check", DESCRIPTION)
    p.add_argument("-f", dest="fmt", metavar="fmt",
                   help="the image's format (probed when not given)")
    p.add_argument("-r", dest="repair", metavar="leaks|all",
                   help="repair: 'leaks' frees leaked clusters, 'all' also fixes "
                        "corruptions (opens the image read-write)")
    p.add_argument("-q", dest="quiet", action="store_true",
                   help="quiet: print no report, the exit status tells")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open without locks that keep writers out (not with -r)")
    add_output_option(p)
    p.add_argument("args", nargs="*", metavar="filename", help="the image")
    return p


def run(argv: list[str]) -> int:
    a = parser().parse_intermixed_args(argv)
    try:
        fix = repair_flags(a.repair)
    except BlockDriverError as exc:
        usage_error(exc.message)
    if len(a.args) != 1:
        usage_error("Expecting one image file name")
    filename = a.args[0]
    fmt = output_format(a.output)
    bs = open_image(filename, a.fmt, writable=bool(fix), check=True,
                    force_share=a.force_share)
    try:
        try:
            report = img_check(bs, fix)
        except BlockDriverError as exc:
            partial = getattr(exc, "result", None)
            for message in partial.messages if partial is not None else ():
                print(message, file=sys.stderr)
            text = exc.message
            head, _, rest = text.partition(": ")
            step, _, tail = rest.rpartition(": ")
            if partial is not None and step:
                # as qemu-img: the failed step on a line, then the errno only
                report_line(f"{step}: {tail}")
                text = f"{head}: {tail}"
            raise CliError(text, 63 if exc.errno == errno.ENOTSUP else 1) from None
        res = report.first
        for message in res.messages:
            print(message, file=sys.stderr)
        c = check_dict(res, filename, bs.format_name)
        if report.second is not None:
            if fmt == "human":
                qprint(a.quiet, "The following inconsistencies were found and repaired:\n\n"
                       f"    {res.leaks_fixed} leaked clusters\n"
                       f"    {res.corruptions_fixed} corruptions\n\n"
                       "Double checking the fixed image now...", end="\n")
            # the double check does not repeat a line of the first pass
            said = set(res.messages)
            for message in report.second.messages:
                if message not in said:
                    print(message, file=sys.stderr)
            res = report.result
            c = check_dict(res, filename, bs.format_name)
            # the repair's counts after the double check's (qemu-img's key order)
            c.update({k: c.pop(k) for k in ("leaks-fixed", "corruptions-fixed") if k in c})
    finally:
        bs.close()
    if fmt == "json":
        qprint(a.quiet, qjson(c))
    else:
        qprint(a.quiet, human_check(c), end="")
    if res.check_errors:
        raise CliError("Check failed")
    if res.corruptions:
        return 2
    return 3 if res.leaks else 0
