"""``measure -O qcow2`` (qemu's qcow2_measure): the file size a new qcow2
image needs for a copy of an image, or for an empty disk of a given size.

``fully-allocated`` is header + every L2 table + the L1 table + the refcount
structure covering all of it + every data cluster (qcow2_calc_prealloc_size);
``required`` drops the data clusters the source does not need: those
holding no data (block status neither DATA nor ALLOCATED, or ZERO).  With
``backing_file`` qemu assumes every cluster is written.  ``bitmaps`` (qcow2 v3
sources) is the room their persistent bitmaps would take.
"""

from __future__ import annotations

from blockdrv.driver import InvalidArgumentError, UnsupportedError

from . import refcount as rc
from .constants import MAX_L1_BYTES
from .create import PREALLOC_MODES, VERSIONS, cluster_size, refcount_bits


def prealloc_size(size: int, cs: int, order: int, extl2: bool) -> int:
    """qemu's qcow2_calc_prealloc_size: every structure of a fully
    allocated image of ``size`` bytes, data clusters included."""
    data = -(-size // cs) * cs
    esize = 16 if extl2 else 8
    l2_entries = -(-(data // cs) // (cs // esize)) * (cs // esize)
    meta = cs + l2_entries * esize                   # header, L2 tables
    l1_entries = l2_entries * esize // cs
    meta += -(-l1_entries // (cs // 8)) * (cs // 8) * 8
    blocks, table = rc.metadata_clusters((meta + data) // cs, cs, order, False)
    return meta + (blocks + table) * cs + data


def _options(options: dict) -> tuple[int, int, str, bool, bool]:
    extl2 = bool(options.get("extended_l2", False))
    cs = cluster_size(options)
    if extl2 and cs < 16384:
        raise InvalidArgumentError("Extended L2 entries are only supported with cluster "
                                   "sizes of at least 16384 bytes")
    compat = options.get("compat", "v3")
    if compat not in VERSIONS:
        raise InvalidArgumentError(f"Invalid compatibility level: '{compat}'")
    version = VERSIONS[compat]
    bits = refcount_bits(options, version, hint="use compat=1.1 or greater")
    prealloc = options.get("preallocation", "off")
    if prealloc not in PREALLOC_MODES:
        raise InvalidArgumentError(f"invalid parameter value: {prealloc}")
    if options.get("encrypt.format") or options.get("encryption"):
        raise UnsupportedError("Measuring encrypted qcow2 images is not supported "
                               "by blockdrv")
    return cs, bits.bit_length() - 1, prealloc, extl2, version >= 3


def _data_bytes(bs, cs: int) -> int:
    """Bytes of whole clusters holding data in ``bs``'s guest view (qemu's
    walk: each DATA+ALLOCATED run rounded out to clusters, zeros skipped)."""
    from blockdrv.common import BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_ZERO
    from blockdrv.mapping import block_status
    total, offset, size = 0, 0, bs.total_size
    while offset < size:
        st = block_status(bs, offset, size - offset)
        n = max(st.pnum, 1)
        if not st.flags & BLOCK_ZERO and (st.flags & (BLOCK_DATA | BLOCK_ALLOCATED)
                                          == BLOCK_DATA | BLOCK_ALLOCATED):
            n = -(-(offset + n) // cs) * cs - offset
            total += offset % cs + n
        offset += n
    return total


def bitmaps_size(bs, cs: int) -> int:
    """qemu's qcow2_get_persistent_dirty_bitmap_size: room for the source's
    persistent bitmaps in an image of ``cs``-byte clusters, each taken as
    wholly allocated, with their tables and directory entries."""
    from .bitmaps import load
    total = directory = 0
    for b in load(bs.opaque)[1] or []:
        nbytes = -(-(-(-bs.total_size // (1 << b.granularity_bits))) // 8)
        clusters = -(-nbytes // cs)
        total += clusters * cs + -(-clusters * 8 // cs) * cs
        directory += (24 + len(b.name.encode()) + 7) & ~7
    return total + -(-directory // cs) * cs


def measure(options: dict, in_bs, size: int | None) -> dict[str, int]:
    cs, order, prealloc, extl2, v3 = _options(options)
    virtual = -(-(size or 0) // cs) * cs
    esize = 16 if extl2 else 8
    if -(-(virtual // cs) // (cs // esize)) * 8 > MAX_L1_BYTES:
        raise InvalidArgumentError("The image size is too large (try using a larger "
                                   "cluster size)")
    required = 0
    if in_bs is not None:
        virtual = -(-in_bs.total_size // cs) * cs
        required = virtual if options.get("backing_file") else _data_bytes(in_bs, cs)
    if prealloc in ("falloc", "full"):
        required = virtual
    full = prealloc_size(virtual, cs, order, extl2)
    out = {"required": full - virtual + required, "fully-allocated": full}
    if v3 and in_bs is not None and in_bs.format_name == "qcow2" \
            and in_bs.opaque.h.version >= 3:
        out["bitmaps"] = bitmaps_size(in_bs, cs)
    return out
