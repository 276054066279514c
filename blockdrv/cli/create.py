"""``blockdrv create``: qemu-img create, its ``-o`` syntax and "Formatting" line."""

from __future__ import annotations

from .._startup import TYPE_CHECKING
from .. import block
from ..errors import BlockDriverError
from ..options import CreateOption, parse_create_options, split_options
from ..plugins import get_registry
from .common import ArgParser, CliError, cvtnum, describe, qprint, usage_error

if TYPE_CHECKING:
    from typing import Any

_TYPE_NAMES = {"size": "size", "number": "num", "bool": "bool (on/off)", "string": "str"}


def parse_o(values: list[str] | None) -> list[tuple[str, str | None]]:
    """Every ``-o`` argument, in order (qemu accumulates them with commas)."""
    items: list[tuple[str, str | None]] = []
    for value in values or []:
        items.extend(split_options(value))
    return items


def wants_help(items: list[tuple[str, str | None]]) -> bool:
    return any(key in ("help", "?") and val is None for key, val in items)


def option_help(fmt: str, filename: str | None) -> str:
    """``-o help`` as qemu_opts_print_help lays it out (sorted by name)."""
    drv = get_registry().format(fmt) if fmt in get_registry().formats else None
    if drv is None or drv.bdrv_create is None:
        raise CliError(f"Unknown file format '{fmt}'")
    lines = [f"Supported {fmt} options:" if filename is None else "Supported options:"]
    for opt in sorted(drv.create_opts(), key=lambda o: o.name):
        head = f"{opt.name}=<{_TYPE_NAMES.get(opt.type, opt.type)}>"
        lines.append(f"  {head:<22} - {opt.help}" if opt.help else f"  {head}")
    if filename is None:
        lines += ["", "The protocol level may support further options.",
                  "Specify the target filename to include those options."]
    return "\n".join(lines)


def _show(opt: CreateOption, value: Any, given: str | None) -> str:
    if opt.type == "bool":
        return "on" if value else "off"
    if opt.type == "size" or opt.type == "number":
        return str(value)
    text = given if given is not None else str(value)
    return text.replace(",", ",,")


def formatting_line(filename: str, fmt: str, opts: list[CreateOption],
                    parsed: dict[str, Any], given: dict[str, str | None]) -> str:
    """qemu's "Formatting 'f', fmt=F size=N ..." line: options in the driver's
    order, those set by the user or with a default."""
    parts = [f"Formatting '{filename}', fmt={fmt}"]
    for opt in opts:
        if opt.name in parsed:
            parts.append(f"{opt.name}={_show(opt, parsed[opt.name], given.get(opt.name))}")
        elif opt.default is not None:
            parts.append(f"{opt.name}={_show(opt, opt.default, None)}")
    return " ".join(parts)


def prepare_create(filename: str, fmt: str, items: list[tuple[str, str | None]],
                   size: int | None) -> tuple[dict[str, Any], str]:
    """Check the options; returns the parsed options and the Formatting line.
    Errors are prefixed with the file name, as qemu-img's are."""
    reg = get_registry()
    drv = reg.formats.get(fmt)
    if drv is None or drv.bdrv_create is None:
        raise CliError(f"{filename}: Unknown file format '{fmt}'")
    opts = drv.create_opts()
    try:
        parsed = parse_create_options(items, opts)
    except BlockDriverError as exc:
        raise CliError(f"{filename}: {exc.message}") from None
    if size is not None:
        if "size" in parsed:
            raise CliError(f"{filename}: The image size must be specified only once")
        parsed["size"] = size
    if "size" not in parsed:
        raise CliError(f"{filename}: Image creation needs a size parameter")
    given = {k: v for k, v in items}
    if not any(o.name == "size" for o in opts):
        opts = [CreateOption("size", "size")] + opts
    return parsed, formatting_line(filename, fmt, opts, parsed, given)


def backing_size(filename: str, opts: dict[str, Any]) -> int:
    """The size a new image inherits from its backing file (qemu-img opens it;
    a relative name is taken against the new image's directory)."""
    path = block.path_combine(filename, str(opts["backing_file"]))
    try:
        bs = block.open_node(path, opts.get("backing_fmt"), 0)
    except (BlockDriverError, OSError) as exc:
        raise CliError(f"{filename}: Could not open backing file '{path}': "
                       f"{describe(exc)}") from None
    try:
        return bs.total_size
    finally:
        bs.close()


def refuse_unsafe_backing(filename: str, fmt: str, size: int | None,
                          items: list[tuple[str, str | None]]) -> None:
    """``create -u -b``: qemu-img then never opens the backing file, so the
    size must be given.  blockdrv's only format with backing files, VHDX,
    cannot be created that way: a differencing image names its parent by
    the parent's DataWriteGuid (the parent locator's parent_linkage) and
    must use its logical sector size, both only known by opening it.  A
    made-up linkage would make the child unopenable, a guessed sector size
    could make it read wrong data; so ``-u`` with a backing file is refused
    rather than guessed."""
    if size is None and not any(k == "size" for k, _ in items):
        raise CliError(f"{filename}: Image creation needs a size parameter")
    reason = ("a VHDX differencing image records its parent's DataWriteGuid and "
              "sector size, which only opening the parent tells" if fmt == "vhdx"
              else "the backing file has to be opened")
    raise CliError(f"{filename}: -u (do not open the backing file) is not supported "
                   f"for {fmt}: {reason}; create it without -u")


def do_create(filename: str, fmt: str, parsed: dict[str, Any]) -> None:
    try:
        block.create(filename, fmt, parsed)
    except (BlockDriverError, OSError) as exc:
        raise CliError(f"{filename}: {describe(exc)}") from None


DESCRIPTION = """\
Creates filename in format fmt, of size bytes (suffixes k, M, G, T, P, E),
and prints qemu-img's "Formatting" line.  With -b the image is a
differencing image over backing_file and takes its size unless given."""


def parser() -> ArgParser:
    p = ArgParser("create", DESCRIPTION)
    p.add_argument("-f", dest="fmt", default="raw", metavar="fmt",
                   help="the new image's format (default: raw)")
    p.add_argument("-o", dest="options", action="append", metavar="options",
                   help="create options, key=value[,...]; '-o help' lists the "
                        "format's")
    p.add_argument("-q", dest="quiet", action="store_true",
                   help="quiet: no \"Formatting\" line")
    p.add_argument("-b", dest="backing", metavar="backing_file",
                   help="the backing file (parent) of a differencing image; relative "
                        "to the new image's directory")
    p.add_argument("-F", dest="backing_fmt", metavar="backing_fmt",
                   help="the backing file's format")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="do not open the backing file (refused for vhdx, whose "
                        "children need it)")
    p.add_argument("args", nargs="*", metavar="filename", help="the image, then size")
    return p


def run(argv: list[str]) -> int:
    a = parser().parse_intermixed_args(argv)
    items = parse_o(a.options)
    filename = a.args[0] if a.args else None
    if wants_help(items):
        print(option_help(a.fmt, filename))
        return 0
    if not a.args:
        usage_error("Expecting image file name")
    if len(a.args) > 2:
        usage_error(f"Unexpected argument: {a.args[2]}")
    size = cvtnum("image size", a.args[1]) if len(a.args) > 1 else None
    if a.backing or a.backing_fmt:
        drv = get_registry().formats.get(a.fmt)
        names = {o.name for o in drv.create_opts()} if drv and drv.bdrv_create else set()
        if "backing_file" not in names:
            raise CliError(f"{filename}: Backing file not supported for file format '{a.fmt}'")
        # qemu-img: -b/-F are the backing_file/backing_fmt options
        if a.backing:
            items.append(("backing_file", a.backing))
        if a.backing_fmt:
            items.append(("backing_fmt", a.backing_fmt))
    has_backing = any(k == "backing_file" for k, _ in items)
    if a.unsafe and has_backing:
        refuse_unsafe_backing(filename, a.fmt, size, items)
    if size is None and has_backing and not any(k == "size" for k, _ in items):
        size = backing_size(filename, dict(items))
    parsed, line = prepare_create(filename, a.fmt, items, size)
    qprint(a.quiet, line)
    do_create(filename, a.fmt, parsed)
    return 0
