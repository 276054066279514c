"""What every qemu-img-like command shares: errors, sizes, JSON, opening images."""

from __future__ import annotations

import errno as _errno
import sys
from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any, NoReturn

    from ..options import Warn

from ..block import open_node
from ..common import O_CHECK, O_FORCE_SHARE, O_RDWR, PREALLOC_MODES
from ..errors import BlockDriverError
from ..node import BlockDriverState
from ..options import SIZE_LIMIT, SizeError
from ..options import strtosz as _strtosz

from .argv import ArgParser
from .commands import COMMANDS, PROG

MAX_SIZE = (1 << 63) - 1


class CliError(Exception):
    """A failure already worded for the user; ``main`` prints it and exits ``code``."""

    def __init__(self, message: str, code: int = 1, hint: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.hint = hint  # add qemu's "Try '... --help'" line (usage errors)

    def after(self) -> None:
        """Lines qemu-img prints after the error (warnings); none by default."""


def usage_error(message: str) -> NoReturn:
    raise CliError(message, 1, hint=True)


def report(message: str) -> None:
    """One error line on stderr, ``blockdrv: <message>``."""
    text = " ".join(line for line in str(message).splitlines() if line)
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def describe(exc: BaseException) -> str:
    """The user-facing text of a library error (without the program prefix)."""
    if isinstance(exc, BlockDriverError):
        return exc.message
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def add_output_option(parser: ArgParser) -> None:
    parser.add_argument("--output", default=None, metavar="ofmt",
                        help="output format: human (default) or json")


def output_format(value: str | None) -> str:
    if value is None or value == "human":
        return "human"
    if value == "json":
        return "json"
    raise CliError("--output must be used with human or json as argument.")


# -- sizes ---------------------------------------------------------------------

def warn(message: str) -> None:
    """qemu's warn_report: ``blockdrv: warning: <message>`` on stderr."""
    report(f"warning: {message}")


def strtosz(text: str, warn: Warn | None = None) -> int | None:
    """:func:`blockdrv.options.strtosz` for the commands: ``None`` when
    malformed; values of 2^64 and more (ERANGE) come back as 2^64, so any
    upper limit of the caller refuses them.  ``warn`` gets the deprecation
    warning of a suffix on a hex number."""
    try:
        return _strtosz(text, warn)
    except SizeError as exc:
        return SIZE_LIMIT if exc.code == _errno.ERANGE else None


def cvtnum(name: str, text: str) -> int:
    """Parse a size argument with qemu-img's error messages (its cvtnum)."""
    value = strtosz(text, warn)
    if value is None:
        raise CliError(f"Invalid {name} specified. You may use k, M, G, T, P or E "
                       "suffixes for kilobytes, megabytes, gigabytes, terabytes, "
                       "petabytes and exabytes.")
    if value > MAX_SIZE:
        raise CliError(f"Invalid {name} specified. Must be between 0 and {MAX_SIZE}.")
    return value


def _frexp_exponent(x: float) -> int:
    """``math.frexp(x)[1]`` for x >= 0 (math is an extension module to load
    for a single call): e with x = m * 2**e, 0.5 <= m < 1; 0 for 0."""
    x = float(x)
    if x >= 1.0:
        return int(x).bit_length()
    e = 0
    while x and x < 0.5:
        x *= 2.0
        e -= 1
    return e


def size_to_str(value: int) -> str:
    """qemu's size_to_str: three significant digits, binary units."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    exp = _frexp_exponent(value / (1000.0 / 1024.0))
    i = max(0, (exp - 1) // 10)
    i = min(i, len(suffixes) - 1)
    return "%0.3g %sB" % (value / float(1 << (i * 10)), suffixes[i])


# -- preallocation modes ---------------------------------------------------------------


def prealloc_error(mode: str) -> str | None:
    """qemu's message for a PreallocMode it does not know, else ``None``."""
    return None if mode in PREALLOC_MODES else f"Invalid preallocation mode '{mode}'"


# -- JSON as QEMU prints it --------------------------------------------------------

def _qdict_bucket(key: str) -> int:
    """Bucket of ``key`` in QEMU's QDict (tdb hash, 512 buckets): qemu-img
    prints dictionaries in bucket order, which fixes their key order."""
    data = key.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, ch in enumerate(data):
        value = (value + (ch << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512


def qdict_order(obj: Any) -> Any:
    """``obj`` with every dict re-ordered as a QEMU QDict iterates."""
    if isinstance(obj, dict):
        items = list(obj.items())
        # Same bucket: QDict inserts at the head, so later keys come first.
        ordered = sorted(enumerate(items), key=lambda p: (_qdict_bucket(p[1][0]), -p[0]))
        return {k: qdict_order(v) for _, (k, v) in ordered}
    if isinstance(obj, (list, tuple)):
        return [qdict_order(v) for v in obj]
    return obj


def qjson(obj: Any) -> str:
    """qobject_to_json_pretty: 4-space indentation, QDict key order."""
    import json     # only for --output=json (json imports re anyway)
    import re
    text = json.dumps(qdict_order(obj), indent=4)
    # qemu writes \uXXXX escapes with upper-case hex digits; an escape is one
    # whose backslash is not itself escaped (an odd run of backslashes)
    return re.sub(r"(\\+)u([0-9a-f]{4})",
                  lambda m: m.group(0) if len(m.group(1)) % 2 == 0
                  else m.group(1) + "u" + m.group(2).upper(), text)


def dump_human(obj: dict, indent: int = 1) -> list[str]:
    """qemu's dump_qdict: ``key: value`` lines, dashes shown as spaces."""
    return _dump(_dict_items(qdict_order(obj)), indent)


def _dict_items(obj: dict):
    return ((key.replace("-", " "), value) for key, value in obj.items())


def _dump(items, indent: int) -> list[str]:
    """``label: value`` lines; dicts and lists nest one level deeper (lists
    labelled ``[i]``, as qemu's dump_qlist).  Dicts are already in QDict
    order (re-ordering is not idempotent for keys sharing a bucket)."""
    lines: list[str] = []
    pad = " " * (indent * 4)
    for label, value in items:
        if isinstance(value, dict):
            lines.append(f"{pad}{label}:")
            lines.extend(_dump(_dict_items(value), indent + 1))
        elif isinstance(value, list):
            lines.append(f"{pad}{label}:")
            lines.extend(_dump(((f"[{i}]", v) for i, v in enumerate(value)), indent + 1))
        else:
            lines.append(f"{pad}{label}: {_scalar(value)}")
    return lines


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


# -- opening images ----------------------------------------------------------------

PROBED_RAW_WARNING = (
    "WARNING: Image format was not specified for '{0}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, "
    "write operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.")


def open_image(filename: str, fmt: str | None, writable: bool = False,
               check: bool = False, flags: int = 0,
               force_share: bool = False) -> BlockDriverState:
    """Open for a command; errors become :class:`CliError` worded like qemu-img.
    ``flags``: extra open flags (``O_NO_FLUSH`` for cache=unsafe);
    ``force_share``: qemu-img's ``-U``."""
    flags |= ((O_RDWR if writable else 0) | (O_CHECK if check else 0)
              | (O_FORCE_SHARE if force_share else 0))
    try:
        bs = open_node(filename, fmt, flags)
    except (BlockDriverError, OSError) as exc:
        from ..engines.common import open_error     # the error path only
        raise CliError(open_error(filename, exc)) from None
    if bs.probed_raw and writable:
        print(PROBED_RAW_WARNING.format(filename), file=sys.stderr, flush=True)
    return bs


def qprint(quiet: bool, text: str = "", end: str = "\n") -> None:
    if not quiet:
        sys.stdout.write(text + end)
