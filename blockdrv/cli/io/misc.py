"""The other commands: ``flush``, ``aio_flush``, ``quit``, ``info``,
``length``, ``map``, ``alloc`` and ``truncate``."""

from __future__ import annotations

from blockdrv._startup import TYPE_CHECKING

from ...errors import BlockDriverError
from ...common import BLOCK_ALLOCATED
from ..common import prealloc_error
from .command import Command, CommandError, Quit
from .output import format_size, strerror
from .parse import BDRV_REQUEST_MAX_BYTES, expect_operands, getopt

if TYPE_CHECKING:
    from .qemuio import QemuIO

# -- flush, quit ---------------------------------------------------------------


def flush_f(qio: QemuIO, cmd: Command, args: list[str]) -> bool:
    try:
        qio.bs.flush()
    except BlockDriverError:
        return False
    return True


def aio_flush_f(qio: QemuIO, cmd: Command, args: list[str]) -> bool:
    return True     # requests complete synchronously: nothing outstanding


def quit_f(qio: QemuIO, cmd: Command, args: list[str]) -> bool:
    raise Quit()


# -- info, length ----------------------------------------------------------------


def info_f(qio: QemuIO, cmd: Command, args: list[str]) -> bool:
    bs = qio.bs
    qio.out.write(f"format name: {bs.format_name}\n")
    if bs.drv.bdrv_get_info is None:
        return False            # qemu: bdrv_get_info() fails with ENOTSUP
    info = bs.get_info()
    qio.out.write(f"cluster size: {format_size(info.cluster_size)}\n")
    qio.out.write(f"vm state offset: {format_size(0)}\n")
    return True


def length_f(qio: QemuIO, cmd: Command, args: list[str]) -> bool:
    qio.out.write(format_size(qio.bs.getlength()) + "\n")
    return True


# -- map, alloc --------------------------------------------------------------------


def _is_allocated(qio: QemuIO, offset: int, nbytes: int) -> tuple[bool, int]:
    """bdrv_is_allocated: whether this layer (not its backing chain) answers
    for the range; the node's generic block status says so."""
    st = qio.bs.block_status(offset, nbytes, want_zero=False)
    return bool(st.flags & BLOCK_ALLOCATED), st.pnum


def map_f(qio: QemuIO, cmd: Command, args: list[str]) -> bool:
    offset = 0
    remaining = qio.bs.getlength()
    try:
        while remaining:
            ret, num = _is_allocated(qio, offset, min(remaining, BDRV_REQUEST_MAX_BYTES))
            total = num
            while num and remaining - total > 0:
                r2, n2 = _is_allocated(
                    qio, offset + total, min(remaining - total, BDRV_REQUEST_MAX_BYTES))
                if r2 != ret or not n2:
                    break
                total += n2
            if not total:
                qio.error_report("Unexpected end of image")
                return False
            word = "    allocated" if ret else "not allocated"
            qio.out.write(f"{format_size(total)} (0x{total:x}) bytes {word} at "
                          f"offset {format_size(offset)} (0x{offset:x})\n")
            offset += total
            remaining -= total
    except BlockDriverError as exc:
        qio.error_report(f"Failed to get allocation status: {strerror(exc)}")
        return False
    return True


def alloc_f(qio: QemuIO, cmd: Command, args: list[str]) -> bool:
    start = offset = qio.num(args[0])
    count = qio.num(args[1]) if len(args) == 2 else 512
    remaining = count
    sum_alloc = 0
    try:
        while remaining:
            if offset >= qio.bs.getlength():
                count -= remaining
                break
            ret, num = _is_allocated(qio, offset, remaining)
            offset += num
            remaining -= num
            if ret:
                sum_alloc += num
    except BlockDriverError as exc:
        raise CommandError(f"is_allocated failed: {strerror(exc)}") from None
    qio.out.write(f"{sum_alloc}/{count} bytes allocated at offset "
                  f"{format_size(start)}\n")
    return True


# -- truncate ----------------------------------------------------------------------


def truncate_f(qio: QemuIO, cmd: Command, args: list[str]) -> bool:
    opts, operands, error = getopt(args, "m:", cmd.name)
    prealloc = "off"
    for ch, val in opts:
        if ch == "m":
            bad = prealloc_error(val)
            if bad:
                qio.error_report(bad)
                return False
            prealloc = val
    expect_operands(error, operands, 1)
    offset = qio.num(operands[0])
    try:
        qio.bs.truncate(offset, exact=False, prealloc=prealloc)
    except BlockDriverError as exc:
        qio.error_report(str(exc))
        return False
    return True
