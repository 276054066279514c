"""Parsing qemu-io's command lines: numbers, getopt, pattern bytes, operands.

Numbers take qemu_strtosz's syntax (``4k``, ``1.5M``, ``0x200``) as qemu-io's
``cvtnum`` accepts them; options are parsed like GNU getopt with permutation
(options may follow operands).  The helpers that stop a command raise
:class:`~.command.CommandError` / :class:`~.command.UsageError` with
qemu-io's messages.
"""

from __future__ import annotations

import errno as _errno
from blockdrv._startup import TYPE_CHECKING

from ...options import SizeError, strtosz
from .command import CommandError, UsageError

if TYPE_CHECKING:
    from ...options import Warn

BDRV_REQUEST_MAX_BYTES = 2147483136     # QEMU: INT_MAX rounded down to 512 bytes
INT64_MAX = (1 << 63) - 1


# ---------------------------------------------------------------------------
# Numbers: qemu_strtosz


def parse_size(text: str, warn: Warn | None = None) -> int:
    """qemu-io's ``cvtnum``: :func:`blockdrv.options.strtosz` (1024-based
    suffixes B K M G T P E, decimal fractions with a suffix, ``0x`` hex)
    limited to INT64_MAX.

    Raises :class:`SizeError` with ``code`` EINVAL or ERANGE.
    """
    value = strtosz(text, warn)
    if value > INT64_MAX:
        raise SizeError(_errno.ERANGE, text)
    return value


def cvtnum(arg: str, warn: Warn | None = None) -> int:
    """:func:`parse_size` with qemu-io's ``Parsing error`` lines."""
    try:
        return parse_size(arg, warn)
    except SizeError as exc:
        if exc.code == _errno.ERANGE:
            raise CommandError(f"Parsing error: argument too large -- {arg}") from None
        raise CommandError("Parsing error: non-numeric argument, or "
                           f"extraneous/unrecognized suffix -- {arg}") from None


def parse_pattern(arg: str) -> int:
    """A ``-P`` pattern byte: C ``strtol(arg, &end, 0)`` accepting 0..255
    and nothing after it."""
    import re               # -P only
    m = re.fullmatch(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", arg)
    value = -1
    if m:
        sign, digits = m.groups()
        if digits[:2].lower() == "0x":
            value = int(digits, 16)
        elif digits.startswith("0"):
            value = int(digits, 8)
        else:
            value = int(digits)
        if sign == "-":
            value = -value
    if not 0 <= value <= 255:
        raise CommandError(f"{arg} is not a valid pattern byte")
    return value


# ---------------------------------------------------------------------------
# Operands shared by the commands


def expect_operands(error: str | None, operands: list[str], n: int) -> None:
    """After the options: a getopt error, or not ``n`` operands, is a usage error."""
    if error:
        raise UsageError(error)
    if len(operands) != n:
        raise UsageError()


def parse_offset_count(operands: list[str], warn: Warn | None = None, *,
                       unlimited: bool = False, hint: str = "") -> tuple[int, int]:
    """The ``off len`` operands of read, write and discard.

    ``len`` is limited to BDRV_REQUEST_MAX_BYTES unless ``unlimited``
    (``write -z -n``); ``hint`` names the way around the limit (`` without -n``).
    """
    offset = cvtnum(operands[0], warn)
    count = cvtnum(operands[1], warn)
    if count > BDRV_REQUEST_MAX_BYTES and not unlimited:
        raise CommandError(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}{hint}, "
                           f"given {operands[1]}")
    return offset, count


# ---------------------------------------------------------------------------
# GNU getopt (with permutation), as qemu-io's commands and main use it


def getopt(args: list[str], optstring: str, prog: str,
           longopts: dict[str, tuple[str, bool]] | None = None):
    """Returns (options, operands, error message or None).

    ``options`` are ``(char, arg)`` in order up to the first error.
    ``longopts`` maps ``name`` -> (short char, takes argument).
    """
    takes = {}
    i = 0
    while i < len(optstring):
        ch = optstring[i]
        if i + 1 < len(optstring) and optstring[i + 1] == ":":
            takes[ch] = True
            i += 2
        else:
            takes[ch] = False
            i += 1
    opts: list[tuple[str, str | None]] = []
    operands: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            operands.extend(args[i:])
            break
        if arg.startswith("--") and longopts is not None:
            name, eq, value = arg[2:].partition("=")
            matches = [n for n in longopts if n.startswith(name)]
            if name in longopts:
                matches = [name]
            if len(matches) != 1:
                kind = "unrecognized" if not matches else "ambiguous"
                return opts, operands, f"{prog}: {kind} option '--{name}'"
            ch, needs = longopts[matches[0]]
            if needs and not eq:
                if i >= len(args):
                    return opts, operands, \
                        f"{prog}: option '--{matches[0]}' requires an argument"
                value = args[i]
                i += 1
            opts.append((ch, value if needs else None))
            continue
        if len(arg) < 2 or not arg.startswith("-"):
            operands.append(arg)
            continue
        j = 1
        while j < len(arg):
            ch = arg[j]
            j += 1
            if ch not in takes or ch == ":":
                return opts, operands, f"{prog}: invalid option -- '{ch}'"
            if takes[ch]:
                if j < len(arg):
                    opts.append((ch, arg[j:]))
                elif i < len(args):
                    opts.append((ch, args[i]))
                    i += 1
                else:
                    return opts, operands, \
                        f"{prog}: option requires an argument -- '{ch}'"
                break
            opts.append((ch, None))
    return opts, operands, None
