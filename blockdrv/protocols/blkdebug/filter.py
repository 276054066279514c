"""The blkdebug filter driver: every request passes through to the ``file`` child."""

from __future__ import annotations

from typing import Any

from ...errors import UnsupportedError
from ...hookspecs import hookimpl
from ...iov import IOVector
from ...common import BLOCK_ZERO, WRITE_FUA, BlockStatus
from ...node import BlockDriverState
from .config import _GLOBAL_KEYS, _OWN_OPTIONS, parse_config, split_filename
from .events import BlkdebugState, _clip_pending, _event, _maybe_suspend


class BlkdebugFilter:
    protocol_name = "blkdebug"
    format_name = None

    @hookimpl
    def bdrv_open(self, bs: BlockDriverState, options, flags) -> None:
        from ...block import open_protocol          # block imports the registry
        options = dict(options or {})
        filename = bs.filename or ""
        if filename.startswith("blkdebug:"):
            cfg_src, child_name = split_filename(filename)
            config: Any = options.get("config", cfg_src or None)
        else:
            child_name = filename
            config = options.get("config")
        if config is None and "rules" in options:
            config = {k: options[k] for k in _GLOBAL_KEYS if k in options}
        cfg = parse_config(config)
        child_opts = options.get("image")
        if child_opts is None:
            child_opts = {k: v for k, v in options.items() if k not in _OWN_OPTIONS}
        s = BlkdebugState(cfg)
        s.buffering = cfg.cache == "volatile" or any(
            r.action == "crash" and r.unflushed != "keep" for r in cfg.rules)
        child = open_protocol(child_name, flags, child_opts)
        child.growable = True
        bs.file = child
        bs.opaque = s
        bs.total_size = child.total_size
        bs.request_alignment = child.request_alignment

    @hookimpl
    def bdrv_close(self, bs: BlockDriverState) -> None:
        s: BlkdebugState = bs.opaque
        if s is not None and not s.crashed and s.pending and bs.file is not None:
            pending, s.pending = s.pending, []
            for offset, data in pending:        # a clean shutdown writes the cache back
                bs.file.pwrite(offset, data)

    @hookimpl
    async def bdrv_co_readv(self, bs, offset, nbytes, qiov: IOVector) -> None:
        s: BlkdebugState = bs.opaque
        _event(bs, "read", offset, nbytes)
        await _maybe_suspend(s)
        await bs.file.co_preadv(offset, nbytes, qiov)
        end = offset + nbytes
        for woff, data in s.pending:            # the volatile cache wins
            wend = woff + len(data)
            if wend <= offset or woff >= end:
                continue
            lo, hi = max(offset, woff), min(end, wend)
            qiov.scatter(lo - offset, memoryview(data)[lo - woff:hi - woff])
        await _maybe_suspend(s)

    @hookimpl
    async def bdrv_co_writev(self, bs, offset, nbytes, qiov: IOVector, flags) -> None:
        s: BlkdebugState = bs.opaque
        if not _event(bs, "write", offset, nbytes):
            return
        if s.config.record:
            s.trace.append(("write", offset, qiov.to_bytes()))
        await _maybe_suspend(s)
        if s.buffering and not flags & WRITE_FUA:
            s.pending.append((offset, qiov.to_bytes()))
        else:
            if s.pending:
                _clip_pending(s, offset, offset + nbytes)
            await bs.file.co_pwritev(offset, nbytes, qiov, flags)
        bs.total_size = max(bs.total_size, offset + nbytes)
        await _maybe_suspend(s)

    @hookimpl
    async def bdrv_co_pwrite_zeroes(self, bs, offset, nbytes, flags) -> None:
        s: BlkdebugState = bs.opaque
        if s.buffering:
            raise UnsupportedError("blkdebug: write-zeroes goes through the write path")
        if not _event(bs, "write", offset, nbytes):
            return
        if s.config.record:
            s.trace.append(("write", offset, bytes(nbytes)))
        await bs.file.co_pwrite_zeroes(offset, nbytes, flags)
        bs.total_size = max(bs.total_size, bs.file.total_size)

    @hookimpl
    async def bdrv_co_pdiscard(self, bs, offset, nbytes) -> None:
        if not _event(bs, "discard", offset, nbytes):
            return
        await bs.file.co_pdiscard(offset, nbytes)

    @hookimpl
    async def bdrv_co_flush(self, bs) -> None:
        s: BlkdebugState = bs.opaque
        if not _event(bs, "flush"):
            # The generic layer still flushes the child: harmless, nothing
            # after the crash ever reached it.
            return
        if s.config.record:
            s.trace.append(("flush",))
        await _maybe_suspend(s)
        pending, s.pending = s.pending, []
        for offset, data in pending:
            await bs.file.co_pwrite(offset, data)

    @hookimpl
    async def bdrv_co_truncate(self, bs, offset, exact, prealloc) -> None:
        s: BlkdebugState = bs.opaque
        if not _event(bs, "truncate", offset, 0):
            bs.total_size = offset
            return
        if s.config.record:
            s.trace.append(("truncate", offset))
        if s.pending and offset < bs.total_size:
            _clip_pending(s, offset, 1 << 62)
        await bs.file.co_truncate(offset, exact, prealloc)
        bs.total_size = offset

    @hookimpl
    async def bdrv_co_block_status(self, bs, want_zero, offset, nbytes) -> BlockStatus:
        child = bs.file
        if offset >= child.total_size:
            return BlockStatus(BLOCK_ZERO, nbytes)
        return await child.co_block_status(offset, nbytes, want_zero)

    @hookimpl
    def bdrv_has_zero_init(self, bs) -> bool:
        return bs.file.has_zero_init()


driver = BlkdebugFilter()
