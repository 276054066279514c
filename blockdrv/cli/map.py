"""``blockdrv map``: the allocation map, printed as qemu-img map prints it."""

from __future__ import annotations

import sys

from ..errors import BlockDriverError
from ..mapping import MapEntry, map_entries
from .common import (ArgParser, CliError, add_output_option, cvtnum, describe,
                     open_image, output_format, usage_error)


def json_entry(e: MapEntry) -> str:
    text = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
            f'"present": {_b(e.present)}, "zero": {_b(e.zero)}, "data": {_b(e.data)}')
    if e.offset is not None:
        text += f', "offset": {e.offset}'
    return text + "}"


def _b(value: bool) -> str:
    return "true" if value else "false"


def human_entry(e: MapEntry) -> str | None:
    if e.data and e.offset is None:
        raise CliError("File contains external, encrypted or compressed clusters.")
    if e.data and not e.zero:
        return "%-16s%-16s%-16s%s" % (_hex(e.start), _hex(e.length), _hex(e.offset),
                                       e.filename)
    return None


def _hex(value: int) -> str:
    return "%#x" % value if value else "0"   # C's %#x prints 0 without the prefix


DESCRIPTION = """\
Lists the image's ranges as the guest sees them, backing chain included:
human output shows where data lives in which file, json every range with
its depth in the chain and its present/zero/data flags."""


def parser() -> ArgParser:
    p = ArgParser("map", DESCRIPTION)
    p.add_argument("-f", dest="fmt", metavar="fmt",
                   help="the image's format (probed when not given)")
    add_output_option(p)
    p.add_argument("--start-offset", dest="start", metavar="offset",
                   help="start the map at this guest offset (default 0)")
    p.add_argument("--max-length", dest="max_length", metavar="len",
                   help="map at most this many bytes (default: to the end)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open without locks that keep writers out")
    p.add_argument("args", nargs="*", metavar="filename", help="the image")
    return p


def run(argv: list[str]) -> int:
    a = parser().parse_intermixed_args(argv)
    fmt = output_format(a.output)
    start = cvtnum("start offset", a.start) if a.start is not None else 0
    max_length = cvtnum("max length", a.max_length) if a.max_length is not None else None
    if len(a.args) != 1:
        usage_error("Expecting one image file name")
    filename = a.args[0]
    bs = open_image(filename, a.fmt, force_share=a.force_share)
    out = sys.stdout
    try:
        if fmt == "json":
            out.write("[")
        else:
            out.write("%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File"))
        first = True
        prev: MapEntry | None = None
        try:
            for entry in map_entries(bs, start, max_length):
                if fmt == "json":
                    out.write(("" if first else ",\n") + json_entry(entry))
                else:
                    if prev is not None and (not entry.data or entry.zero):
                        # human output does not tell 0, ZERO and ZERO|DATA apart
                        entry.data, entry.zero = False, True
                    line = human_entry(entry)
                    if line is not None:
                        out.write(line + "\n")
                    prev = entry
                first = False
        except BlockDriverError as exc:
            if fmt == "json":
                out.write("\n")
            raise CliError(f"Could not read file metadata: {describe(exc)}") from None
        if fmt == "json":
            out.write("]\n")
    finally:
        bs.close()
    return 0
