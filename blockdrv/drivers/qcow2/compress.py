"""Compressed cluster writes (qemu 7.2's qcow2_co_pwritev_compressed_part).

One guest cluster at a time: the cluster (the image's partial last one
zero-padded) is compressed with the image's compression type into at most
``cluster_size - 1`` bytes; data that does not fit is written as an ordinary
cluster instead.  Compressed data is packed byte by byte into host clusters
(qemu's qcow2_alloc_bytes): the next piece goes right after the previous
one, spilling into the following host cluster when that one is free and
adjacent, else starting a fresh cluster.  Every host cluster a piece touches
takes one more reference, so a host cluster's refcount is the number of
compressed clusters stored in it.

The clusters of a longer request are compressed on threads (zlib and
libzstd release the GIL) and then stored strictly in guest order, so the
file is the one a request per cluster would make -- unlike qemu, whose
concurrent tasks may store them in any order.

A compressed write never replaces an allocated cluster (qemu fails it with
EIO): it is meant for filling new images, as ``convert -c`` does.
"""

from __future__ import annotations

import ctypes
import os
import ctypes.util
import zlib

from blockdrv.errors import BlockIOError, CorruptImageError, InvalidArgumentError
from blockdrv.iov import IOVector

from . import l2 as L
from .alloc import _Again
from .constants import COMPRESSION_ZSTD

SECTOR = 512
_ZSTD_E_END = 2


def compress(data: bytes, zstd: bool, limit: int) -> bytes | None:
    """``data`` compressed as qemu does, or None when it needs more than
    ``limit`` bytes.

    zlib: raw deflate (window bits -12, no header), the default level, memory
    level 9.  zstd: one frame at the library's default level (3) with the
    content size and no checksum -- what ZSTD_compressStream2 on a fresh
    context writes when given all input at once."""
    if zstd:
        return _zstd_compress(data, limit)
    else:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9,
                             zlib.Z_DEFAULT_STRATEGY)
        out = c.compress(data) + c.flush()
    return out if len(out) <= limit else None


class _Buffer(ctypes.Structure):
    # ZSTD_inBuffer / ZSTD_outBuffer
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


_libzstd: list = []


def _system_zstd():
    """The host's libzstd, or None.  Different zstd releases emit different
    frames for the same input (1.5.4 and 1.5.7 differ on 2 MiB clusters), so
    the library qemu-img itself links on this host is preferred to the copy
    bundled with the zstandard package: the images then match byte for byte."""
    if not _libzstd:
        lib = None
        name = ctypes.util.find_library("zstd")
        if name:
            try:
                lib = ctypes.CDLL(name)
                lib.ZSTD_createCCtx.restype = ctypes.c_void_p
                lib.ZSTD_freeCCtx.argtypes = [ctypes.c_void_p]
                lib.ZSTD_compressStream2.restype = ctypes.c_size_t
                lib.ZSTD_compressStream2.argtypes = [
                    ctypes.c_void_p, ctypes.POINTER(_Buffer), ctypes.POINTER(_Buffer),
                    ctypes.c_int]
            except (OSError, AttributeError):
                lib = None
        _libzstd.append(lib)
    return _libzstd[0]


def _zstd_compress(data: bytes, limit: int) -> bytes | None:
    lib = _system_zstd()
    if lib is None:
        import zstandard
        out = zstandard.ZstdCompressor(level=3, write_content_size=True,
                                       write_checksum=False).compress(data)
        return out if len(out) <= limit else None
    # as qemu: a fresh context, one ZSTD_e_end call into a buffer of
    # ``limit`` bytes; anything left to flush means it did not fit
    cctx = lib.ZSTD_createCCtx()
    if not cctx:
        raise MemoryError("zstd context")
    try:
        src = ctypes.create_string_buffer(data, len(data))
        dst = ctypes.create_string_buffer(limit)
        inp = _Buffer(ctypes.cast(src, ctypes.c_void_p), len(data), 0)
        out = _Buffer(ctypes.cast(dst, ctypes.c_void_p), limit, 0)
        left = lib.ZSTD_compressStream2(cctx, ctypes.byref(out), ctypes.byref(inp),
                                        _ZSTD_E_END)
        if left:
            return None
        return dst.raw[:out.pos]
    finally:
        lib.ZSTD_freeCCtx(cctx)


async def write_compressed(w, offset: int, nbytes: int, qiov: IOVector) -> None:
    """The driver hook: ``w`` is the image's :class:`.write.Qcow2Writer`."""
    img = w.img
    cs, size = img.cs, img.h.size
    if nbytes == 0:
        # the end of a compressed copy: the file ends on a sector boundary,
        # so readers that work in sectors find the last piece whole
        length = w.file.total_size
        aligned = -(-length // SECTOR) * SECTOR
        if aligned != length:
            await w.file.co_truncate(aligned)
        return
    if offset % cs:
        raise InvalidArgumentError("Compressed writes must be cluster aligned")
    if nbytes % cs and offset + nbytes != size:
        raise InvalidArgumentError("Compressed writes must cover whole clusters")
    zstd = img.h.compression_type == COMPRESSION_ZSTD
    pieces = [(pos, min(cs, nbytes - pos)) for pos in range(0, nbytes, cs)]

    def squeeze(piece):
        pos, n = piece
        data = qiov.slice(pos, n).to_bytes()
        if n < cs:
            data += bytes(cs - n)       # the partial last cluster of the image
        return compress(data, zstd, cs - 1)
    if len(pieces) > 1:
        # zlib and libzstd release the GIL: the clusters of one request are
        # compressed on threads (as qemu's thread pool), then stored in order
        packed = list(_pool().map(squeeze, pieces))
    else:
        packed = [squeeze(pieces[0])]
    for (pos, n), data in zip(pieces, packed):
        await _write_cluster(w, offset + pos, n, qiov.slice(pos, n), data)


_POOL: list = []


def _pool():
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor
        _POOL.append(ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                        thread_name_prefix="qcow2-compress"))
    return _POOL[0]


async def _write_cluster(w, offset: int, n: int, qiov: IOVector, packed: bytes | None) -> None:
    img = w.img
    if packed is None:
        await w.writev(offset, n, qiov)
        return
    async with w.lock:
        l2_off, table = w.map.table(offset)
        l2i = (offset >> img.cbits) % w.map.per_l2
        if w.map._get(table, l2i) & L.L2E_OFFSET_MASK:
            raise BlockIOError("Cannot compress into an allocated cluster")
        host = alloc_bytes(w, len(packed))
        w.overlap_check(host, len(packed))
        await w.file.co_pwrite(host, packed)
        # refcounts and data reach the disk before the L2 entry (the writeback's order)
        if w.lazy:
            w.mark_dirty()
        entry = L.pack_compressed(host, len(packed), img.cbits)
        w.map._put(table, l2i, entry, 0)
        w.map._write_entries(l2_off, table, l2i, l2i)


def alloc_bytes(w, size: int) -> int:
    """qemu's qcow2_alloc_bytes: ``size`` bytes (at most a cluster) of host
    file for compressed data, after the previous piece when it fits."""
    a = w.alloc
    cs = a.cs
    offset = w.free_byte_offset
    if offset and a.refcount(offset >> a.cbits) >= a.max_refcount:
        offset = 0                      # no reference left to share it
    free_here = cs - offset % cs
    while True:
        if not offset or free_here < size:
            new = a._noref(cs)
            if new == 0:
                raise CorruptImageError("Preventing invalid allocation of compressed "
                                        "cluster at offset 0")
            if offset and -(-offset // cs) * cs == new:
                free_here += cs         # adjacent: the piece may straddle both
            else:
                offset, free_here = new, cs
        try:
            a.update(offset, size, 1)
            break
        except _Again:
            offset = 0                  # refcount metadata moved things: retry
    end = offset + size
    w.free_byte_offset = end if end % cs else 0
    return offset
