"""Comparing images: host files byte for byte, and guest data through blockdrv.

* :func:`compare_files` -- two image files, after the format's normalizer has
  masked what legitimately differs between two runs (checksums, GUIDs, ...).
  Sparse-aware: only the normalized prefix and the data extents of either
  file (SEEK_DATA/SEEK_HOLE) are read, so 40 TiB images compare in
  milliseconds.
* :func:`compare_guest` -- what a guest reads from two images (any formats),
  streamed through blockdrv; ranges that both nodes report as zero are
  skipped.

Normalizers are registered per format with :func:`register_normalizer`:
``fn(prefix: bytes) -> bytes`` rewrites the first bytes of the file, and
``prefix(path) -> int`` (or an int, or None for "the whole file") says how
many.  ``raw`` is the identity; ``vhdx`` is looked up lazily in
:mod:`blockdrv.testing.vhdx` (``normalize_vhdx``, ``structure_end``).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from typing import Callable

Normalizer = Callable[[bytes], bytes]

_CHUNK = 8 << 20


@dataclass
class _Entry:
    fn: Normalizer | None
    prefix: Callable[[str], int] | int | None


_REGISTRY: dict[str, _Entry] = {"raw": _Entry(None, 0)}

# Lazy defaults: (module, normalizer attribute, prefix-length attribute).
_LAZY = {"vhdx": ("blockdrv.testing.vhdx", "normalize_vhdx", "structure_end")}


def register_normalizer(fmt: str, fn: Normalizer | None,
                        prefix: Callable[[str], int] | int | None = None) -> None:
    """Register how to normalize files of format ``fmt``.

    ``fn(data) -> data`` gets the first ``prefix`` bytes of the file (all of
    it when ``prefix`` is None; ``prefix`` may be a function of the path) and
    returns them with run-dependent fields masked.  ``fn=None``: identity.
    """
    _REGISTRY[fmt] = _Entry(fn, prefix)


def get_normalizer(fmt: str) -> tuple[Normalizer | None, Callable[[str], int] | int | None]:
    """(fn, prefix) for ``fmt``; identity for formats nobody registered."""
    if fmt not in _REGISTRY and fmt in _LAZY:
        module, fn_name, prefix_name = _LAZY[fmt]
        try:
            mod = importlib.import_module(module)
            fn = getattr(mod, fn_name)
        except (ImportError, AttributeError):
            pass
        else:
            _REGISTRY[fmt] = _Entry(fn, getattr(mod, prefix_name, None))
    entry = _REGISTRY.get(fmt, _Entry(None, 0))
    return entry.fn, entry.prefix


@dataclass
class Difference:
    """The first difference found; falsy-ness of a result means "identical"."""

    offset: int | None
    message: str
    context: str = ""

    def __str__(self) -> str:
        return self.message + (("\n" + self.context) if self.context else "")


def data_extents(path) -> list[tuple[int, int]]:
    """Non-hole ranges ``(start, end)`` of a file (SEEK_DATA/SEEK_HOLE)."""
    out = []
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:         # ENXIO: only a hole remains
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    return out


_FS_IOC_FIEMAP = 0xC020660B          # _IOWR('f', 11, struct fiemap)
_FIEMAP_FLAG_SYNC = 0x1
_FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_HEAD = "=QQIIII"            # fm_start, fm_length, fm_flags, mapped, count, reserved
_FIEMAP_EXTENT = "=QQQQQIIII"       # logical, physical, length, 2 reserved, flags, 3 reserved


def _fiemap(fd: int) -> list[tuple[int, int, str]] | None:
    import fcntl
    import struct
    head, ext = struct.calcsize(_FIEMAP_HEAD), struct.calcsize(_FIEMAP_EXTENT)
    count = 256
    out: list[tuple[int, int, str]] = []
    start = 0
    while True:
        buf = bytearray(head + count * ext)
        struct.pack_into(_FIEMAP_HEAD, buf, 0, start, (1 << 64) - 1 - start,
                         _FIEMAP_FLAG_SYNC, 0, count, 0)
        try:
            fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
        except OSError:
            return None                  # tmpfs and others: no FIEMAP
        mapped = struct.unpack_from(_FIEMAP_HEAD, buf, 0)[3]
        if mapped == 0:
            return out
        for i in range(mapped):
            f = struct.unpack_from(_FIEMAP_EXTENT, buf, head + i * ext)
            logical, length, flags = f[0], f[2], f[5]
            kind = "unwritten" if flags & _FIEMAP_EXTENT_UNWRITTEN else "data"
            out.append((logical, logical + length, kind))
            if flags & _FIEMAP_EXTENT_LAST:
                return out
        start = out[-1][1]


def allocation_map(path) -> list[tuple[int, int, str]]:
    """Where a file has storage: ``(start, end, kind)`` with kind ``"data"``
    or ``"unwritten"`` (allocated but reading as zeros, e.g. fallocate),
    adjacent ranges of one kind merged.

    Unlike ``st_blocks`` this does not depend on how the filesystem happened
    to fragment the file or how many blocks of its own metadata (ext4's
    extent tree) the file costs -- both vary with load -- yet it still tells
    a sparse file from a preallocated one, which data_extents alone cannot
    (SEEK_DATA reports unwritten extents as holes).  Without FIEMAP (tmpfs)
    the data extents stand in, plus a final ``(-1, bytes, "allocated")``
    when st_blocks holds more than they cover.
    """
    with open(path, "rb") as f:
        ranges = _fiemap(f.fileno())
        st = os.fstat(f.fileno())
    if ranges is None:
        ranges = [(s, e, "data") for s, e in data_extents(path)]
        block = st.st_blksize or 4096
        covered = sum(-(-e // block) * block - s // block * block for s, e, _ in ranges)
        if st.st_blocks * 512 > covered:
            return ranges + [(-1, st.st_blocks * 512, "allocated")]
    merged: list[tuple[int, int, str]] = []
    for s, e, kind in sorted(ranges):
        if merged and merged[-1][2] == kind and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e), kind)
        else:
            merged.append((s, e, kind))
    return merged


def _merge(ranges) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for s, e in sorted(ranges):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def hexdump_context(a: bytes, b: bytes, base: int, at: int, width: int = 16) -> str:
    """Two aligned hexdump rows around ``at`` (absolute), a's above b's."""
    row = (at - base) // width * width
    lines = []
    for label, data in (("a", a), ("b", b)):
        chunk = data[row:row + width]
        lines.append(f"  {label} {base + row:#012x}: {chunk.hex(' ')}")
    return "\n".join(lines)


def first_diff(a: bytes, b: bytes) -> int:
    # Binary search on slices: memcmp speed instead of a Python byte loop.
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return hi


def compare_files(a, b, fmt: str = "raw", check_size: bool = True,
                  extents: str | None = None) -> Difference | None:
    """Compare two image files byte for byte after ``fmt``'s normalization.

    Returns None when identical, else the first :class:`Difference` (offset,
    message, hexdump context).  Holes compare as zeros, unless ``extents``
    asks for the allocation maps (SEEK_DATA/SEEK_HOLE) to match as well:
    ``"all"`` the whole files', ``"payload"`` only beyond the normalized
    prefix (where a format's structures lie, which one tool may write as
    zeros and another leave as holes).
    """
    if extents not in (None, "all", "payload"):
        raise ValueError(f"extents must be None, 'all' or 'payload', not {extents!r}")
    a, b = os.fspath(a), os.fspath(b)
    size_a, size_b = os.path.getsize(a), os.path.getsize(b)
    if check_size and size_a != size_b:
        return Difference(min(size_a, size_b), f"file sizes differ: {a} is {size_a} "
                          f"bytes, {b} is {size_b}")
    fn, prefix = get_normalizer(fmt)
    if fn is None:
        plen = 0
    elif prefix is None:
        plen = max(size_a, size_b)
    elif isinstance(prefix, int):
        plen = prefix
    else:
        plen = max(prefix(a), prefix(b))
    plen = min(plen, max(size_a, size_b))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if plen:
            ra = fa.read(plen).ljust(plen, b"\0")
            rb = fb.read(plen).ljust(plen, b"\0")
            na, nb = fn(ra), fn(rb)
            if na != nb:
                i = first_diff(na, nb)
                return Difference(i, f"normalized {fmt} files differ at offset {i:#x} "
                                  f"(inside the first {plen:#x} bytes)",
                                  hexdump_context(na, nb, 0, i))
        end = max(size_a, size_b)
        ext_a, ext_b = data_extents(a), data_extents(b)
        for start, stop in _merge(ext_a + ext_b):
            pos = max(start, plen)
            stop = min(stop, end)
            while pos < stop:
                n = min(_CHUNK, stop - pos)
                fa.seek(pos)
                fb.seek(pos)
                da = fa.read(n).ljust(n, b"\0")
                db = fb.read(n).ljust(n, b"\0")
                if da != db:
                    i = first_diff(da, db)
                    return Difference(pos + i, f"files differ at offset {pos + i:#x}",
                                      hexdump_context(da, db, pos, pos + i))
                pos += n
    if extents == "payload":
        ext_a = [e for e in ext_a if e[1] > plen]
        ext_b = [e for e in ext_b if e[1] > plen]
    if extents and ext_a != ext_b:
        i = next(i for i, (x, y) in enumerate(zip(ext_a + [None], ext_b + [None])) if x != y)
        at = min(e[0] for e in (ext_a[i:i + 1] + ext_b[i:i + 1]))
        return Difference(at, f"allocation maps differ ({extents}) from extent {i} on: "
                          f"{a} has {ext_a[i:i + 4]}, {b} has {ext_b[i:i + 4]} "
                          f"({len(ext_a)} and {len(ext_b)} extents)")
    return None


def compare_guest(a, b, fmt_a: str | None = None, fmt_b: str | None = None,
                  chunk: int = _CHUNK, check_size: bool = True) -> Difference | None:
    """Compare the guest-visible data of two images through blockdrv (read-only).

    Ranges both nodes report as zero (block status) are skipped; a range one
    side reports as zero is checked to read as zeros on the other.
    """
    from ..block import open_node
    from ..common import BLOCK_ZERO

    bs_a = open_node(os.fspath(a), fmt_a, 0)
    try:
        bs_b = open_node(os.fspath(b), fmt_b, 0)
        try:
            size_a, size_b = bs_a.total_size, bs_b.total_size
            if check_size and size_a != size_b:
                return Difference(min(size_a, size_b),
                                  f"virtual sizes differ: {size_a} != {size_b}")
            size = min(size_a, size_b)
            pos = 0
            while pos < size:
                want = min(chunk, size - pos)
                st_a = bs_a.block_status(pos, want)
                st_b = bs_b.block_status(pos, want)
                n = min(st_a.pnum, st_b.pnum, want)
                za, zb = st_a.flags & BLOCK_ZERO, st_b.flags & BLOCK_ZERO
                if za and zb:
                    pos += n
                    continue
                da = bytes(n) if za else bytes(bs_a.pread(pos, n))
                db = bytes(n) if zb else bytes(bs_b.pread(pos, n))
                if da != db:
                    i = first_diff(da, db)
                    return Difference(pos + i, f"guest data differ at offset {pos + i:#x}",
                                      hexdump_context(da, db, pos, pos + i))
                pos += n
        finally:
            bs_b.close()
    finally:
        bs_a.close()
    return None


def file_digest(path, mtime: bool = False) -> str | tuple[str, int]:
    """SHA-256 of a file's bytes (hex); with ``mtime``, ``(digest,
    st_mtime_ns)`` -- for asserting that an operation left a file untouched."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
        if not mtime:
            return h.hexdigest()
        return h.hexdigest(), os.fstat(f.fileno()).st_mtime_ns


__all__ = ["register_normalizer", "get_normalizer", "Difference", "data_extents",
           "compare_files", "compare_guest", "file_digest", "hexdump_context"]
