"""The public API for driver authors: everything a driver needs, one import.

A driver is a plugin object with identity fields and hook implementations;
:mod:`blockdrv.hookspecs` is the contract, one documented hook per QEMU
``BlockDriver`` callback (each docstring says what the hook must do and what
its absence means).  A third-party driver imports only this module (and
:mod:`blockdrv.testing` in its tests) and declares one entry point::

    # pyproject.toml
    [project.entry-points."blockdrv.drivers"]
    myfmt = "mypkg:driver"

    # mypkg/__init__.py
    from blockdrv.driver import BlockStatus, BLOCK_DATA, DriverInfo, hookimpl

    class MyFormat:
        format_name = "myfmt"             # or protocol_name for a protocol
        protocol_name = None

        @hookimpl
        def bdrv_probe(self, buf, filename):
            return 100 if buf.startswith(b"MYFMT") else 0

        @hookimpl
        def bdrv_open(self, bs, options, flags):
            ...                           # read through bs.file, set bs.total_size

        @hookimpl
        async def bdrv_co_readv(self, bs, offset, nbytes, qiov):
            await bs.file.co_preadv(...)

    driver = MyFormat()

What the generic layer guarantees to a format driver (QEMU's block/io.c):

* requests reach ``bdrv_co_readv``/``bdrv_co_writev`` in bounds, non-empty
  (but see ``bdrv_co_writev`` on zero-length writes) and aligned to
  ``bs.request_alignment`` -- unaligned callers get read-modify-write;
* writes never reach a read-only node; flushes go down to ``bs.file``;
* ``bs.file`` (a :class:`BlockDriverState`) is *growable*: a format may write
  past its end to allocate, and reads past its end return zeros;
* the image is locked against other processes before ``bdrv_open`` runs (see
  ``bdrv_child_perm``);
* block status answers are completed by the generic rules listed in
  :meth:`BlockDriverState.co_block_status` (``BLOCK_RAW``, ``BLOCK_RECURSE``).

What a format driver may call on its ``file`` child: :class:`FileChild`, all
awaitable.  A protocol may suspend (an NBD or HTTP client), so every request
a ``bdrv_co_*`` hook makes of ``bs.file`` is awaited; the synchronous
``bs.file.pread``/``pwrite``/``flush``/``truncate`` are for synchronous hooks
(``bdrv_open``, ``bdrv_close``, ``bdrv_check``, ``bdrv_create``) only, and
raise if the protocol suspends.  :mod:`blockdrv.testing.suspending` is a
protocol that suspends on every request, to test a format over.

Create: ``bdrv_create(filename, options)`` receives the ``-o`` options parsed
against the driver's ``create_opts`` (:class:`CreateOption`), ``size``
included; :func:`create_file` gives it a fresh, empty, locked, growable
protocol node.  The generic layer removes the file if creation fails.
"""

from __future__ import annotations

from ._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object       # a plain base at run time: typing stays unimported

from .block import create_file, open_node
from .common import (BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_EOF, BLOCK_OFFSET_VALID, BLOCK_RAW,
                     BLOCK_RECURSE, BLOCK_ZERO, FIX_ERRORS, FIX_LEAKS, O_CHECK, O_FORCE_SHARE,
                     O_NO_BACKING, O_NO_FLUSH, O_NO_IO, O_NOCACHE, O_PROTOCOL, O_RDWR, O_RESIZE,
                     O_UNMAP, WRITE_FUA, WRITE_NO_FALLBACK, WRITE_UNMAP, BlockStatus,
                     CheckResult, DriverInfo, SnapshotInfo, is_aligned, round_down,
                     round_up)
from .errors import (BlockDriverError, BlockIOError, CorruptImageError, InvalidArgumentError,
                     NoSpaceError, PermissionConflictError, ReadOnlyError, UnsupportedError)
from .hookspecs import hookimpl
from .iov import IOVector, buffer_is_zero
from .node import BlockDriverState
from .options import CreateOption, parse_bool, parse_size
from .perm import (PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE,
                   PERM_WRITE_UNCHANGED)


class FileChild(Protocol):
    """The declared protocol of a format driver's ``file`` child (a
    :class:`BlockDriverState`) as seen from ``bdrv_co_*`` hooks."""

    total_size: int
    request_alignment: int

    def getlength(self) -> int: ...
    async def co_preadv(self, offset: int, nbytes: int, qiov: IOVector) -> None: ...
    async def co_pread(self, offset: int, nbytes: int) -> bytearray: ...
    async def co_pwritev(self, offset: int, nbytes: int, qiov: IOVector,
                         flags: int = 0) -> None: ...
    async def co_pwrite(self, offset: int, data, flags: int = 0) -> None: ...
    async def co_pwrite_zeroes(self, offset: int, nbytes: int, flags: int = 0) -> None: ...
    async def co_pdiscard(self, offset: int, nbytes: int) -> None: ...
    async def co_flush(self) -> None: ...
    async def co_truncate(self, size: int, exact: bool = False,
                          prealloc: str = "off") -> None: ...
    async def co_block_status(self, offset: int, nbytes: int,
                              want_zero: bool = True) -> BlockStatus: ...


__all__ = [
    # hooks and nodes
    "hookimpl", "BlockDriverState", "FileChild", "IOVector", "buffer_is_zero",
    # records hooks return
    "BlockStatus", "DriverInfo", "CheckResult", "SnapshotInfo", "CreateOption",
    # open flags
    "O_RDWR", "O_RESIZE", "O_NOCACHE", "O_NO_BACKING", "O_NO_FLUSH", "O_CHECK", "O_UNMAP",
    "O_PROTOCOL", "O_NO_IO", "O_FORCE_SHARE",
    # request flags
    "WRITE_FUA", "WRITE_UNMAP", "WRITE_NO_FALLBACK",
    # block status bits
    "BLOCK_DATA", "BLOCK_ZERO", "BLOCK_OFFSET_VALID", "BLOCK_RAW", "BLOCK_ALLOCATED",
    "BLOCK_EOF", "BLOCK_RECURSE",
    # check
    "FIX_LEAKS", "FIX_ERRORS",
    # permissions (bdrv_child_perm and protocols that lock)
    "PERM_CONSISTENT_READ", "PERM_WRITE", "PERM_WRITE_UNCHANGED", "PERM_RESIZE", "PERM_ALL",
    # helpers
    "create_file", "open_node", "parse_size", "parse_bool",
    "round_up", "round_down", "is_aligned",
    # errors
    "BlockDriverError", "InvalidArgumentError", "CorruptImageError", "UnsupportedError",
    "BlockIOError", "NoSpaceError", "ReadOnlyError", "PermissionConflictError",
]
