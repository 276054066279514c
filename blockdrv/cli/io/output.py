"""What qemu-io prints: sizes (``cvtstr``), the report lines of a request
with their timing (``print_report``), the hexdump of ``read -v``, and the
mask that makes two runs' outputs comparable."""

from __future__ import annotations

import errno as _errno
import os
from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import TextIO


def strerror(exc: BaseException) -> str:
    """The errno text of a failed request (EIO when the error carries none)."""
    code = getattr(exc, "errno", None) or _errno.EIO
    return os.strerror(code)


# ---------------------------------------------------------------------------
# Sizes and report lines: cvtstr, timestr, print_report


def _c_float(value: float, spec: str) -> str:
    if value != value:
        return "-nan" if str(value).startswith("-") else "nan"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def format_size(value: float) -> str:
    """qemu-io's ``cvtstr``: ``64 KiB``, ``1.500 KiB``, ``512 bytes``."""
    units = ((60, " EiB"), (50, " PiB"), (40, " TiB"), (30, " GiB"),
             (20, " MiB"), (10, " KiB"))
    for shift, suffix in units:
        if value >= (1 << shift):
            text = _c_float(value / (1 << shift), ".3f")
            break
    else:
        suffix = " bytes"
        text = _c_float(value, "f")
    idx = text.find(".000")
    if idx >= 0:
        return text[:idx] + suffix
    return text + suffix


def _timestr(seconds: float, verbose: bool) -> str:
    sec = int(seconds)
    frac = seconds - sec
    if verbose or sec:
        return f"{sec // 3600}:{(sec % 3600) // 60:02d}:{sec % 60 + frac:05.2f}"
    return f"{sec % 60 + frac:05.2f} sec"


def _tdiv(value: float, seconds: float) -> float:
    if seconds == 0:
        return float("inf") if value > 0 else float("nan")
    return value / seconds


def report(out: TextIO, op: str, seconds: float, offset: int, count: int,
            total: int, cnt: int, cflag: bool) -> None:
    if not cflag:
        out.write(f"{op} {total}/{count} bytes at offset {offset}\n")
        out.write(f"{format_size(total)}, {cnt} ops; {_timestr(seconds, False)} "
                  f"({format_size(_tdiv(total, seconds))}/sec and "
                  f"{_c_float(_tdiv(cnt, seconds), '.4f')} ops/sec)\n")
    else:
        out.write(f"{total},{cnt},{_timestr(seconds, True)},"
                  f"{_c_float(_tdiv(total, seconds), '.3f')},"
                  f"{_c_float(_tdiv(cnt, seconds), '.3f')}\n")


def normalize_qemu_io_output(text: str) -> str:
    """Mask what differs between two runs of the same script: elapsed times
    and rates of the report lines (also ``-C`` lines) and the program name
    prefixing error_report() lines (``qemu-io: `` / ``blockdrv: ``).

    ``"64 KiB, 1 ops; 00.00 sec (135.6 MiB/sec and 2169.8 ops/sec)"`` becomes
    ``"64 KiB, 1 ops; TIME (RATE/sec and RATE ops/sec)"``.
    """
    import re               # not at module level: no io command needs it
    text = re.sub(r"^(?P<head>.+?, \d+ ops); (?:\d+:)?(?:\d+:)?\d+\.\d+(?: sec)? "
                  r"\(.*/sec and \S+ ops/sec\)$",
                  r"\g<head>; TIME (RATE/sec and RATE ops/sec)", text, flags=re.M)
    text = re.sub(r"^(\d+),(\d+),\d+:\d\d:\d\d\.\d\d,[^,\s]+,[^,\s]+$",
                  r"\1,\2,TIME,RATE,RATE", text, flags=re.M)
    return re.sub(r"^(?:qemu-io|blockdrv(?: io)?): ", "PROG: ", text, flags=re.M)


# ---------------------------------------------------------------------------
# read -v: the hexdump


def _isalnum(b: int) -> bool:
    return 48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122


_PRINTABLE_TABLE = {b: (b if _isalnum(b) else ord(".")) for b in range(256)}


def dump_buffer(out: TextIO, data, offset: int) -> None:
    """qemu-io's hexdump: ``%08x:  `` + 16 ``%02x `` + space + isalnum chars."""
    view = bytes(data)
    hexed = view.hex(" ")                 # "xx xx ..." : 3 chars per byte
    text = view.decode("latin-1").translate(_PRINTABLE_TABLE)
    lines = []
    for i in range(0, len(view), 16):
        n = min(16, len(view) - i)
        lines.append(f"{offset + i:08x}:  {hexed[3 * i:3 * i + 3 * n - 1]}  "
                     f"{text[i:i + n]}\n")
    out.write("".join(lines))


class DumpSpool:
    """Holds the hexdump of a read until it may be printed: qemu prints
    "Pattern verification failed" before the dump, so the dump waits, in
    memory for one chunk, spooled to a temporary file beyond."""

    def __init__(self) -> None:
        self.chunks: list[tuple[bytes, int]] = []
        self.file = None

    def add(self, view, offset: int) -> None:
        if self.file is None and not self.chunks:
            self.chunks.append((bytes(view), offset))
            return
        if self.file is None:
            import tempfile
            self.file = tempfile.TemporaryFile(mode="w+")
            for data, off in self.chunks:
                dump_buffer(self.file, data, off)
            self.chunks.clear()
        dump_buffer(self.file, view, offset)

    def write_to(self, out: TextIO) -> None:
        for data, off in self.chunks:
            dump_buffer(out, data, off)
        if self.file is not None:
            self.file.seek(0)
            while True:
                block = self.file.read(1 << 20)
                if not block:
                    break
                out.write(block)
        self.close()

    def close(self) -> None:
        self.chunks.clear()
        if self.file is not None:
            self.file.close()
            self.file = None

