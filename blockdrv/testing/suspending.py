"""``suspend``: a filter protocol that really suspends, for testing format drivers.

A format driver may sit on a protocol that suspends (an NBD or HTTP client):
every request it makes of its ``file`` child from a ``bdrv_co_*`` hook must
then be awaited, all the way down.  This filter makes that checkable::

    vhdx --file--> suspend --file--> file

* under a running event loop, every request awaits ``asyncio.sleep(0)``
  before it is forwarded (and counts it in :attr:`SuspendState.sleeps`), so
  concurrent requests really interleave and a format's metadata I/O yields
  like a network protocol's would;
* under a running event loop *and* through :func:`blockdrv.coroutine.run_sync`
  -- a synchronous ``pread``/``pwrite``/``flush`` made from inside a
  coroutine, which a real suspending protocol could not complete -- it raises
  :class:`NestedSyncIOError` instead of forwarding;
* with no event loop (synchronous opens, closes, ``check``) it forwards
  without suspending: synchronous callers pay nothing.

Select it by filename, ``suspend:PATH`` (``PATH`` any filename the child
understands), or by options, ``{"file": {"driver": "suspend"}}``.  The driver
is not an entry point: :func:`register` adds it to the process registry.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from blockdrv.common import BLOCK_ZERO, BlockStatus
from blockdrv.coroutine import in_sync_context
from blockdrv.hookspecs import hookimpl

PREFIX = "suspend:"


class NestedSyncIOError(AssertionError):
    """A request reached the filter through ``run_sync`` inside a running loop."""


@dataclass
class SuspendState:
    sleeps: int = 0                       # requests that suspended
    passthrough: int = 0                  # requests forwarded without a loop
    by_kind: dict = field(default_factory=dict)


def _running_loop():
    aio = sys.modules.get("asyncio")
    return None if aio is None else aio._get_running_loop()


async def _gate(bs, kind: str) -> None:
    """Suspend once if an event loop runs; refuse a nested synchronous call."""
    s: SuspendState = bs.opaque
    s.by_kind[kind] = s.by_kind.get(kind, 0) + 1
    if _running_loop() is None:
        s.passthrough += 1
        return
    if in_sync_context():
        raise NestedSyncIOError(
            f"suspend: synchronous {kind} on {bs.filename!r} from inside a coroutine "
            "(run_sync under a running event loop); await the co_* method instead")
    import asyncio
    s.sleeps += 1
    await asyncio.sleep(0)


class SuspendingFilter:
    protocol_name = "suspend"
    format_name = None

    @hookimpl
    def bdrv_open(self, bs, options, flags) -> None:
        from blockdrv.block import open_protocol
        name = bs.filename or ""
        if name.startswith(PREFIX):
            name = name[len(PREFIX):]
        child_opts = dict((options or {}).get("image") or {})
        child = open_protocol(name, flags, child_opts)
        child.growable = True
        bs.file = child
        bs.opaque = SuspendState()
        bs.total_size = child.total_size
        bs.request_alignment = child.request_alignment

    @hookimpl
    async def bdrv_co_readv(self, bs, offset, nbytes, qiov) -> None:
        await _gate(bs, "read")
        await bs.file.co_preadv(offset, nbytes, qiov)

    @hookimpl
    async def bdrv_co_writev(self, bs, offset, nbytes, qiov, flags) -> None:
        await _gate(bs, "write")
        await bs.file.co_pwritev(offset, nbytes, qiov, flags)
        bs.total_size = max(bs.total_size, bs.file.total_size)

    @hookimpl
    async def bdrv_co_pwrite_zeroes(self, bs, offset, nbytes, flags) -> None:
        await _gate(bs, "write_zeroes")
        await bs.file.co_pwrite_zeroes(offset, nbytes, flags)
        bs.total_size = max(bs.total_size, bs.file.total_size)

    @hookimpl
    async def bdrv_co_pdiscard(self, bs, offset, nbytes) -> None:
        await _gate(bs, "discard")
        await bs.file.co_pdiscard(offset, nbytes)

    @hookimpl
    async def bdrv_co_flush(self, bs) -> None:
        # The generic layer flushes the child after this hook.
        await _gate(bs, "flush")

    @hookimpl
    async def bdrv_co_truncate(self, bs, offset, exact, prealloc) -> None:
        await _gate(bs, "truncate")
        await bs.file.co_truncate(offset, exact, prealloc)
        bs.total_size = offset

    @hookimpl
    async def bdrv_co_block_status(self, bs, want_zero, offset, nbytes) -> BlockStatus:
        await _gate(bs, "block_status")
        child = bs.file
        if offset >= child.total_size:
            return BlockStatus(BLOCK_ZERO, nbytes)
        return await child.co_block_status(offset, nbytes, want_zero)

    @hookimpl
    def bdrv_has_zero_init(self, bs) -> bool:
        return bs.file.has_zero_init()


driver = SuspendingFilter()


def register():
    """Add the filter to the process registry (idempotent); returns the bound driver."""
    from blockdrv.plugins import get_registry
    return get_registry().register(driver)


def state(bs) -> SuspendState:
    """The :class:`SuspendState` of the ``suspend`` node under format node ``bs``."""
    node = bs
    while node is not None and node.drv.name != "suspend":
        node = node.file
    if node is None:
        raise ValueError(f"no suspend node under {bs!r}")
    return node.opaque


__all__ = ["NestedSyncIOError", "SuspendState", "SuspendingFilter", "driver", "register",
           "state", "PREFIX"]
