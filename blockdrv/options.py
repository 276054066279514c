"""Create options and the value syntax of qemu-img's ``-o key=val,...``."""

from __future__ import annotations

import errno as _errno
from blockdrv._startup import TYPE_CHECKING, dataclass

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Iterable

    Warn = Callable[[str], None]

from .errors import InvalidArgumentError

MAX_SIZE = (1 << 63) - 1
SIZE_LIMIT = 1 << 64             # qemu_strtosz's ERANGE: sizes are uint64_t


class SizeError(ValueError):
    """A size qemu_strtosz refuses: ``code`` is EINVAL (malformed) or ERANGE
    (2^64 or more)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


_SHIFTS = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_DIGITS = "0123456789"


def _fraction_end(s: str, pos: int) -> int:
    """End of the fraction at ``s[pos] == "."``: digits, then an exponent if
    one follows in full (what the regular expression ``[.][0-9]*([eE][+-]?[0-9]+)?``
    matches, by hand: ``re`` costs a short command ~7 ms of imports)."""
    i = pos + 1
    while i < len(s) and s[i] in _DIGITS:
        i += 1
    if i < len(s) and s[i] in "eE":
        j = i + 1 + (i + 1 < len(s) and s[i + 1] in "+-")
        k = j
        while k < len(s) and s[k] in _DIGITS:
            k += 1
        if k > j:
            i = k
    return i
_HEX = "0123456789abcdefABCDEF"


def strtosz(text: str, warn: Warn | None = None) -> int:
    """qemu_strtosz (QEMU 7.2): a decimal number with an optional fraction and
    1024-based suffix B K M G T P E, or ``0x`` hex (a suffix on hex is accepted
    with a deprecation warning through ``warn``); leading white space and
    ``+`` are allowed.  The fraction is rounded exactly as QEMU does
    (``1.0005k`` is 1025).

    Returns 0 .. 2^64 - 1; callers apply their own upper limits.  Raises
    :class:`SizeError` with ``code`` EINVAL or ERANGE.
    """
    s = text
    pos = 0
    while pos < len(s) and s[pos] in " \t\n\v\f\r":
        pos += 1
    if pos < len(s) and s[pos] == "+":
        pos += 1
    elif pos < len(s) and s[pos] == "-":
        raise SizeError(_errno.EINVAL, text)
    start = pos
    hexnum = False
    if s[pos:pos + 2].lower() == "0x" and pos + 2 < len(s) and s[pos + 2] in _HEX:
        pos += 2
        hstart = pos
        while pos < len(s) and s[pos] in _HEX:
            pos += 1
        val = int(s[hstart:pos], 16)
        hexnum = True
        if pos < len(s) and s[pos] == ".":
            raise SizeError(_errno.EINVAL, text)
    else:
        while pos < len(s) and s[pos].isdigit():
            pos += 1
        if pos == start:
            raise SizeError(_errno.EINVAL, text)
        val = int(s[start:pos])
    if val >= SIZE_LIMIT:
        raise SizeError(_errno.ERANGE, text)
    valf = 0                     # 64-bit fixed-point fraction
    if not hexnum and pos < len(s) and s[pos] == ".":
        end = _fraction_end(s, pos)
        frac_text = s[pos:end]
        if frac_text == ".":
            pos += 1             # "1.k": a bare dot
        elif "e" in frac_text.lower():
            raise SizeError(_errno.EINVAL, text)
        else:
            valf = int(float(frac_text) * 2.0 ** 64)
            pos = end
    shift = None
    if pos < len(s) and s[pos].lower() in _SHIFTS:
        shift = _SHIFTS[s[pos].lower()]
        if hexnum and warn is not None:
            warn(f"Using a multiplier suffix on hex numbers is deprecated: {text}")
        pos += 1
    if pos != len(s):
        raise SizeError(_errno.EINVAL, text)
    mul = 1 << (shift or 0)
    if mul == 1:
        if valf:
            raise SizeError(_errno.EINVAL, text)
        return val
    prod = valf * mul
    result = val * mul + (prod >> 64) + ((prod >> 63) & 1)   # round 0.5 up
    if result >= SIZE_LIMIT:
        raise SizeError(_errno.ERANGE, text)
    return result


def _size_value(value: str | int) -> int:
    """:func:`strtosz` of a string; an ``int`` is taken as it is (0 .. 2^64 - 1)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise SizeError(_errno.EINVAL, str(value))
        if value >= SIZE_LIMIT:
            raise SizeError(_errno.ERANGE, str(value))
        return value
    return strtosz(str(value))


def parse_size(text: str | int) -> int:
    """A size for the Python API: an ``int``, or a string in qemu's syntax
    (:func:`strtosz`), 0 .. 2^63 - 1."""
    try:
        value = _size_value(text)
    except SizeError as exc:
        if exc.code != _errno.ERANGE:
            raise InvalidArgumentError(f"Invalid size '{text}'") from None
        value = SIZE_LIMIT
    if value > MAX_SIZE:
        raise InvalidArgumentError(f"Invalid size '{text}': value too large")
    return value


def parse_bool(text: str | bool, name: str = "") -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).lower()
    if low in ("on", "yes", "true", "1"):
        return True
    if low in ("off", "no", "false", "0"):
        return False
    raise InvalidArgumentError(f"Parameter '{name}' expects 'on' or 'off'")


@dataclass(frozen=True)
class CreateOption:
    """One ``-o`` option a driver's create accepts (QEMU's ``QemuOptDesc``)."""

    name: str
    type: str  # "size" | "number" | "bool" | "string"
    help: str = ""
    default: Any = None

    def parse(self, value: Any) -> Any:
        if self.type == "size":
            return self._parse_size(value)
        if self.type == "number":
            try:
                return int(str(value), 0)
            except ValueError:
                raise InvalidArgumentError(
                    f"Parameter '{self.name}' expects a number") from None
        if self.type == "bool":
            return parse_bool(value, self.name)
        return str(value)

    def _parse_size(self, value: Any) -> int:
        """qemu's parse_option_size, limited to MAX_SIZE (qemu would go on
        with a negative int64_t)."""
        try:
            size = _size_value(value)
        except SizeError as exc:
            if exc.code != _errno.ERANGE:
                raise InvalidArgumentError(
                    f"Parameter '{self.name}' expects a non-negative number below 2^64\n"
                    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                    "tera-, peta-\nand exabytes, respectively.") from None
            size = SIZE_LIMIT
        if size > MAX_SIZE:
            raise InvalidArgumentError(
                f"Value '{value}' is out of range for parameter '{self.name}'")
        return size


def split_options(text: str) -> list[tuple[str, str | None]]:
    """Split ``key=val,key2=val2`` honouring qemu's ``,,`` escape for commas."""
    items: list[tuple[str, str | None]] = []
    # once every ",," is replaced, no two commas are adjacent: each remaining
    # one separates two options
    for part in text.replace(",,", "\0").split(","):
        part = part.replace("\0", ",")
        if not part:
            continue
        key, eq, val = part.partition("=")
        items.append((key, val if eq else None))
    return items


def parse_create_options(given: dict[str, Any] | Iterable[tuple[str, Any]],
                         opts: list[CreateOption]) -> dict[str, Any]:
    """Check ``given`` against a driver's options and convert the values.

    Only options the user set are returned; drivers apply their own defaults.
    """
    by_name = {o.name: o for o in opts}
    items = given.items() if isinstance(given, dict) else given
    out: dict[str, Any] = {}
    for key, value in items:
        opt = by_name.get(key)
        if opt is None:
            raise InvalidArgumentError(f"Invalid parameter '{key}'")
        if value is None:
            if opt.type != "bool":
                raise InvalidArgumentError(f"Parameter '{key}' requires a value")
            value = True
        out[key] = opt.parse(value)
    return out
