"""``blockdrv measure``: qemu-img measure, over
:func:`blockdrv.engines.measure.measure`."""

from __future__ import annotations

from ..engines.measure import measure
from .common import (SIZE_LIMIT, ArgParser, CliError, add_output_option, output_format,
                     qjson, strtosz, usage_error, warn)
from .create import option_help, parse_o, wants_help

DESCRIPTION = """\
Prints the host file size a new output_fmt image needs: for a copy of
filename (its backing chain included, as convert copies it) or for an
empty disk of --size bytes.  "required size" is at least what convert
writes; "fully allocated size" what the image takes with every block
allocated.  Formats with a measure: raw, vhdx, qcow2."""


def parser() -> ArgParser:
    p = ArgParser("measure", DESCRIPTION)
    add_output_option(p)
    p.add_argument("-O", dest="out_fmt", metavar="output_fmt",
                   help="the format to measure for (required)")
    p.add_argument("-o", dest="options", action="append", metavar="options",
                   help="create options of the new image, key=value[,...]")
    p.add_argument("--size", metavar="N", help="measure an empty disk of N bytes")
    p.add_argument("-f", dest="fmt", metavar="fmt",
                   help="filename's format (probed when not given)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open filename without locks that keep writers out")
    p.add_argument("args", nargs="*", metavar="filename", help="the image to copy")
    return p


def run(argv: list[str]) -> int:
    a = parser().parse_intermixed_args(argv)
    fmt = output_format(a.output)
    items = parse_o(a.options)
    if a.out_fmt is None:
        usage_error("Expecting output format (-O)")
    if wants_help(items):
        print(option_help(a.out_fmt, None))
        return 0
    if len(a.args) > 1:
        usage_error("At most one filename argument is allowed.")
    size = None
    if a.size is not None:
        size = strtosz(a.size, warn)
        if size is None or size >= SIZE_LIMIT:
            raise CliError("Invalid image size specified. Must be between 0 and "
                           "9223372036854775807.")
    res = measure(a.out_fmt, filename=a.args[0] if a.args else None, fmt=a.fmt,
                  size=size, options=items, force_share=a.force_share)
    if fmt == "json":
        out = {"required": res["required"], "fully-allocated": res["fully-allocated"]}
        if "bitmaps" in res:
            out["bitmaps"] = res["bitmaps"]
        print(qjson(out))
    else:
        print(f"required size: {res['required']}")
        print(f"fully allocated size: {res['fully-allocated']}")
        if "bitmaps" in res:
            print(f"bitmaps size: {res['bitmaps']}")
    return 0
