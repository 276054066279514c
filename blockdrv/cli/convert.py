"""``blockdrv convert``: qemu-img convert's options and messages over
:func:`blockdrv.engines.convert.convert`."""

from __future__ import annotations

import re

from ..engines import convert as engine
from .common import ArgParser, CliError, cvtnum
from .create import option_help, parse_o, wants_help
from .progress import Progress

MAX_COROUTINES = engine.MAX_COROUTINES
_C_INT = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")

DESCRIPTION = """\
Reads the sources one after the other (a target of their total size) and
writes them into output_filename, created in output_fmt unless -n.  Zero
ranges of the sources are not written when the new target reads as zeros
anyway; within data, runs of zero sectors at least sparse_size long are
left as holes (-S 0 writes every byte).  A target that is one of the
sources, under any name, is refused before anything is written; a failed
convert removes the target it created.  With -c every cluster of the
target is written compressed (one cluster a request, in order; data that
does not compress is stored as is, all-zero clusters are left out), for
formats that support it (qcow2)."""


def coroutine_count(text: str | None) -> int | None:
    """``-m``: qemu-img's range and message; ``None`` when not given.  The
    number is read as qemu_strtoi with base 0 reads it (C's strtol: leading
    blanks, a sign, 0x hex, 0 octal, nothing after it)."""
    if text is None:
        return None
    m = _C_INT.match(text)
    value = 0
    if m:
        digits = m.group(2)
        base = 16 if digits[:2].lower() == "0x" else 8 if digits.startswith("0") else 10
        value = int(digits, base) * (-1 if m.group(1) == "-" else 1)
    return engine.check_coroutines(value)


def parser() -> ArgParser:
    p = ArgParser("convert", DESCRIPTION)
    p.add_argument("-f", dest="fmt", metavar="fmt",
                   help="format of the sources (probed when not given)")
    p.add_argument("-O", dest="out_fmt", metavar="output_fmt",
                   help="format of the target (default: raw)")
    p.add_argument("-o", dest="options", action="append", metavar="options",
                   help="the target's create options, key=value[,...] as for create; "
                        "'-o help' lists them")
    p.add_argument("-c", dest="compressed", action="store_true",
                   help="compress the target's clusters (formats that can, as qcow2)")
    p.add_argument("-p", dest="progress", action="store_true",
                   help="show a progress line on stderr")
    p.add_argument("-q", dest="quiet", action="store_true",
                   help="quiet: no progress line")
    p.add_argument("-S", dest="sparse", metavar="sparse_size",
                   help="shortest run of zeros left as a hole, a multiple of 512 "
                        "(default 4k; 0 writes every byte)")
    p.add_argument("-n", dest="no_create", action="store_true",
                   help="do not create the target: write into an existing image at "
                        "least as large as the sources")
    p.add_argument("-t", dest="cache", metavar="cache",
                   help="the target's cache mode: unsafe (default), writeback, "
                        "writethrough, directsync, none")
    p.add_argument("-T", dest="src_cache", metavar="src_cache",
                   help="the sources' cache mode (default: writeback)")
    p.add_argument("-W", dest="out_of_order", action="store_true",
                   help="with -m, write the target out of order, as reads complete")
    p.add_argument("-m", dest="coroutines", metavar="num_coroutines",
                   help=f"run that many requests concurrently (1 to {MAX_COROUTINES}; "
                        "default 1)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open the sources without locks that keep writers out "
                        "(read-only)")
    p.add_argument("args", nargs="*", metavar="filename",
                   help="the sources, then output_filename")
    return p


def run(argv: list[str]) -> int:
    a = parser().parse_intermixed_args(argv)
    out_fmt = a.out_fmt or "raw"
    coroutines = coroutine_count(a.coroutines)
    items = parse_o(a.options)
    if wants_help(items):
        print(option_help(out_fmt, None))
        return 0
    if len(a.args) < 2:
        raise CliError("Must specify image file name")
    *sources, dst = a.args
    sparse_size = 4096 if a.sparse is None else cvtnum("buffer size for sparse output",
                                                       a.sparse)
    progress = Progress(a.progress and not a.quiet)
    try:
        engine.convert(sources, dst, fmt=out_fmt, src_fmt=a.fmt, options=items,
                       sparse_size=sparse_size, coroutines=coroutines or 1,
                       out_of_order=a.out_of_order, cache=a.cache, src_cache=a.src_cache,
                       skip_create=a.no_create, force_share=a.force_share,
                       progress=progress.update if progress.enabled else None,
                       compressed=a.compressed)
    finally:
        progress.close()
    return 0
