"""The ``blockdrv io`` program (qemu-io.c): its options, opening the image,
running the ``-c`` commands (or reading them from stdin at a prompt) and
the exit code."""

from __future__ import annotations

import sys
from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Iterator, TextIO

from ...errors import BlockDriverError
from ...common import O_FORCE_SHARE, O_NOCACHE, O_RDWR, O_UNMAP
from ...engines.common import open_reason, parse_cache_mode
from ..common import PROBED_RAW_WARNING
from .parse import getopt
from .qemuio import PROG, QemuIO

PROMPT = "qemu-io> "

USAGE = """\
Usage: blockdrv io [OPTIONS]... [-c STRING]... [file]
blockdrv disk exerciser (qemu-io's commands and output)

  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -n, --nocache        disable host cache, short for -t none
  -t, --cache=MODE     cache mode: writethrough (the default: flush after
                       every write), writeback, none, directsync, unsafe
  -d, --discard=MODE   discard mode: unmap/on (the default: discards reach
                       the driver and the file), or ignore/off (dropped)
  -i, --aio=MODE       AIO mode: only threads (the default) is supported
  -U, --force-share    force shared permissions (read-only images only)
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See 'blockdrv io -c help' for information on available commands.
"""

_LONGOPTS = {
    "cmd": ("c", True), "format": ("f", True), "read-only": ("r", False),
    "snapshot": ("s", False), "nocache": ("n", False), "copy-on-read": ("C", False),
    "misalign": ("m", False), "native-aio": ("k", False), "aio": ("i", True),
    "cache": ("t", True), "discard": ("d", True), "trace": ("T", True),
    "force-share": ("U", False), "help": ("h", False), "version": ("V", False),
    "object": ("O", True), "image-opts": ("I", False),
}

# Options qemu-io has that blockdrv io refuses, and why.
_UNSUPPORTED = {
    "s": "no temporary snapshot overlay",
    "C": "no copy-on-read",
    "m": "misaligned buffers only matter for O_DIRECT, which is not used",
    "k": "no native (kernel) AIO",
    "T": "no trace events",
    "I": "no --image-opts",
    "O": "no --object",
}


def run(argv: list[str], stdout: TextIO | None = None, stderr: TextIO | None = None,
        stdin: TextIO | None = None) -> int:
    """Run ``blockdrv io`` with output to the given streams; returns the exit code."""
    from ...block import DISCARD_MODES, open_node

    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    opts, operands, error = getopt(list(argv), "hVc:d:f:rsnCmki:t:T:U", "blockdrv io",
                                   _LONGOPTS)
    if error:
        err.write(error + "\n")
        err.write("Try 'blockdrv io --help' for more information.\n")
        return 1
    commands: list[str] = []
    fmt = None
    readonly = force_share = False
    # qemu-io passes discards down by default (BDRV_O_UNMAP): O_UNMAP without
    # the open option, so that drivers that act on discards only when asked
    # explicitly (vhdx: qemu's has no discard at all) keep qemu's results.
    options: dict[str, str] = {}
    writethrough = True
    cache_flags = 0           # O_NO_FLUSH for unsafe; O_NOCACHE for none/directsync
    for ch, val in opts:
        if ch == "c":
            commands.append(val)
        elif ch == "f":
            fmt = val
        elif ch == "r":
            readonly = True
        elif ch == "U":
            force_share = True
        elif ch == "t":
            mode = parse_cache_mode(val)
            if mode is None:
                err.write(f"{PROG}: Invalid cache option: {val}\n")
                return 1
            writethrough = mode.writethrough
            cache_flags = mode.flags
        elif ch == "n":
            writethrough = False
            cache_flags = O_NOCACHE
        elif ch == "d":
            if val not in DISCARD_MODES:
                err.write(f"{PROG}: Invalid discard option: {val}\n")
                return 1
            options["discard"] = val
        elif ch == "i":
            if val not in ("threads", "native", "io_uring"):
                err.write(f"{PROG}: Invalid aio option: {val}\n")
                return 1
            if val != "threads":
                err.write(f"{PROG}: aio={val} is not supported (requests run in "
                          "this process; only aio=threads, the default)\n")
                return 1
        elif ch == "h":
            out.write(USAGE)
            return 0
        elif ch == "V":
            from ... import __version__
            out.write(f"blockdrv io version {__version__}\n")
            return 0
        elif ch in _UNSUPPORTED:
            err.write(f"{PROG}: option -{ch} is not supported ({_UNSUPPORTED[ch]})\n")
            return 1
    if len(operands) > 1:
        err.write(f"{PROG}: Too many arguments\n")
        return 1
    if not operands:
        err.write(f"{PROG}: no file open, try 'blockdrv io --help'\n")
        return 1
    filename = operands[0]
    flags = ((0 if readonly else O_RDWR) | (O_FORCE_SHARE if force_share else 0)
             | cache_flags | (0 if "discard" in options else O_UNMAP))
    try:
        bs = open_node(filename, fmt, flags, options)
    except BlockDriverError as exc:
        err.write(f"{PROG}: can't open device {filename}: {open_reason(filename, exc)}\n")
        return 1
    if bs.probed_raw and not readonly:
        err.write(PROBED_RAW_WARNING.format(filename) + "\n")
    rc = 0
    try:
        qio = QemuIO(bs, out, err, writethrough=writethrough)
        lines = commands or _prompted(stdin if stdin is not None else sys.stdin, out)
        rc = qio.run_script(lines)
    finally:
        try:
            bs.close()              # flushes, as qemu's close does
        except BlockDriverError as exc:
            err.write(f"{PROG}: {exc}\n")
            rc = 1
    return rc


def _prompted(stdin: TextIO, out: TextIO) -> Iterator[str]:
    """The lines of an interactive session, each read after a prompt."""
    while True:
        out.write(PROMPT)
        out.flush()
        line = stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``blockdrv io`` (``argv`` without the program name)."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        return run(argv)
    except BrokenPipeError:
        return 1
    except Exception as exc:  # a traceback reaching a user is a bug
        sys.stderr.write(f"{PROG}: internal error: {type(exc).__name__}: {exc}\n")
        return 1
