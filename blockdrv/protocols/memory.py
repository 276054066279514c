"""The ``memory`` protocol: an image held in a named in-process buffer.

``memory:NAME`` refers to one buffer for the life of the process, so an image
can be created, closed and opened again; :func:`discard` forgets it.  Used by
the unit tests and the conformance suite, and handy for scratch images.
"""

from __future__ import annotations

import threading

from ..errors import InvalidArgumentError
from ..hookspecs import hookimpl
from ..iov import IOVector
from ..common import BLOCK_DATA, BLOCK_OFFSET_VALID, BlockStatus

_store: dict[str, bytearray] = {}
_lock = threading.Lock()


def _name(filename: str | None) -> str:
    name = filename or ""
    return name[7:] if name.startswith("memory:") else name


def buffer(name: str) -> bytearray:
    """The buffer behind ``memory:name`` (for tests)."""
    return _store[_name(name)]


def discard(name: str) -> None:
    _store.pop(_name(name), None)


class MemoryProtocol:
    protocol_name = "memory"
    format_name = None

    @hookimpl
    def bdrv_open(self, bs, options, flags) -> None:
        name = _name(bs.filename)
        with _lock:
            if options.get("create"):
                _store[name] = bytearray()
            elif name not in _store:
                raise InvalidArgumentError("No such memory image", errno=2)
            bs.opaque = _store[name]
        bs.total_size = len(bs.opaque)

    @hookimpl
    async def bdrv_co_readv(self, bs, offset, nbytes, qiov: IOVector) -> None:
        buf: bytearray = bs.opaque
        view = memoryview(buf)
        avail = max(0, min(nbytes, len(buf) - offset))
        qiov.scatter(0, view[offset:offset + avail])
        if avail < nbytes:
            qiov.memset(avail, nbytes - avail)

    @hookimpl
    async def bdrv_co_writev(self, bs, offset, nbytes, qiov: IOVector, flags) -> None:
        buf: bytearray = bs.opaque
        end = offset + nbytes
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        pos = offset
        for view in qiov.iov:
            buf[pos:pos + len(view)] = view
            pos += len(view)

    @hookimpl
    async def bdrv_co_block_status(self, bs, want_zero, offset, nbytes) -> BlockStatus:
        return BlockStatus(BLOCK_DATA | BLOCK_OFFSET_VALID, nbytes, offset, bs)

    @hookimpl
    async def bdrv_co_truncate(self, bs, offset, exact, prealloc) -> None:
        buf: bytearray = bs.opaque
        if offset < len(buf):
            del buf[offset:]
        else:
            buf.extend(bytes(offset - len(buf)))
        bs.total_size = offset

    @hookimpl
    def bdrv_get_allocated_file_size(self, bs) -> int:
        return len(bs.opaque)

    @hookimpl
    def bdrv_has_zero_init(self, bs) -> bool:
        return True


driver = MemoryProtocol()
