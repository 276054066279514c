"""argparse for the commands, speaking qemu-img's getopt dialect for errors.

Imported only when a command line needs argparse itself (``--help``, an
error, a form :mod:`.argv` does not read), or when a parser is inspected.
"""

from __future__ import annotations

import argparse
from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any, NoReturn

from .commands import COMMANDS, PROG
from .common import usage_error


class QemuArgumentParser(argparse.ArgumentParser):
    """``--help`` prints the command table's usage line, its summary,
    ``description`` and every option with its help string."""

    def __init__(self, command: str, description: str = "", **kwargs: Any) -> None:
        cmd = COMMANDS[command]
        text = cmd.summary[:1].upper() + cmd.summary[1:] + "."
        super().__init__(prog=f"{PROG} {command}", usage=f"{PROG} {cmd.usage}",
                         description=f"{text}\n\n{description}" if description else text,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    # argparse makes a help formatter to check every option added; with no
    # width given, that asks the terminal through shutil (which imports bz2
    # and lzma).  The width matters only when help is printed.
    _width: int | None = 78

    def _get_formatter(self):
        return self.formatter_class(prog=self.prog, width=self._width)

    def format_help(self) -> str:
        self._width = None
        try:
            return super().format_help()
        finally:
            self._width = 78

    def error(self, message: str) -> NoReturn:
        import re
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m:
            usage_error(f"unrecognized option '{m.group(1)}'")
        m = re.match(r"argument (\S+?)(/\S+)?: expected one argument", message)
        if m:
            usage_error(f"missing argument for option '{m.group(1)}'")
        usage_error(message)


def build(command: str, description: str, kwargs: dict,
          arguments: list[tuple[tuple, dict]]) -> QemuArgumentParser:
    """The parser of ``command`` with these ``add_argument`` declarations."""
    parser = QemuArgumentParser(command, description, **kwargs)
    for names, options in arguments:
        parser.add_argument(*names, **options)
    return parser
