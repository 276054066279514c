"""The ``blockdrv`` command: qemu-img's subcommands, plus ``io`` (qemu-io).

A thin layer over the library: each command module parses its options,
calls the engine (:mod:`blockdrv.engines`, the core) and prints the result
as qemu-img does.  The commands are listed once, in :mod:`.commands`.

``main(argv)`` returns the exit status and never lets a traceback reach the
user: errors are one line ``blockdrv: <what>`` on stderr; anything unexpected
is reported as ``blockdrv: internal error: ...`` with status 1.
"""

from __future__ import annotations

import sys
from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Callable

from ..errors import BlockDriverError
from .commands import COMMANDS, usage_text
from .common import PROG, CliError, describe, report

__all__ = ["main", "COMMANDS"]

USAGE = usage_text()


def _handler(command: str) -> Callable[[list[str]], int]:
    """The command's ``run``; its module is imported on first use."""
    if command == "io":
        try:
            from . import io as io_cli
        except ImportError as exc:
            raise CliError(f"the io command is not available: {exc}") from None
        return io_cli.main
    # __import__ with a fromlist returns the submodule itself (importlib,
    # with warnings, is not on a short command's path)
    return __import__(f"{__name__}.{COMMANDS[command].module}", fromlist=["run"]).run


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``blockdrv`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else None
    error_status = COMMANDS[command].error_status if command in COMMANDS else 1
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
