"""Create options and the value syntax of qemu-img's ``-o key=val,...``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import InvalidArgumentError

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30,
             "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([bkmgtpeBKMGTPE]?)\s*$")
MAX_SIZE = (1 << 63) - 1


def parse_size(text: str | int, default_suffix: str = "") -> int:
    """Parse qemu's size syntax: a number with an optional k/M/G/T/P/E suffix
    (powers of 1024).  Fractions are allowed with a suffix ("1.5G")."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgumentError(f"Invalid size '{text}'")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise InvalidArgumentError(f"Invalid size '{text}'")
    number, suffix = match.groups()
    suffix = (suffix or default_suffix).lower()
    mult = _SUFFIXES[suffix]
    if "." in number:
        if mult == 1:
            raise InvalidArgumentError(f"Invalid size '{text}': fractions need a suffix")
        value = int(float(number) * mult)
    else:
        value = int(number) * mult
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
            try:
                return parse_size(value)
            except InvalidArgumentError:
                raise InvalidArgumentError(
                    f"Parameter '{self.name}' expects a non-negative number below 2^64\n"
                    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
                    "peta-\nand exabytes, respectively.") from None
        if self.type == "number":
            try:
                return int(str(value), 0)
            except ValueError:
                raise InvalidArgumentError(
                    f"Parameter '{self.name}' expects a number") from None
        if self.type == "bool":
            return parse_bool(value, self.name)
        return str(value)


def split_options(text: str) -> list[tuple[str, str | None]]:
    """Split ``key=val,key2=val2`` honouring qemu's ``,,`` escape for commas."""
    items: list[tuple[str, str | None]] = []
    for part in re.split(r"(?<!,),(?!,)", text.replace(",,", "\0")):
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


def format_help(opts: list[CreateOption]) -> str:
    """``-o help`` text, laid out as qemu-img prints it."""
    lines = ["Supported options:"]
    for o in opts:
        typ = {"size": "size", "number": "num", "bool": "bool", "string": "str"}[o.type]
        head = f"  {o.name}=<{typ}>"
        if o.help:
            lines.append(f"{head:<24} - {o.help}")
        else:
            lines.append(head)
    return "\n".join(lines) + "\n"
