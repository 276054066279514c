"""The ``blockdrv io`` program (qemu-io.c): its options, opening the image,
running the ``-c`` commands (or reading them from stdin at a prompt) and
the exit code."""

from __future__ import annotations

import sys
from typing import Iterator, TextIO

from ...errors import BlockDriverError
from ...node import O_FORCE_SHARE, O_RDWR
from ..common import PROBED_RAW_WARNING, open_reason, parse_cache_mode
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
  -d, --discard=MODE   discard mode (accepted, no effect)
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


def run(argv: list[str], stdout: TextIO | None = None, stderr: TextIO | None = None,
        stdin: TextIO | None = None) -> int:
    """Run ``blockdrv io`` with output to the given streams; returns the exit code."""
    from ...block import open_node

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
    writethrough = True
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
        elif ch == "n":
            writethrough = False
        elif ch == "d":
            if val not in ("ignore", "off", "unmap", "on"):
                err.write(f"{PROG}: Invalid discard option: {val}\n")
                return 1
        elif ch == "h":
            out.write(USAGE)
            return 0
        elif ch == "V":
            from ... import __version__
            out.write(f"blockdrv io version {__version__}\n")
            return 0
        elif ch in ("s", "I", "O"):
            err.write(f"{PROG}: option -{ch} is not supported\n")
            return 1
        # -C, -m, -k, -i, -T: accepted, no effect
    if len(operands) > 1:
        err.write(f"{PROG}: Too many arguments\n")
        return 1
    if not operands:
        err.write(f"{PROG}: no file open, try 'blockdrv io --help'\n")
        return 1
    filename = operands[0]
    if force_share and not readonly:
        err.write(f"{PROG}: can't open device {filename}: force-share=on can only "
                  "be used with read-only images\n")
        return 1
    try:
        bs = open_node(filename, fmt, (0 if readonly else O_RDWR)
                       | (O_FORCE_SHARE if force_share else 0))
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
