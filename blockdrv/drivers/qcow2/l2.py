"""L1 and L2 table entries (qcow2.txt "Cluster mapping"), standard and extended.

An L1 entry points at an L2 table; an L2 entry describes one guest cluster:
normal (host offset), zero (plain or with a preallocated host cluster),
compressed (host offset and sector count), or unallocated.  With extended L2
(incompatible bit 4) each entry is followed by a 64-bit bitmap, two bits per
each of its 32 subclusters: allocated (low 32) and reads-as-zero (high 32).
"""

from __future__ import annotations

from blockdrv._startup import NamedTuple

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED = 0x7F000000000001FF      # must be zero in L1 entries
SUBCLUSTERS = 32
COMPRESSED_SECTOR = 512

# Cluster (and subcluster) kinds, qemu's QCow2ClusterType.
UNALLOCATED, ZERO_PLAIN, ZERO_ALLOC, NORMAL, COMPRESSED, INVALID, UNALLOCATED_ALLOC = range(7)


def l1_offset(entry: int) -> int:
    return entry & L1E_OFFSET_MASK


def l2_entry_size(extended: bool) -> int:
    return 16 if extended else 8


def cluster_type(entry: int, extended: bool) -> int:
    """qemu's qcow2_get_cluster_type (extended L2 ignores the zero flag)."""
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED
    if entry & OFLAG_ZERO and not extended:
        return ZERO_ALLOC if entry & L2E_OFFSET_MASK else ZERO_PLAIN
    if not entry & L2E_OFFSET_MASK:
        return UNALLOCATED
    return NORMAL


def subcluster_type(entry: int, bitmap: int, index: int) -> int:
    """Kind of subcluster ``index`` of an extended entry (qemu's
    qcow2_get_subcluster_type)."""
    ctype = cluster_type(entry, True)
    alloc = bitmap >> index & 1
    zero = bitmap >> (32 + index) & 1
    if ctype == COMPRESSED:
        return INVALID if bitmap else COMPRESSED
    if ctype == NORMAL:
        if alloc and zero:
            return INVALID
        # a host cluster whose subcluster is not allocated: the backing file's
        return ZERO_ALLOC if zero else NORMAL if alloc else UNALLOCATED_ALLOC
    # no host cluster: an allocated bit is invalid
    if alloc:
        return INVALID
    return ZERO_PLAIN if zero else UNALLOCATED


class Compressed(NamedTuple):
    offset: int         # host byte offset of the compressed data
    size: int           # bytes to read (whole 512-byte sectors from offset's sector)


def compressed_shift(cluster_bits: int) -> int:
    return 62 - (cluster_bits - 8)


def parse_compressed(entry: int, cluster_bits: int) -> Compressed:
    shift = compressed_shift(cluster_bits)
    offset = entry & ((1 << shift) - 1)
    sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return Compressed(offset, sectors * COMPRESSED_SECTOR - (offset & (COMPRESSED_SECTOR - 1)))


def pack_compressed(offset: int, size: int, cluster_bits: int) -> int:
    """Descriptor for ``size`` compressed bytes at host ``offset``: the count
    is of 512-byte sectors touched, minus one, as qemu writes it."""
    shift = compressed_shift(cluster_bits)
    last = (offset + size - 1) // COMPRESSED_SECTOR
    sectors = last - offset // COMPRESSED_SECTOR
    return OFLAG_COMPRESSED | sectors << shift | offset


def alloc_range_bitmap(first: int, count: int) -> int:
    """Allocated bits for subclusters ``first .. first+count-1``."""
    return ((1 << count) - 1) << first


def zero_range_bitmap(first: int, count: int) -> int:
    return alloc_range_bitmap(first, count) << 32
