"""``blockdrv info``, output as qemu-img 7.2 prints it."""

from __future__ import annotations

from typing import Any

from ..errors import BlockDriverError
from ..common import O_NO_BACKING, O_NO_IO
from ..node import BlockDriverState
from .common import (ArgParser, add_output_option, dump_human, open_image, output_format,
                     qjson, size_to_str, usage_error)


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
    if drv_info is not None and drv_info.snapshots:
        info["snapshots"] = drv_info.snapshots
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
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append("%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE",
                                                   "VM CLOCK", "ICOUNT"))
        lines.extend(_snapshot_line(sn) for sn in info["snapshots"])
    spec = info.get("format-specific")
    if spec is not None:
        lines.append("Format specific information:")
        data = spec.get("data")
        if isinstance(data, dict):
            lines.extend(dump_human(data))
    return "\n".join(lines)


def _snapshot_line(sn: dict[str, Any]) -> str:
    """qemu's bdrv_snapshot_dump: the date in local time, the VM clock as
    hh:mm:ss.mmm."""
    import time
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
    secs = sn["vm-clock-sec"]
    clock = "%02d:%02d:%02d.%03d" % (secs // 3600, secs // 60 % 60, secs % 60,
                                     sn["vm-clock-nsec"] // 1000000 % 1000)
    icount = str(sn["icount"]) if "icount" in sn else ""
    return "%-9s %-16s %8s%20s%13s%11s" % (sn["id"], sn["name"],
                                          size_to_str(sn["vm-state-size"]), date, clock,
                                          icount)


DESCRIPTION = """\
Prints the image's format, virtual size, disk usage, cluster size, backing
file and format-specific details, as qemu-img info does.  Only the image's
metadata is read; its backing chain is named, not opened -- unless
--backing-chain, which opens it and shows each image, top first (human:
separated by blank lines; JSON: a list)."""


def parser() -> ArgParser:
    p = ArgParser("info", DESCRIPTION)
    p.add_argument("-f", dest="fmt", metavar="fmt",
                   help="the image's format (probed when not given)")
    add_output_option(p)
    p.add_argument("--backing-chain", action="store_true",
                   help="open the backing chain and show every image of it (JSON: a list)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open without locks that keep writers out")
    p.add_argument("args", nargs="*", metavar="filename", help="the image")
    return p


def run(argv: list[str]) -> int:
    a = parser().parse_intermixed_args(argv)
    if len(a.args) != 1:
        usage_error("Expecting one image file name")
    fmt = output_format(a.output)
    filename = a.args[0]
    if a.backing_chain:
        return _run_chain(filename, a, fmt)
    # as qemu-img info: the backing chain is named, not opened
    bs = open_image(filename, a.fmt, flags=O_NO_BACKING | O_NO_IO, force_share=a.force_share)
    try:
        info = image_info(bs, filename)
    finally:
        bs.close()
    print(qjson(info) if fmt == "json" else human_info(info))
    return 0


def _run_chain(filename: str, a, fmt: str) -> int:
    bs = open_image(filename, a.fmt, flags=O_NO_IO, force_share=a.force_share)
    try:
        infos, node, name = [], bs, filename
        while node is not None:
            infos.append(image_info(node, name))
            node = node.backing
            name = node.filename if node is not None else None
    finally:
        bs.close()
    if fmt == "json":
        print(qjson(infos))
    else:
        print("\n\n".join(human_info(i) for i in infos))
    return 0
