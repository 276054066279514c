"""Comparing images: host files byte for byte, and guest data through blockdrv.

* :func:`compare_files` -- two image files, after the format's normalizer has
  masked what legitimately differs between two runs (checksums, GUIDs, ...).
  Sparse-aware: only the normalized prefix and the data extents of either
  file (SEEK_DATA/SEEK_HOLE) are read, so 40 TiB images compare in
  milliseconds.
* :func:`compare_guest` -- what a guest reads from two images (any formats),
  streamed through blockdrv; ranges that both nodes report as zero are
  skipped.

Normalizers are registered per format with :func:`register_normalizer`, or
by a package through the ``blockdrv.normalizers`` entry point group (the
object named is a :class:`Normalizer`)::

    [project.entry-points."blockdrv.normalizers"]
    vhdx = "blockdrv.testing.vhdx:normalizer"

A normalizer masks byte *ranges* anywhere in a file: ``ranges`` is a list of
``(start, end)`` (a negative start counts from the end of the file, ``end``
None means "to the end"; e.g. ``[(-512, None)]`` for a VHD footer) or a
function of the path returning one; ``fn(data, start) -> data`` gets the
bytes of each range (of the union over both files) and returns them with
run-dependent fields masked.  ``raw`` is the identity, built in.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable

RangeFn = Callable[[bytes, int], bytes]
Ranges = list[tuple[int, "int | None"]]

_CHUNK = 8 << 20
ENTRY_POINT_GROUP = "blockdrv.normalizers"


@dataclass
class Normalizer:
    """How to mask the run-dependent bytes of one format's files.

    ``fn(data, start) -> data`` rewrites the bytes of one range starting at
    file offset ``start`` (None: the identity); ``ranges`` (a list or a
    function of the path, see the module docstring) says which.
    """

    fn: RangeFn | None = None
    ranges: "Callable[[str], Ranges] | Ranges | None" = ()

    def resolve(self, path: str, size: int | None = None) -> list[tuple[int, int]]:
        """Absolute, sorted, merged ``(start, end)`` ranges for the file at ``path``."""
        if self.fn is None:
            return []
        if size is None:
            size = os.path.getsize(path)
        raw = self.ranges(path) if callable(self.ranges) else (self.ranges or ())
        out = []
        for start, end in raw:
            if start < 0:
                start = max(0, size + start)
            end = size if end is None else (size + end if end < 0 else end)
            end = min(end, size)
            if start < end:
                out.append((start, end))
        return _merge(out)


IDENTITY = Normalizer(None, ())
_REGISTRY: dict[str, Normalizer] = {"raw": IDENTITY}
_DISCOVERED = False


def register_normalizer(fmt: str, fn, ranges=None, prefix=None) -> None:
    """Register how to normalize files of format ``fmt``.

    ``fn`` is a :class:`Normalizer`, or ``fn(data, start) -> data`` with
    ``ranges`` (list or function of the path; see the module docstring).
    ``prefix=`` (an int or a function of the path) is the older form:
    ``fn(data) -> data`` over the first ``prefix`` bytes.  ``fn=None``:
    identity.  An explicit registration wins over the entry point.
    """
    if isinstance(fn, Normalizer):
        _REGISTRY[fmt] = fn
        return
    if prefix is not None:
        one_arg = fn
        fn = None if one_arg is None else (lambda data, start: one_arg(data))
        ranges = (lambda path: [(0, prefix(path))]) if callable(prefix) else [(0, prefix)]
    _REGISTRY[fmt] = Normalizer(fn, ranges if ranges is not None else [(0, None)])


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    from importlib.metadata import entry_points
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        obj = ep.load()
        if not isinstance(obj, Normalizer):
            raise TypeError(f"entry point {ENTRY_POINT_GROUP}:{ep.name} = {ep.value} "
                            f"is not a blockdrv.testing.compare.Normalizer")
        _REGISTRY[ep.name] = obj


def get_normalizer(fmt: str) -> Normalizer:
    """The :class:`Normalizer` of ``fmt`` (registered, or found through the
    ``blockdrv.normalizers`` entry points); the identity for the others."""
    if fmt not in _REGISTRY:
        _discover()
    return _REGISTRY.get(fmt, IDENTITY)


def normalizer_registered(fmt: str) -> bool:
    get_normalizer(fmt)
    return fmt in _REGISTRY


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


def _subtract(ranges, masked) -> list[tuple[int, int]]:
    """Parts of the sorted ``ranges`` outside the sorted, merged ``masked``."""
    out = []
    for s, e in ranges:
        pos = s
        for ms, me in masked:
            if me <= pos or ms >= e:
                continue
            if ms > pos:
                out.append((pos, ms))
            pos = max(pos, me)
            if pos >= e:
                break
        if pos < e:
            out.append((pos, e))
    return out


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
    ``"all"`` the whole files', ``"payload"`` only outside the normalized
    ranges (where a format's structures lie, which one tool may write as
    zeros and another leave as holes).
    """
    if extents not in (None, "all", "payload"):
        raise ValueError(f"extents must be None, 'all' or 'payload', not {extents!r}")
    a, b = os.fspath(a), os.fspath(b)
    size_a, size_b = os.path.getsize(a), os.path.getsize(b)
    if check_size and size_a != size_b:
        return Difference(min(size_a, size_b), f"file sizes differ: {a} is {size_a} "
                          f"bytes, {b} is {size_b}")
    norm = get_normalizer(fmt)
    masked = _merge(norm.resolve(a, size_a) + norm.resolve(b, size_b))
    end = max(size_a, size_b)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, stop in masked:
            n = stop - start
            fa.seek(start)
            fb.seek(start)
            na = norm.fn(fa.read(n).ljust(n, b"\0"), start)
            nb = norm.fn(fb.read(n).ljust(n, b"\0"), start)
            if na != nb:
                i = first_diff(na, nb)
                return Difference(start + i, f"normalized {fmt} files differ at offset "
                                  f"{start + i:#x} (inside the normalized range "
                                  f"{start:#x}..{stop:#x})",
                                  hexdump_context(na, nb, start, start + i))
        ext_a, ext_b = data_extents(a), data_extents(b)
        for start, stop in _subtract(_merge(ext_a + ext_b), masked):
            pos = start
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
        ext_a = [e for e in ext_a if _subtract([e], masked)]
        ext_b = [e for e in ext_b if _subtract([e], masked)]
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


__all__ = ["Normalizer", "register_normalizer", "get_normalizer", "normalizer_registered", "Difference", "data_extents",
           "compare_files", "compare_guest", "file_digest", "hexdump_context"]
