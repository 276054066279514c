"""Refcount table and refcount blocks (qcow2.txt "Host cluster management").

Refcounts are ``refcount_bits`` = 2^order wide (1..64); below 8 bits they are
packed from the least significant bit of each byte, from 8 bits on they are
big-endian integers.  A refcount block is one cluster; the refcount table
holds the host offsets of the blocks (its low 9 bits reserved).
"""

from __future__ import annotations

import struct

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED = 0x1FF


def entries_per_block(cluster_size: int, refcount_order: int) -> int:
    return cluster_size * 8 >> refcount_order


def get(block, index: int, order: int) -> int:
    """Refcount ``index`` of block ``block`` (bytes-like)."""
    if order < 3:
        bits = 1 << order
        per_byte = 8 >> order
        return block[index // per_byte] >> (index % per_byte * bits) & ((1 << bits) - 1)
    width = 1 << (order - 3)
    return int.from_bytes(block[index * width:(index + 1) * width], "big")


def put(block: bytearray, index: int, order: int, value: int) -> None:
    bits = 1 << order
    if value < 0 or value >> bits:
        raise ValueError(f"refcount {value} does not fit in {bits} bits")
    if order < 3:
        per_byte = 8 >> order
        shift = index % per_byte * bits
        mask = ((1 << bits) - 1) << shift
        i = index // per_byte
        block[i] = (block[i] & ~mask) | value << shift
        return
    width = bits // 8
    block[index * width:(index + 1) * width] = value.to_bytes(width, "big")


def parse_table(buf, entries: int) -> list[int]:
    return [int.from_bytes(buf[i * 8:i * 8 + 8], "big") for i in range(entries)]


def pack_table(table: list[int]) -> bytes:
    return b"".join(e.to_bytes(8, "big") for e in table)


def metadata_clusters(clusters: int, cluster_size: int, order: int,
                      generous: bool) -> tuple[int, int]:
    """(refcount blocks, table clusters) that count ``clusters`` clusters and
    themselves: the fixed point qemu's qcow2_refcount_metadata_size finds
    (``generous``: room for the table to grow by half)."""
    per_table_cluster = cluster_size // 8
    per_block = entries_per_block(cluster_size, order)
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous:
            clusters += -(-table // 2)
            n = 0
            generous = False
            continue
        if n == last:
            return blocks, table


def decode(block, order: int) -> list[int]:
    """Every refcount of one block, in order."""
    if order >= 3:
        width = 1 << (order - 3)
        fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[width]
        n = len(block) // width
        return list(struct.unpack(f">{n}{fmt}", bytes(block[:n * width])))
    bits = 1 << order
    per_byte = 8 >> order
    mask = (1 << bits) - 1
    return [byte >> (k * bits) & mask for byte in bytes(block) for k in range(per_byte)]


def encode(values, order: int, cluster_size: int) -> bytes:
    """A refcount block of ``cluster_size`` bytes holding ``values``."""
    if order >= 3:
        width = 1 << (order - 3)
        fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[width]
        return struct.pack(f">{len(values)}{fmt}", *values).ljust(cluster_size, b"\0")
    block = bytearray(cluster_size)
    for i, v in enumerate(values):
        if v:
            put(block, i, order, v)
    return bytes(block)
