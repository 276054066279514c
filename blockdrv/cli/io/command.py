"""What a qemu-io command is (qemu-io-cmds.c's ``cmdinfo_t``) and how one fails.

A command function is ``func(qio, cmd, args) -> bool``: False makes the exit
status 1.  Failures whose message goes to stdout are raised instead, so that
parsing helpers can stop the command from any depth without every caller
checking a return value:

* :class:`CommandError` -- one line on stdout (``Parsing error: ...``,
  ``read failed: ...``);
* :class:`UsageError` -- getopt's complaint (if any) on stderr, then the
  command's usage line on stdout, as qemu-io's ``qemuio_command_usage``.
"""

from __future__ import annotations

from blockdrv._startup import TYPE_CHECKING, dataclass

if TYPE_CHECKING:
    from typing import Callable


@dataclass
class Command:
    name: str
    func: Callable
    argmin: int = 0
    argmax: int = 0         # -1: no maximum
    args: str = ""
    oneline: str = ""
    altname: str | None = None
    write: bool = False     # refused on a read-only node

    def usage(self) -> str:
        return f"{self.name} {self.args} -- {self.oneline}\n"


class CommandError(Exception):
    """The command failed; ``str(exc)`` is the line printed on stdout."""


class UsageError(Exception):
    """Bad options or operands; ``getopt_error`` goes to stderr when set."""

    def __init__(self, getopt_error: str | None = None) -> None:
        super().__init__(getopt_error)
        self.getopt_error = getopt_error


class Quit(Exception):
    """``quit``: stop running commands."""
