"""The command interpreter: qemu-io-cmds.c's command table and
``qemuio_command`` (argument counts, the read-only check, failures)."""

from __future__ import annotations

import sys
from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Iterable, TextIO

from ...errors import BlockDriverError
from ...node import BlockDriverState
from . import misc, rw
from .command import Command, CommandError, Quit, UsageError
from .parse import cvtnum

PROG = "blockdrv"

COMMANDS = (
    Command("read", rw.read_f, 2, -1,
            "[-abCqv] [-P pattern [-s off] [-l len]] off len",
            "reads a number of bytes at a specified offset", "r"),
    Command("write", rw.write_f, 2, -1,
            "[-bcCfnquz] [-P pattern | -s source_file] off len",
            "writes a number of bytes at a specified offset", "w", write=True),
    Command("discard", rw.discard_f, 2, -1, "[-Cq] off len",
            "discards a number of bytes at a specified offset", "d", write=True),
    Command("flush", misc.flush_f, 0, 0, "",
            "flush all in-core file state to disk", "f"),
    Command("aio_flush", misc.aio_flush_f, 0, 0, "",
            "completes all outstanding aio requests"),
    Command("info", misc.info_f, 0, 0, "",
            "prints information about the current file", "i"),
    Command("length", misc.length_f, 0, 0, "",
            "gets the length of the current file", "l"),
    Command("map", misc.map_f, 0, 0, "",
            "prints the allocated areas of a file"),
    Command("alloc", misc.alloc_f, 1, 2, "offset [count]",
            "checks if offset is allocated in the file", "a"),
    Command("truncate", misc.truncate_f, 1, 3, "[-m prealloc_mode] off",
            "truncates the current file at the given offset", "t", write=True),
    Command("quit", misc.quit_f, 0, 0, "", "exit the program", "q"),
)


class QemuIO:
    """Runs qemu-io commands on one open node; output goes to ``out``/``err``."""

    def __init__(self, bs: BlockDriverState, out: TextIO | None = None,
                 err: TextIO | None = None, prog: str = PROG,
                 writethrough: bool = True) -> None:
        self.bs = bs
        # qemu-io's default cache mode is writethrough: every write (zero
        # writes included, discards not) is followed by a flush.  It shows in
        # the files: ext4 reports a zeroed range of clean pages as a hole.
        self.writethrough = writethrough
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.prog = prog
        self.commands: dict[str, Command] = {}
        for cmd in COMMANDS:
            self.commands[cmd.name] = cmd
            if cmd.altname:
                self.commands[cmd.altname] = cmd

    def error_report(self, msg: str) -> None:
        self.err.write(f"{self.prog}: {msg}\n")

    def warn(self, msg: str) -> None:
        self.error_report("warning: " + msg)

    def num(self, arg: str) -> int:
        """A number operand; a malformed one fails the command."""
        return cvtnum(arg, self.warn)

    def run_command(self, line: str) -> bool:
        """Run one command line; False when it failed (exit status 1).

        Raises :class:`~.command.Quit` for ``quit``.
        """
        argv = [p for p in line.split(" ") if p]
        if not argv:
            return True
        cmd = self.commands.get(argv[0])
        if cmd is None:
            self.err.write(f'command "{argv[0]}" not found\n')
            return False
        nargs = len(argv) - 1
        if nargs < cmd.argmin or (cmd.argmax != -1 and nargs > cmd.argmax):
            self.err.write(f"bad argument count {nargs} to {argv[0]}, expected "
                           f"{_expected(cmd)} arguments\n")
            return False
        if cmd.write and self.bs.read_only:
            self.error_report("Block node is read-only")
            return False
        try:
            return bool(cmd.func(self, cmd, argv[1:]))
        except CommandError as exc:
            self.out.write(f"{exc}\n")
        except UsageError as exc:
            if exc.getopt_error:
                self.err.write(exc.getopt_error + "\n")
            self.out.write(cmd.usage())
        except BlockDriverError as exc:
            # Errors outside the I/O call itself (they are handled there).
            self.error_report(str(exc))
        return False

    def run_script(self, lines: Iterable[str]) -> int:
        """Run the lines until their end or ``quit``; the exit status."""
        ok = True
        for line in lines:
            try:
                ok = self.run_command(line) and ok
            except Quit:
                break
        return 0 if ok else 1


def _expected(cmd: Command) -> str:
    if cmd.argmax == -1:
        return f"at least {cmd.argmin}"
    if cmd.argmin == cmd.argmax:
        return f"{cmd.argmin}"
    return f"between {cmd.argmin} and {cmd.argmax}"
