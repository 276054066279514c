"""Awaitable file access for the VHDX metadata paths.

Everything the driver does to its ``file`` child from a ``bdrv_co_*`` hook
is awaited (the protocol may suspend: NBD, HTTP).  The journal and replay
code is written once, against the awaitable protocol
(:class:`blockdrv.driver.FileChild`); :func:`as_async` lets the same code run
over a plain synchronous file object (the log tests' in-memory files, a
POSIX file) by wrapping its methods in coroutines that never suspend, and
:func:`blocking` runs such a coroutine from synchronous code (open, check).
"""

from __future__ import annotations

from blockdrv.coroutine import run_sync

blocking = run_sync


class _SyncFile:
    """A synchronous ``pread/pwrite/flush/truncate/getlength`` object, awaitable."""

    __slots__ = ("_f",)

    def __init__(self, f) -> None:
        self._f = f

    def getlength(self) -> int:
        return self._f.getlength()

    async def co_pread(self, offset: int, nbytes: int):
        return self._f.pread(offset, nbytes)

    async def co_pwrite(self, offset: int, data, flags: int = 0) -> None:
        self._f.pwrite(offset, data)

    async def co_flush(self) -> None:
        self._f.flush()

    async def co_truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        self._f.truncate(size)


def as_async(f):
    """``f`` itself when it is a block node (awaitable I/O), else an adapter."""
    return f if hasattr(f, "co_preadv") or isinstance(f, _SyncFile) else _SyncFile(f)


def as_async_callback(fn):
    """A header callback as a coroutine function (sync test callbacks are wrapped)."""
    import inspect
    if inspect.iscoroutinefunction(fn):
        return fn

    async def call(*args):
        result = fn(*args)
        if inspect.isawaitable(result):
            await result
    return call
