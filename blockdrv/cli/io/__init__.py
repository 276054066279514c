"""``blockdrv io``: a qemu-io clone.

``blockdrv io [-f FMT] [-r] [-c CMD]... FILE`` opens the image through
:func:`blockdrv.block.open_node` and runs each command as qemu-io 7.2 does,
printing the same lines on the same streams and exiting as qemu-io exits
(1 when any command failed), so one script can be replayed on both tools and
the outputs compared after :func:`normalize_qemu_io_output` has masked the
timing figures.

Commands: ``read``/``r``, ``write``/``w``, ``discard``/``d``, ``flush``/``f``,
``aio_flush``, ``info``/``i``, ``map``, ``alloc``/``a``, ``length``/``l``,
``truncate``/``t``, ``quit``/``q``.  Numbers take qemu's size syntax
(``4k``, ``1.5M``, ``0x200``); options are parsed like GNU getopt (options
may follow operands).

Behaviour reproduced from qemu-io 7.2 (found by running it):

* messages of a command go to stdout (``read failed: Input/output error``,
  ``Parsing error: ...``, usage lines), except getopt's ``invalid option``,
  ``bad argument count ...``, ``command "x" not found`` and error_report()
  lines (``qemu-io: Block node is read-only``), which go to stderr; here the
  ``qemu-io:`` prefix is ``blockdrv:``;
* every failed command (usage, parse error, I/O error, failed pattern
  verification) makes the exit status 1, and the following commands still run;
* a request that does not fit in the image fails with EIO;
* lengths are limited to 2147483136 bytes (``BDRV_REQUEST_MAX_BYTES``).

Modules: :mod:`.session` (the program: options, opening the image, exit
code), :mod:`.qemuio` (command table and dispatch), :mod:`.rw` (read, write,
discard), :mod:`.misc` (the other commands), :mod:`.parse` (numbers, getopt,
operands), :mod:`.output` (report lines, sizes, hexdump), :mod:`.command`
(what a command is and how it fails).

Differences: ``info`` prints no "Format specific information" section (qemu
prints one only for formats blockdrv does not implement); a ``read -v`` of a
huge range streams its dump, so an I/O error in the middle of it leaves a
partial dump where qemu-io prints none.
"""

from .output import format_size, normalize_qemu_io_output
from .parse import SizeError, parse_size
from .qemuio import QemuIO
from .session import main, run

__all__ = ["main", "run", "QemuIO", "parse_size", "format_size",
           "normalize_qemu_io_output", "SizeError"]
