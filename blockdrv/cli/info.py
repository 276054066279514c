"""``blockdrv info`` and ``blockdrv check``, output as qemu-img 7.2 prints it."""

from __future__ import annotations

import errno
import sys
from typing import Any

from ..errors import BlockDriverError
from ..common import FIX_ERRORS, FIX_LEAKS, O_NO_BACKING, O_NO_IO, CheckResult
from ..node import BlockDriverState
from .common import (ArgParser, CliError, add_output_option, describe, dump_human,
                     open_image, output_format, qjson, qprint, size_to_str, usage_error)


def image_info(bs: BlockDriverState, filename: str) -> dict[str, Any]:
    """ImageInfo in QAPI field order (printing re-orders as QEMU does)."""
    info: dict[str, Any] = {"filename": filename, "format": bs.format_name}
    drv_info = bs.get_info() if bs.drv.bdrv_get_info is not None else None
    if drv_info is not None:
        info["dirty-flag"] = bool(drv_info.is_dirty)
    try:
        actual = bs.get_allocated_file_size()
    except (BlockDriverError, OSError):
        actual = -1
    if actual is not None and actual >= 0:
        info["actual-size"] = actual
    info["virtual-size"] = bs.total_size
    if drv_info is not None and drv_info.cluster_size:
        info["cluster-size"] = drv_info.cluster_size
    if bs.backing_file:
        info["backing-filename"] = bs.backing_file
        if bs.full_backing_file:
            info["full-backing-filename"] = bs.full_backing_file
        if bs.backing_format:
            info["backing-filename-format"] = bs.backing_format
    if drv_info is not None and drv_info.format_specific:
        spec = drv_info.format_specific
        if set(spec) != {"type", "data"}:
            spec = {"type": bs.format_name, "data": spec}
        info["format-specific"] = spec
    return info


def human_info(info: dict[str, Any]) -> str:
    actual = info.get("actual-size")
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {size_to_str(actual) if actual is not None else 'unavailable'}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    spec = info.get("format-specific")
    if spec is not None:
        lines.append("Format specific information:")
        data = spec.get("data")
        if isinstance(data, dict):
            lines.extend(dump_human(data))
    return "\n".join(lines)


def run_info(argv: list[str]) -> int:
    p = ArgParser("info")
    p.add_argument("-f", dest="fmt")
    add_output_option(p)
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("args", nargs="*")
    a = p.parse_intermixed_args(argv)
    if len(a.args) != 1:
        usage_error("Expecting one image file name")
    fmt = output_format(a.output)
    filename = a.args[0]
    # as qemu-img info: the backing chain is named, not opened
    bs = open_image(filename, a.fmt, flags=O_NO_BACKING | O_NO_IO, force_share=a.force_share)
    try:
        info = image_info(bs, filename)
    finally:
        bs.close()
    print(qjson(info) if fmt == "json" else human_info(info))
    return 0


# -- check ----------------------------------------------------------------------

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


def _run_check(bs: BlockDriverState, fix: int, said: set[str] | None = None) -> CheckResult:
    """One check pass; prints its messages but those in ``said`` (what the
    first pass printed: the double check does not repeat a line)."""
    try:
        res = bs.check(fix)
    except BlockDriverError as exc:
        if exc.errno == errno.ENOTSUP:
            raise CliError("This image format does not support checks", 63) from None
        raise CliError(f"Check failed: {describe(exc)}") from None
    for message in res.messages:
        if said is None or message not in said:
            print(message, file=sys.stderr)
    return res


def run_check(argv: list[str]) -> int:
    p = ArgParser("check")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-r", dest="repair")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-U", "--force-share", action="store_true")
    add_output_option(p)
    p.add_argument("args", nargs="*")
    a = p.parse_intermixed_args(argv)
    fix = 0
    if a.repair is not None:
        if a.repair == "leaks":
            fix = FIX_LEAKS
        elif a.repair == "all":
            fix = FIX_LEAKS | FIX_ERRORS
        else:
            usage_error("Unknown option value for -r (expecting 'leaks' or 'all'): "
                        f"{a.repair}")
    if len(a.args) != 1:
        usage_error("Expecting one image file name")
    filename = a.args[0]
    fmt = output_format(a.output)
    bs = open_image(filename, a.fmt, writable=bool(fix), check=True,
                    force_share=a.force_share)
    try:
        res = _run_check(bs, fix)
        c = check_dict(res, filename, bs.format_name)
        if res.corruptions_fixed or res.leaks_fixed:
            if fmt == "human":
                qprint(a.quiet, "The following inconsistencies were found and repaired:\n\n"
                       f"    {res.leaks_fixed} leaked clusters\n"
                       f"    {res.corruptions_fixed} corruptions\n\n"
                       "Double checking the fixed image now...", end="\n")
            fixed = {k: c[k] for k in ("leaks-fixed", "corruptions-fixed") if k in c}
            res = _run_check(bs, 0, set(res.messages))
            c = check_dict(res, filename, bs.format_name)
            c.pop("leaks-fixed", None)
            c.pop("corruptions-fixed", None)
            c.update(fixed)
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
