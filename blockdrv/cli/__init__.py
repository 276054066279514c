"""The ``blockdrv`` command: qemu-img's subcommands, plus ``io`` (qemu-io).

``main(argv)`` returns the exit status and never lets a traceback reach the
user: errors are one line ``blockdrv: <what>`` on stderr; anything unexpected
is reported as ``blockdrv: internal error: ...`` with status 1.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from ..errors import BlockDriverError
from .common import PROG, CliError, describe, report

__all__ = ["main"]

# command -> (module, function); modules are imported on first use.
COMMANDS: dict[str, tuple[str, str]] = {
    "create": ("create", "run"),
    "info": ("info", "run_info"),
    "check": ("info", "run_check"),
    "map": ("map", "run"),
    "compare": ("compare", "run"),
    "convert": ("convert", "run"),
    "resize": ("resize", "run"),
    "bench": ("bench", "main"),
    "nbd": ("nbd", "run"),
}

# compare reports errors with status 2 (1 means "different").
_ERROR_STATUS = {"compare": 2}

USAGE = f"""\
usage: {PROG} command [command options]
QEMU's block layer in Python: a qemu-img-like disk image utility

Command syntax:
  check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-U] filename
  compare [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2
  convert [-m num_coroutines] [-W] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-o options] [-S sparse_size] [-U] filename [filename2 [...]] output_filename
  create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
  info [-f fmt] [--output=ofmt] [-U] filename
  map [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename
  resize [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size
  bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename
  io [-f fmt] [-r] [-t cache] [-d discard] [-U] -c command ... filename    (qemu-io's; 'blockdrv io --help')

'-U' (force-share) only goes with read-only opens (convert: the sources).
'-m' runs that many requests concurrently (asyncio tasks; without it, one
at a time); the target is written in order unless '-W'.  '-u' (do not open
the backing file) is refused for vhdx, whose children need their parent.
A convert target that is one of its sources (or their backing files),
under any name, is refused before anything is written.
'size' accepts the suffixes k, M, G, T, P and E (powers of 1024).
'ofmt' is 'human' or 'json'.  Exit codes follow qemu-img (check: 0 clean,
2 corruptions, 3 leaks, 1 error, 63 no check support; compare: 0 identical,
1 different, 2 error)."""


def _handler(command: str) -> Callable[[list[str]], int]:
    module, func = COMMANDS[command]
    mod = importlib.import_module(f"{__name__}.{module}")
    return getattr(mod, func)


def _run_io(argv: list[str]) -> int:
    try:
        from . import io as io_cli
    except ImportError as exc:
        raise CliError(f"the io command is not available: {exc}") from None
    return io_cli.main(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``blockdrv`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else None
    error_status = _ERROR_STATUS.get(command or "", 1)
    try:
        if command is None:
            raise CliError("Not enough arguments", hint=True)
        if command in ("-h", "--help", "help"):
            print(USAGE)
            return 0
        if command in ("-V", "--version"):
            from .. import __version__
            print(f"{PROG} version {__version__}")
            return 0
        if command == "io":
            return _run_io(args[1:])
        if command not in COMMANDS:
            raise CliError(f"Command not found: {command}", hint=True)
        return _handler(command)(args[1:])
    except CliError as exc:
        report(exc.message)
        if exc.hint:
            print(f"Try '{PROG} --help' for more information", file=sys.stderr)
        exc.after()
        return exc.code
    except BlockDriverError as exc:
        where = f"'{exc.filename}': " if exc.filename else ""
        report(f"{where}{describe(exc)}")
        return error_status
    except BrokenPipeError:
        return 1
    except OSError as exc:
        where = f"'{exc.filename}': " if exc.filename else ""
        report(f"{where}{describe(exc)}")
        return error_status
    except KeyboardInterrupt:
        report("interrupted")
        return 130
    except SystemExit as exc:      # argparse's -h
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        report(f"internal error: {type(exc).__name__}: {exc}")
        return 1
    finally:
        try:
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            pass
