"""``blockdrv compare``: exit 0 identical, 1 different, 2+ error (qemu-img's codes)."""

from __future__ import annotations

from ..errors import BlockDriverError
from ..iov import buffer_is_zero
from ..mapping import block_status
from ..common import BLOCK_ALLOCATED, BLOCK_ZERO
from ..node import BlockDriverState
from .common import ArgParser, CliError, describe, open_image, qprint, usage_error
from .progress import Progress

IO_BUF_SIZE = 2 << 20
SECTOR = 512


class Different(Exception):
    """The images differ; the message is already printed."""


def _read(bs: BlockDriverState, filename: str, offset: int, nbytes: int) -> bytearray:
    try:
        return bs.pread(offset, nbytes)
    except BlockDriverError as exc:
        raise CliError(f"Error while reading offset {offset} of {filename}: "
                       f"{describe(exc)}", 4) from None


def _status(bs: BlockDriverState, filename: str, offset: int, nbytes: int):
    try:
        return block_status(bs, offset, nbytes)
    except BlockDriverError:
        raise CliError(f"Sector allocation test failed for {filename}", 3) from None


def _first_sector(buf1, buf2=None) -> int:
    """Offset of the first 512-byte sector where ``buf1`` differs from
    ``buf2`` (from zeros without it).  Only called once the memcmp fast
    paths found a difference: numpy (~40 ms to import) locates it."""
    import numpy as np
    a = np.frombuffer(buf1, dtype=np.uint8)
    mask = a if buf2 is None else a != np.frombuffer(buf2, dtype=np.uint8)
    return int(np.flatnonzero(mask)[0]) // SECTOR * SECTOR


def _mismatch(quiet: bool, offset: int) -> None:
    qprint(quiet, f"Content mismatch at offset {offset}!")
    raise Different()


def _check_empty(bs, filename, offset, nbytes, quiet) -> None:
    buf = _read(bs, filename, offset, nbytes)
    if not buffer_is_zero(buf):
        _mismatch(quiet, offset + _first_sector(buf))


def compare(bs1, bs2, name1, name2, strict, quiet, progress) -> None:
    size1, size2 = bs1.total_size, bs2.total_size
    total, base = min(size1, size2), max(size1, size2)
    if strict and size1 != size2:
        qprint(quiet, "Strict mode: Image size mismatch!")
        raise Different()
    offset = 0
    while offset < total:
        st1 = _status(bs1, name1, offset, size1 - offset)
        st2 = _status(bs2, name2, offset, size2 - offset)
        chunk = min(st1.pnum, st2.pnum)
        if strict and st1.flags != st2.flags:
            qprint(quiet, f"Strict mode: Offset {offset} block status mismatch!")
            raise Different()
        alloc1, alloc2 = st1.flags & BLOCK_ALLOCATED, st2.flags & BLOCK_ALLOCATED
        if st1.flags & BLOCK_ZERO and st2.flags & BLOCK_ZERO:
            pass
        elif alloc1 == alloc2:
            if alloc1:
                chunk = min(chunk, IO_BUF_SIZE)
                buf1 = _read(bs1, name1, offset, chunk)
                buf2 = _read(bs2, name2, offset, chunk)
                if buf1 != buf2:
                    _mismatch(quiet, offset + _first_sector(buf1, buf2))
        else:
            chunk = min(chunk, IO_BUF_SIZE)
            if alloc1:
                _check_empty(bs1, name1, offset, chunk, quiet)
            else:
                _check_empty(bs2, name2, offset, chunk, quiet)
        offset += chunk
        progress.update(chunk)
    if size1 != size2:
        qprint(quiet, "Warning: Image size mismatch!")
        over, name = (bs1, name1) if size1 > size2 else (bs2, name2)
        while offset < base:
            st = _status(over, name, offset, base - offset)
            chunk = st.pnum
            if st.flags & BLOCK_ALLOCATED and not st.flags & BLOCK_ZERO:
                chunk = min(chunk, IO_BUF_SIZE)
                _check_empty(over, name, offset, chunk, quiet)
            offset += chunk
            progress.update(chunk)


def run(argv: list[str]) -> int:
    p = ArgParser("compare")
    p.add_argument("-f", dest="fmt1")
    p.add_argument("-F", dest="fmt2")
    p.add_argument("-s", dest="strict", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("args", nargs="*")
    a = p.parse_intermixed_args(argv)
    if len(a.args) != 2:
        usage_error("Expecting two image file names")
    name1, name2 = a.args
    try:
        bs1 = open_image(name1, a.fmt1, force_share=a.force_share)
    except CliError as exc:
        exc.code = 2
        raise
    try:
        try:
            bs2 = open_image(name2, a.fmt2, force_share=a.force_share)
        except CliError as exc:
            exc.code = 2
            raise
        progress = Progress(a.progress and not a.quiet,
                            max(bs1.total_size, bs2.total_size))
        try:
            compare(bs1, bs2, name1, name2, a.strict, a.quiet, progress)
        except Different:
            return 1
        finally:
            progress.close()
            bs2.close()
    finally:
        bs1.close()
    qprint(a.quiet, "Images are identical.")
    return 0
