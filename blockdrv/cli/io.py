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

Differences: ``info`` prints no "Format specific information" section (qemu
prints one only for formats blockdrv does not implement); a ``read -v`` of a
huge range streams its dump, so an I/O error in the middle of it leaves a
partial dump where qemu-io prints none.
"""

from __future__ import annotations

import errno as _errno
import os
import re
import sys
import time
from typing import Callable, TextIO

from ..errors import BlockDriverError
from ..iov import IOVector
from ..node import (BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_ZERO, O_RDWR, WRITE_FUA,
                    WRITE_NO_FALLBACK, WRITE_UNMAP, BlockDriverState)

PROG = "blockdrv"
PROMPT = "qemu-io> "
BDRV_REQUEST_MAX_BYTES = 2147483136     # QEMU: INT_MAX rounded down to 512 bytes
READ_CHUNK = 4 << 20                    # reads stream in chunks of this size
PATTERN_CHUNK = 1 << 20                 # writes reuse one pattern buffer of this size
INT64_MAX = (1 << 63) - 1

__all__ = ["main", "run", "QemuIO", "parse_size", "format_size",
           "normalize_qemu_io_output", "SizeError"]


# ---------------------------------------------------------------------------
# Numbers: qemu_strtosz and cvtstr


class SizeError(ValueError):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


_SUFFIX = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_FRACTION = re.compile(r"\.[0-9]*(?:[eE][+-]?[0-9]+)?")


def parse_size(text: str, warn: Callable[[str], None] | None = None) -> int:
    """qemu-io's ``cvtnum``: qemu_strtosz (1024-based suffixes B K M G T P E,
    decimal fractions with a suffix, ``0x`` hex) limited to INT64_MAX.

    Raises :class:`SizeError` with ``code`` EINVAL or ERANGE.
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
    if s[pos:pos + 2].lower() == "0x" and pos + 2 < len(s) and s[pos + 2] in "0123456789abcdefABCDEF":
        pos += 2
        hstart = pos
        while pos < len(s) and s[pos] in "0123456789abcdefABCDEF":
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
    if val >= 1 << 64:
        raise SizeError(_errno.ERANGE, text)
    valf = 0                     # 64-bit fixed-point fraction
    if not hexnum and pos < len(s) and s[pos] == ".":
        m = _FRACTION.match(s, pos)
        frac_text = m.group(0)
        if frac_text == ".":
            pos += 1             # "1.k": a bare dot
        elif "e" in frac_text.lower():
            raise SizeError(_errno.EINVAL, text)
        else:
            valf = int(float(frac_text) * 2.0 ** 64)
            pos = m.end()
    shift = None
    if pos < len(s) and s[pos].lower() in _SUFFIX:
        shift = _SUFFIX[s[pos].lower()]
        if hexnum and warn is not None:
            warn(f"Using a multiplier suffix on hex numbers is deprecated: {text}")
        pos += 1
    if pos != len(s):
        raise SizeError(_errno.EINVAL, text)
    mul = 1 << (shift or 0)
    if mul == 1:
        if valf:
            raise SizeError(_errno.EINVAL, text)
        result = val
    else:
        prod = valf * mul
        result = val * mul + (prod >> 64) + ((prod >> 63) & 1)   # round 0.5 up
        if result >= 1 << 64:
            raise SizeError(_errno.ERANGE, text)
    if result > INT64_MAX:
        raise SizeError(_errno.ERANGE, text)
    return result


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


def _report(out: TextIO, op: str, seconds: float, offset: int, count: int,
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


_TIMING_RE = re.compile(
    r"^(?P<head>.+?, \d+ ops); (?:\d+:)?(?:\d+:)?\d+\.\d+(?: sec)? \(.*/sec and \S+ ops/sec\)$",
    re.M)
_CFLAG_RE = re.compile(r"^(\d+),(\d+),\d+:\d\d:\d\d\.\d\d,[^,\s]+,[^,\s]+$", re.M)
_PREFIX_RE = re.compile(r"^(?:qemu-io|blockdrv(?: io)?): ", re.M)


def normalize_qemu_io_output(text: str) -> str:
    """Mask what differs between two runs of the same script: elapsed times
    and rates of the report lines (also ``-C`` lines) and the program name
    prefixing error_report() lines (``qemu-io: `` / ``blockdrv: ``).

    ``"64 KiB, 1 ops; 00.00 sec (135.6 MiB/sec and 2169.8 ops/sec)"`` becomes
    ``"64 KiB, 1 ops; TIME (RATE/sec and RATE ops/sec)"``.
    """
    text = _TIMING_RE.sub(r"\g<head>; TIME (RATE/sec and RATE ops/sec)", text)
    text = _CFLAG_RE.sub(r"\1,\2,TIME,RATE,RATE", text)
    return _PREFIX_RE.sub("PROG: ", text)


# ---------------------------------------------------------------------------
# GNU getopt (with permutation), as qemu-io's commands and main use it


class _GetoptError(Exception):
    pass


def _getopt(args: list[str], optstring: str, prog: str,
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


# ---------------------------------------------------------------------------
# The command interpreter


class _Command:
    def __init__(self, name: str, func, argmin: int = 0, argmax: int = 0,
                 args: str = "", oneline: str = "", altname: str | None = None,
                 write: bool = False) -> None:
        self.name = name
        self.func = func
        self.argmin = argmin
        self.argmax = argmax
        self.args = args
        self.oneline = oneline
        self.altname = altname
        self.write = write

    def usage(self) -> str:
        return f"{self.name} {self.args} -- {self.oneline}\n"


class _Quit(Exception):
    pass


_PREALLOC = ("off", "metadata", "falloc", "full")


def _strerror(exc: BaseException) -> str:
    code = getattr(exc, "errno", None) or _errno.EIO
    return os.strerror(code)


def _parse_pattern(arg: str) -> int | None:
    """C ``strtol(arg, &end, 0)`` accepting 0..255 and nothing after it."""
    m = re.fullmatch(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", arg)
    if not m:
        return None
    sign, digits = m.groups()
    if digits[:2].lower() == "0x":
        value = int(digits, 16)
    elif digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    if sign == "-":
        value = -value
    return value if 0 <= value <= 255 else None


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
        self.commands: dict[str, _Command] = {}
        for cmd in self._table():
            self.commands[cmd.name] = cmd
            if cmd.altname:
                self.commands[cmd.altname] = cmd

    # -- plumbing ------------------------------------------------------------

    def _table(self) -> list[_Command]:
        return [
            _Command("read", self.read_f, 2, -1,
                     "[-abCqv] [-P pattern [-s off] [-l len]] off len",
                     "reads a number of bytes at a specified offset", "r"),
            _Command("write", self.write_f, 2, -1,
                     "[-bcCfnquz] [-P pattern | -s source_file] off len",
                     "writes a number of bytes at a specified offset", "w", write=True),
            _Command("discard", self.discard_f, 2, -1, "[-Cq] off len",
                     "discards a number of bytes at a specified offset", "d", write=True),
            _Command("flush", self.flush_f, 0, 0, "",
                     "flush all in-core file state to disk", "f"),
            _Command("aio_flush", self.aio_flush_f, 0, 0, "",
                     "completes all outstanding aio requests"),
            _Command("info", self.info_f, 0, 0, "",
                     "prints information about the current file", "i"),
            _Command("length", self.length_f, 0, 0, "",
                     "gets the length of the current file", "l"),
            _Command("map", self.map_f, 0, 0, "",
                     "prints the allocated areas of a file"),
            _Command("alloc", self.alloc_f, 1, 2, "offset [count]",
                     "checks if offset is allocated in the file", "a"),
            _Command("truncate", self.truncate_f, 1, 3, "[-m prealloc_mode] off",
                     "truncates the current file at the given offset", "t", write=True),
            _Command("quit", self.quit_f, 0, 0, "", "exit the program", "q"),
        ]

    def error_report(self, msg: str) -> None:
        self.err.write(f"{self.prog}: {msg}\n")

    def _num(self, arg: str) -> int | None:
        try:
            return parse_size(arg, lambda m: self.error_report("warning: " + m))
        except SizeError as exc:
            if exc.code == _errno.ERANGE:
                self.out.write(f"Parsing error: argument too large -- {arg}\n")
            else:
                self.out.write("Parsing error: non-numeric argument, or "
                               f"extraneous/unrecognized suffix -- {arg}\n")
            return None

    def _getopt(self, cmd: _Command, args: list[str], optstring: str):
        opts, operands, error = _getopt(args, optstring, cmd.name)
        return opts, operands, error

    def _opt_error(self, cmd: _Command, error: str) -> bool:
        self.err.write(error + "\n")
        self.out.write(cmd.usage())
        return False

    def run_command(self, line: str) -> bool:
        """Run one command line; False when it failed (exit status 1).

        Raises :class:`_Quit` for ``quit``.
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
            if cmd.argmax == -1:
                self.err.write(f"bad argument count {nargs} to {argv[0]}, "
                               f"expected at least {cmd.argmin} arguments\n")
            elif cmd.argmin == cmd.argmax:
                self.err.write(f"bad argument count {nargs} to {argv[0]}, "
                               f"expected {cmd.argmin} arguments\n")
            else:
                self.err.write(f"bad argument count {nargs} to {argv[0]}, expected "
                               f"between {cmd.argmin} and {cmd.argmax} arguments\n")
            return False
        if cmd.write and self.bs.read_only:
            self.error_report("Block node is read-only")
            return False
        try:
            return bool(cmd.func(cmd, argv[1:]))
        except _Quit:
            raise
        except BlockDriverError as exc:
            # Errors outside the I/O call itself (they are handled there).
            self.error_report(str(exc))
            return False

    def run_script(self, commands: list[str]) -> int:
        ok = True
        for line in commands:
            try:
                ok = self.run_command(line) and ok
            except _Quit:
                break
        return 0 if ok else 1

    # -- read ----------------------------------------------------------------

    def read_f(self, cmd: _Command, args: list[str]) -> bool:
        opts, operands, error = self._getopt(cmd, args, "bCl:pP:qs:v")
        cflag = qflag = vflag = bflag = pflag = lflag = sflag = False
        pattern = 0
        pattern_offset = pattern_count = 0
        for ch, val in opts:
            if ch == "b":
                bflag = True
            elif ch == "C":
                cflag = True
            elif ch == "l":
                lflag = True
                n = self._num(val)
                if n is None:
                    return False
                pattern_count = n
            elif ch == "p":
                pass                    # ignored for backwards compatibility
            elif ch == "P":
                pflag = True
                p = _parse_pattern(val)
                if p is None:
                    self.out.write(f"{val} is not a valid pattern byte\n")
                    return False
                pattern = p
            elif ch == "q":
                qflag = True
            elif ch == "s":
                sflag = True
                n = self._num(val)
                if n is None:
                    return False
                pattern_offset = n
            elif ch == "v":
                vflag = True
        if error:
            return self._opt_error(cmd, error)
        if len(operands) != 2:
            self.out.write(cmd.usage())
            return False
        offset = self._num(operands[0])
        if offset is None:
            return False
        count = self._num(operands[1])
        if count is None:
            return False
        if count > BDRV_REQUEST_MAX_BYTES:
            self.out.write(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, "
                           f"given {operands[1]}\n")
            return False
        if not pflag and (lflag or sflag):
            self.out.write(cmd.usage())
            return False
        if not lflag:
            pattern_count = count - pattern_offset
        if pattern_count < 0 or pattern_count + pattern_offset > count:
            self.out.write("pattern verification range exceeds end of read data\n")
            return False
        if bflag:
            self.out.write(f"read failed: {os.strerror(_errno.ENOTSUP)}\n")
            return False

        t0 = time.perf_counter()
        mismatch = False
        # qemu prints "Pattern verification failed" before the dump, so the
        # dump waits: in memory for one chunk, spooled to a file beyond.
        dump = _DumpSpool() if vflag and not qflag else None
        try:
            self._check_range(offset, count)
            if count == 0:
                self.bs.pread(offset, 0)
            pat_lo, pat_hi = pattern_offset, pattern_offset + pattern_count
            buf = bytearray(min(count, READ_CHUNK))
            pos = 0
            while pos < count:
                n = min(count - pos, READ_CHUNK)
                view = memoryview(buf)[:n]
                self.bs.preadv(offset + pos, IOVector.from_buffer(view))
                if pflag and not mismatch:
                    lo, hi = max(pat_lo, pos), min(pat_hi, pos + n)
                    if lo < hi and not _all_byte(view[lo - pos:hi - pos], pattern):
                        mismatch = True
                if dump is not None:
                    dump.add(view, offset + pos)
                pos += n
            elapsed = time.perf_counter() - t0
        except BlockDriverError as exc:
            if dump is not None:
                dump.close()
            self.out.write(f"read failed: {_strerror(exc)}\n")
            return False
        if mismatch:
            self.out.write(f"Pattern verification failed at offset "
                           f"{offset + pattern_offset}, {pattern_count} bytes\n")
        if qflag:
            return not mismatch
        if dump is not None:
            dump.write_to(self.out)
        _report(self.out, "read", elapsed, offset, count, count, 1, cflag)
        return not mismatch

    def _check_range(self, offset: int, count: int) -> None:
        """QEMU's blk_check_byte_request: the request must fit in the image."""
        size = self.bs.getlength()
        if offset < 0 or count < 0 or offset > size or count > size - offset:
            from ..errors import BlockIOError
            raise BlockIOError("request beyond the end of the image", errno=_errno.EIO)

    # -- write ---------------------------------------------------------------

    def write_f(self, cmd: _Command, args: list[str]) -> bool:
        opts, operands, error = self._getopt(cmd, args, "bcCfnpP:qs:uz")
        bflag = cflag = Cflag = qflag = zflag = Pflag = sflag = False
        flags = 0
        pattern = 0xCD
        source = None
        for ch, val in opts:
            if ch == "b":
                bflag = True
            elif ch == "c":
                cflag = True
            elif ch == "C":
                Cflag = True
            elif ch == "f":
                flags |= WRITE_FUA
            elif ch == "n":
                flags |= WRITE_NO_FALLBACK
            elif ch == "p":
                pass
            elif ch == "P":
                Pflag = True
                p = _parse_pattern(val)
                if p is None:
                    self.out.write(f"{val} is not a valid pattern byte\n")
                    return False
                pattern = p
            elif ch == "q":
                qflag = True
            elif ch == "s":
                sflag = True
                source = val
            elif ch == "u":
                flags |= WRITE_UNMAP
            elif ch == "z":
                zflag = True
        if error:
            return self._opt_error(cmd, error)
        if len(operands) != 2:
            self.out.write(cmd.usage())
            return False
        if bflag and zflag:
            self.out.write("-b and -z cannot be specified at the same time\n")
            return False
        if flags & WRITE_FUA and (bflag or cflag):
            self.out.write("-f and -b or -c cannot be specified at the same time\n")
            return False
        if flags & WRITE_NO_FALLBACK and not zflag:
            self.out.write("-n requires -z to be specified\n")
            return False
        if flags & WRITE_UNMAP and not zflag:
            self.out.write("-u requires -z to be specified\n")
            return False
        if zflag + Pflag + sflag > 1:
            self.out.write("Only one of -z, -P, and -s can be specified at the same time\n")
            return False
        offset = self._num(operands[0])
        if offset is None:
            return False
        count = self._num(operands[1])
        if count is None:
            return False
        if count > BDRV_REQUEST_MAX_BYTES and not flags & WRITE_NO_FALLBACK:
            self.out.write(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES} "
                           f"without -n, given {operands[1]}\n")
            return False
        if bflag or cflag:
            if offset % 512:
                self.out.write(f"{offset} is not a sector-aligned value for 'offset'\n")
                return False
            if count % 512:
                self.out.write(f"{count} is not a sector-aligned value for 'count'\n")
                return False
        vec = None
        if not zflag:
            if sflag:
                data = self._load_source(source, count)
                if data is None:
                    return False
                vec = IOVector.from_buffer(data)
            else:
                vec = _pattern_vector(pattern, count)
        t0 = time.perf_counter()
        try:
            if bflag or cflag:
                raise BlockDriverError("not supported", errno=_errno.ENOTSUP)
            if zflag:
                self.bs.pwrite_zeroes(offset, count, flags)
            else:
                self.bs.pwritev(offset, vec, flags)
            if self.writethrough and count:
                self.bs.flush()
        except BlockDriverError as exc:
            self.out.write(f"write failed: {_strerror(exc)}\n")
            return False
        elapsed = time.perf_counter() - t0
        if not qflag:
            _report(self.out, "wrote", elapsed, offset, count, count, 1, Cflag)
        return True

    def _load_source(self, path: str, count: int) -> bytes | None:
        try:
            with open(path, "rb") as f:
                data = f.read(count)
        except OSError as exc:
            self.error_report(f"Failed to open file {path}: {exc.strerror}")
            return None
        if not data and count:
            self.error_report(f"Failed to read file {path}: file is empty")
            return None
        if len(data) < count:
            reps = -(-count // len(data))
            data = (data * reps)[:count]
        return data

    # -- discard, flush --------------------------------------------------------

    def discard_f(self, cmd: _Command, args: list[str]) -> bool:
        opts, operands, error = self._getopt(cmd, args, "Cq")
        cflag = any(ch == "C" for ch, _ in opts)
        qflag = any(ch == "q" for ch, _ in opts)
        if error:
            return self._opt_error(cmd, error)
        if len(operands) != 2:
            self.out.write(cmd.usage())
            return False
        offset = self._num(operands[0])
        if offset is None:
            return False
        count = self._num(operands[1])
        if count is None:
            return False
        if count > BDRV_REQUEST_MAX_BYTES:
            self.out.write(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, "
                           f"given {operands[1]}\n")
            return False
        t0 = time.perf_counter()
        try:
            self.bs.pdiscard(offset, count)
        except BlockDriverError as exc:
            self.out.write(f"discard failed: {_strerror(exc)}\n")
            return False
        elapsed = time.perf_counter() - t0
        if not qflag:
            _report(self.out, "discard", elapsed, offset, count, count, 1, cflag)
        return True

    def flush_f(self, cmd: _Command, args: list[str]) -> bool:
        try:
            self.bs.flush()
        except BlockDriverError:
            return False
        return True

    def aio_flush_f(self, cmd: _Command, args: list[str]) -> bool:
        return True     # requests complete synchronously: nothing outstanding

    def quit_f(self, cmd: _Command, args: list[str]) -> bool:
        raise _Quit()

    # -- info, length, map, alloc, truncate --------------------------------------

    def info_f(self, cmd: _Command, args: list[str]) -> bool:
        bs = self.bs
        self.out.write(f"format name: {bs.format_name}\n")
        if bs.drv.bdrv_get_info is None:
            return False            # qemu: bdrv_get_info() fails with ENOTSUP
        info = bs.get_info()
        self.out.write(f"cluster size: {format_size(info.cluster_size)}\n")
        self.out.write(f"vm state offset: {format_size(0)}\n")
        return True

    def length_f(self, cmd: _Command, args: list[str]) -> bool:
        self.out.write(format_size(self.bs.getlength()) + "\n")
        return True

    def _is_allocated(self, offset: int, nbytes: int) -> tuple[bool, int]:
        """bdrv_is_allocated: allocated when the driver reports data, zero or
        allocation (QEMU sets BDRV_BLOCK_ALLOCATED for DATA|ZERO)."""
        st = self.bs.block_status(offset, nbytes, want_zero=False)
        alloc = bool(st.flags & (BLOCK_ALLOCATED | BLOCK_DATA | BLOCK_ZERO))
        return alloc, st.pnum

    def map_f(self, cmd: _Command, args: list[str]) -> bool:
        offset = 0
        remaining = self.bs.getlength()
        try:
            while remaining:
                ret, num = self._is_allocated(offset, min(remaining, BDRV_REQUEST_MAX_BYTES))
                total = num
                while num and remaining - total > 0:
                    r2, n2 = self._is_allocated(
                        offset + total, min(remaining - total, BDRV_REQUEST_MAX_BYTES))
                    if r2 != ret or not n2:
                        break
                    total += n2
                if not total:
                    self.error_report("Unexpected end of image")
                    return False
                word = "    allocated" if ret else "not allocated"
                self.out.write(f"{format_size(total)} (0x{total:x}) bytes {word} at "
                               f"offset {format_size(offset)} (0x{offset:x})\n")
                offset += total
                remaining -= total
        except BlockDriverError as exc:
            self.error_report(f"Failed to get allocation status: {_strerror(exc)}")
            return False
        return True

    def alloc_f(self, cmd: _Command, args: list[str]) -> bool:
        start = offset = self._num(args[0])
        if offset is None:
            return False
        if len(args) == 2:
            count = self._num(args[1])
            if count is None:
                return False
        else:
            count = 512
        remaining = count
        sum_alloc = 0
        try:
            while remaining:
                if offset >= self.bs.getlength():
                    count -= remaining
                    break
                ret, num = self._is_allocated(offset, remaining)
                offset += num
                remaining -= num
                if ret:
                    sum_alloc += num
        except BlockDriverError as exc:
            self.out.write(f"is_allocated failed: {_strerror(exc)}\n")
            return False
        self.out.write(f"{sum_alloc}/{count} bytes allocated at offset "
                       f"{format_size(start)}\n")
        return True

    def truncate_f(self, cmd: _Command, args: list[str]) -> bool:
        opts, operands, error = self._getopt(cmd, args, "m:")
        prealloc = "off"
        for ch, val in opts:
            if ch == "m":
                if val not in _PREALLOC:
                    self.error_report(f"Invalid preallocation mode '{val}'")
                    return False
                prealloc = val
        if error:
            return self._opt_error(cmd, error)
        if len(operands) != 1:
            self.out.write(cmd.usage())
            return False
        offset = self._num(operands[0])
        if offset is None:
            return False
        try:
            self.bs.truncate(offset, exact=False, prealloc=prealloc)
        except BlockDriverError as exc:
            self.error_report(str(exc))
            return False
        return True


class _DumpSpool:
    """Holds the hexdump of a read until it may be printed."""

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


def _all_byte(view, value: int) -> bool:
    n = len(view)
    if not n:
        return True
    step = 1 << 20
    ref = bytes([value]) * min(n, step)
    for pos in range(0, n, step):
        chunk = view[pos:pos + step]
        if chunk.tobytes() != ref[:len(chunk)]:
            return False
    return True


def _pattern_vector(pattern: int, count: int) -> IOVector:
    """``count`` bytes of ``pattern`` as a vector of views over one shared
    buffer of at most PATTERN_CHUNK bytes: one request, bounded memory."""
    block = memoryview(bytes([pattern]) * min(count, PATTERN_CHUNK))
    vec = IOVector()
    pos = 0
    while pos < count:
        n = min(count - pos, len(block))
        vec.add(block[:n])
        pos += n
    return vec


# ---------------------------------------------------------------------------
# main


USAGE = """\
Usage: blockdrv io [OPTIONS]... [-c STRING]... [file]
blockdrv disk exerciser (qemu-io's commands and output)

  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -n, --nocache        disable host cache, short for -t none
  -t, --cache=MODE     cache mode: writethrough (the default: flush after
                       every write), writeback, none, directsync, unsafe
  -d, --discard=MODE   discard mode (accepted, no effect)
  -U, --force-share    force shared permissions (read-only images only)
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See 'blockdrv io -c help' for information on available commands.
"""

_LONGOPTS = {
    "cmd": ("c", True), "format": ("f", True), "read-only": ("r", False),
    "snapshot": ("s", False), "nocache": ("n", False), "copy-on-read": ("C", False),
    "misalign": ("m", False), "native-aio": ("k", False), "aio": ("i", True),
    "cache": ("t", True), "discard": ("d", True), "trace": ("T", True),
    "force-share": ("U", False), "help": ("h", False), "version": ("V", False),
    "object": ("O", True), "image-opts": ("I", False),
}
_CACHE_MODES = ("none", "off", "writeback", "writethrough", "directsync", "unsafe")


def run(argv: list[str], stdout: TextIO | None = None, stderr: TextIO | None = None,
        stdin: TextIO | None = None) -> int:
    """Run ``blockdrv io`` with output to the given streams; returns the exit code."""
    from ..block import open_node

    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    opts, operands, error = _getopt(list(argv), "hVc:d:f:rsnCmki:t:T:U", "blockdrv io",
                                    _LONGOPTS)
    if error:
        err.write(error + "\n")
        err.write("Try 'blockdrv io --help' for more information.\n")
        return 1
    commands: list[str] = []
    fmt = None
    readonly = force_share = False
    writethrough = True
    for ch, val in opts:
        if ch == "c":
            commands.append(val)
        elif ch == "f":
            fmt = val
        elif ch == "r":
            readonly = True
        elif ch == "U":
            force_share = True
        elif ch == "t":
            if val not in _CACHE_MODES:
                err.write(f"{PROG}: Invalid cache option: {val}\n")
                return 1
            writethrough = val in ("writethrough", "directsync")
        elif ch == "n":
            writethrough = False
        elif ch == "d":
            if val not in ("ignore", "off", "unmap", "on"):
                err.write(f"{PROG}: Invalid discard option: {val}\n")
                return 1
        elif ch == "h":
            out.write(USAGE)
            return 0
        elif ch == "V":
            from .. import __version__
            out.write(f"blockdrv io version {__version__}\n")
            return 0
        elif ch in ("s", "I", "O"):
            err.write(f"{PROG}: option -{ch} is not supported\n")
            return 1
        # -C, -m, -k, -i, -T: accepted, no effect
    if len(operands) > 1:
        err.write(f"{PROG}: Too many arguments\n")
        return 1
    if not operands:
        err.write(f"{PROG}: no file open, try 'blockdrv io --help'\n")
        return 1
    filename = operands[0]
    if force_share and not readonly:
        err.write(f"{PROG}: can't open device {filename}: force-share=on can only "
                  "be used with read-only images\n")
        return 1
    try:
        bs = open_node(filename, fmt, 0 if readonly else O_RDWR)
    except BlockDriverError as exc:
        why = str(exc)
        if exc.errno and why == os.strerror(exc.errno):
            why = f"Could not open '{filename}': {why}"
        err.write(f"{PROG}: can't open device {filename}: {why}\n")
        return 1
    if bs.probed_raw and not readonly:
        err.write(f"WARNING: Image format was not specified for '{filename}' and "
                  "probing guessed raw.\n"
                  "         Automatically detecting the format is dangerous for raw "
                  "images, write operations on block 0 will be restricted.\n"
                  "         Specify the 'raw' format explicitly to remove the "
                  "restrictions.\n")
    rc = 0
    try:
        qio = QemuIO(bs, out, err, writethrough=writethrough)
        if commands:
            rc = qio.run_script(commands)
        else:
            rc = _interactive(qio, stdin if stdin is not None else sys.stdin, out)
    finally:
        try:
            if not bs.read_only:
                bs.flush()          # qemu flushes on close
            bs.close()
        except BlockDriverError as exc:
            err.write(f"{PROG}: {exc}\n")
            rc = 1
    return rc


def _interactive(qio: QemuIO, stdin: TextIO, out: TextIO) -> int:
    ok = True
    while True:
        out.write(PROMPT)
        out.flush()
        line = stdin.readline()
        if not line:
            break
        try:
            ok = qio.run_command(line.rstrip("\n")) and ok
        except _Quit:
            break
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``blockdrv io`` (``argv`` without the program name)."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        return run(argv)
    except BrokenPipeError:
        return 1
    except Exception as exc:  # a traceback reaching a user is a bug
        sys.stderr.write(f"{PROG}: internal error: {type(exc).__name__}: {exc}\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
