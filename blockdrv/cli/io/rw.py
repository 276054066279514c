"""The timed data requests: ``read``, ``write`` and ``discard``.

Each parses its options, then the shared ``off len`` operands
(:func:`~.parse.parse_offset_count`), sends one request and prints qemu-io's
two report lines (or the ``-C`` line) unless ``-q``.
"""

from __future__ import annotations

import errno as _errno
import os
import time
from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Callable

from ...errors import BlockDriverError, BlockIOError
from ...iov import IOVector
from ...common import WRITE_FUA, WRITE_NO_FALLBACK, WRITE_UNMAP
from .command import Command, CommandError, UsageError
from .output import DumpSpool, report, strerror
from .parse import expect_operands, getopt, parse_offset_count, parse_pattern

if TYPE_CHECKING:
    from .qemuio import QemuIO

READ_CHUNK = 4 << 20                    # reads stream in chunks of this size
PATTERN_CHUNK = 1 << 20                 # writes reuse one pattern buffer of this size


def _timed(what: str, request: Callable[[], object]) -> float:
    """Run ``request``; its seconds, or ``<what> failed: <errno text>``."""
    t0 = time.perf_counter()
    try:
        request()
    except BlockDriverError as exc:
        raise CommandError(f"{what} failed: {strerror(exc)}") from None
    return time.perf_counter() - t0


# -- read --------------------------------------------------------------------


def read_f(qio: QemuIO, cmd: Command, args: list[str]) -> bool:
    # -p is accepted and ignored, for backwards compatibility.
    opts, operands, error = getopt(args, "bCl:pP:qs:v", cmd.name)
    given = {ch for ch, _ in opts}
    pflag, qflag = "P" in given, "q" in given
    pattern = pattern_offset = pattern_count = 0
    for ch, val in opts:        # in order: the first bad value is the one reported
        if ch == "l":
            pattern_count = qio.num(val)
        elif ch == "P":
            pattern = parse_pattern(val)
        elif ch == "s":
            pattern_offset = qio.num(val)
    expect_operands(error, operands, 2)
    offset, count = parse_offset_count(operands, qio.warn)
    if not pflag and given & {"l", "s"}:
        raise UsageError()
    if "l" not in given:
        pattern_count = count - pattern_offset
    if pattern_count < 0 or pattern_count + pattern_offset > count:
        raise CommandError("pattern verification range exceeds end of read data")
    if "b" in given:
        raise CommandError(f"read failed: {os.strerror(_errno.ENOTSUP)}")

    t0 = time.perf_counter()
    mismatch = False
    dump = DumpSpool() if "v" in given and not qflag else None
    try:
        _check_range(qio, offset, count)
        if count == 0:
            qio.bs.pread(offset, 0)
        pat_lo, pat_hi = pattern_offset, pattern_offset + pattern_count
        buf = bytearray(min(count, READ_CHUNK))
        pos = 0
        while pos < count:
            n = min(count - pos, READ_CHUNK)
            view = memoryview(buf)[:n]
            qio.bs.preadv(offset + pos, IOVector.from_buffer(view))
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
        raise CommandError(f"read failed: {strerror(exc)}") from None
    if mismatch:
        qio.out.write(f"Pattern verification failed at offset "
                      f"{offset + pattern_offset}, {pattern_count} bytes\n")
    if qflag:
        return not mismatch
    if dump is not None:
        dump.write_to(qio.out)
    report(qio.out, "read", elapsed, offset, count, count, 1, "C" in given)
    return not mismatch


def _check_range(qio: QemuIO, offset: int, count: int) -> None:
    """QEMU's blk_check_byte_request: the request must fit in the image."""
    size = qio.bs.getlength()
    if offset < 0 or count < 0 or offset > size or count > size - offset:
        raise BlockIOError("request beyond the end of the image", errno=_errno.EIO)


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


# -- write -------------------------------------------------------------------


def write_f(qio: QemuIO, cmd: Command, args: list[str]) -> bool:
    # -p is accepted and ignored, for backwards compatibility.
    opts, operands, error = getopt(args, "bcCfnpP:qs:uz", cmd.name)
    given = {ch for ch, _ in opts}
    bflag, cflag, zflag = "b" in given, "c" in given, "z" in given
    flags = 0
    for ch, flag in (("f", WRITE_FUA), ("n", WRITE_NO_FALLBACK), ("u", WRITE_UNMAP)):
        if ch in given:
            flags |= flag
    pattern = 0xCD
    source = None
    for ch, val in opts:        # in order: the first bad -P is reported, the last wins
        if ch == "P":
            pattern = parse_pattern(val)
        elif ch == "s":
            source = val
    expect_operands(error, operands, 2)
    if bflag and zflag:
        raise CommandError("-b and -z cannot be specified at the same time")
    if flags & WRITE_FUA and (bflag or cflag):
        raise CommandError("-f and -b or -c cannot be specified at the same time")
    if flags & WRITE_NO_FALLBACK and not zflag:
        raise CommandError("-n requires -z to be specified")
    if flags & WRITE_UNMAP and not zflag:
        raise CommandError("-u requires -z to be specified")
    if len(given & {"z", "P", "s"}) > 1:
        raise CommandError("Only one of -z, -P, and -s can be specified at the same time")
    offset, count = parse_offset_count(operands, qio.warn, hint=" without -n",
                                       unlimited=bool(flags & WRITE_NO_FALLBACK))
    if bflag or cflag:
        if offset % 512:
            raise CommandError(f"{offset} is not a sector-aligned value for 'offset'")
        if count % 512:
            raise CommandError(f"{count} is not a sector-aligned value for 'count'")
    vec = None
    if not zflag:
        if "s" in given:
            data = _load_source(qio, source, count)
            if data is None:
                return False
            vec = IOVector.from_buffer(data)
        else:
            vec = _pattern_vector(pattern, count)

    def request() -> None:
        if bflag:
            raise BlockDriverError("not supported", errno=_errno.ENOTSUP)
        if zflag:
            qio.bs.pwrite_zeroes(offset, count, flags)
        elif cflag:
            qio.bs.pwritev_compressed(offset, vec)
        else:
            qio.bs.pwritev(offset, vec, flags)
        if qio.writethrough and count:
            qio.bs.flush()

    elapsed = _timed("write", request)
    if "q" not in given:
        report(qio.out, "wrote", elapsed, offset, count, count, 1, "C" in given)
    return True


def _load_source(qio: QemuIO, path: str, count: int) -> bytes | None:
    """``write -s``: ``count`` bytes of the file, repeated if it is shorter."""
    try:
        with open(path, "rb") as f:
            data = f.read(count)
    except OSError as exc:
        qio.error_report(f"Failed to open file {path}: {exc.strerror}")
        return None
    if not data and count:
        qio.error_report(f"Failed to read file {path}: file is empty")
        return None
    if len(data) < count:
        reps = -(-count // len(data))
        data = (data * reps)[:count]
    return data


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


# -- discard -----------------------------------------------------------------


def discard_f(qio: QemuIO, cmd: Command, args: list[str]) -> bool:
    opts, operands, error = getopt(args, "Cq", cmd.name)
    given = {ch for ch, _ in opts}
    expect_operands(error, operands, 2)
    offset, count = parse_offset_count(operands, qio.warn)
    elapsed = _timed("discard", lambda: qio.bs.pdiscard(offset, count))
    if "q" not in given:
        report(qio.out, "discard", elapsed, offset, count, count, 1, "C" in given)
    return True
