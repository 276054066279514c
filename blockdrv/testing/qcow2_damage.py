"""Deliberate damage to qcow2 images, for check and repair tests.

Each function edits one on-disk structure of a closed image in place, the
way a bug or a torn write could, and says what it changed; the tests then
compare what blockdrv and qemu-img report (and repair) on the same file.
"""

from __future__ import annotations

import os
import struct

from blockdrv.drivers.qcow2 import refcount as rc
from blockdrv.drivers.qcow2.header import Header
from blockdrv.drivers.qcow2.l2 import L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED


class Damage:
    """An image file open for editing its structures."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            self.h = Header.parse(f.read(1 << 21))
        self.cs = self.h.cluster_size

    def read(self, offset: int, n: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(n).ljust(n, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def u64(self, offset: int) -> int:
        return struct.unpack(">Q", self.read(offset, 8))[0]

    def put64(self, offset: int, value: int) -> None:
        self.write(offset, struct.pack(">Q", value))

    # -- where things are ------------------------------------------------------

    def l1_entry_pos(self, index: int) -> int:
        return self.h.l1_table_offset + 8 * index

    def l2_offset(self, index: int = 0) -> int:
        return self.u64(self.l1_entry_pos(index)) & L1E_OFFSET_MASK

    def l2_entry_pos(self, guest: int) -> int:
        esize = 16 if self.h.incompatible_features & 16 else 8
        per = self.cs // esize
        l1i, l2i = divmod(guest // self.cs, per)
        return self.l2_offset(l1i) + l2i * esize

    def data_cluster(self, guest: int) -> int:
        """Host cluster index of the guest cluster at ``guest`` (normal entry)."""
        entry = self.u64(self.l2_entry_pos(guest))
        assert entry and not entry & OFLAG_COMPRESSED
        return (entry & L2E_OFFSET_MASK) // self.cs

    def reftable_entry_pos(self, index: int) -> int:
        return self.h.refcount_table_offset + 8 * index

    def refblock(self, index: int = 0) -> int:
        return self.u64(self.reftable_entry_pos(index)) & rc.REFT_OFFSET_MASK

    def _ref_site(self, cluster: int) -> tuple[int, int]:
        per = rc.entries_per_block(self.cs, self.h.refcount_order)
        t, i = divmod(cluster, per)
        return self.refblock(t), i

    def refcount(self, cluster: int) -> int:
        block, i = self._ref_site(cluster)
        return rc.get(self.read(block, self.cs), i, self.h.refcount_order)

    def set_refcount(self, cluster: int, value: int) -> None:
        block, i = self._ref_site(cluster)
        buf = bytearray(self.read(block, self.cs))
        rc.put(buf, i, self.h.refcount_order, value)
        self.write(block, bytes(buf))

    # -- damage --------------------------------------------------------------------

    def leak_cluster(self) -> int:
        """Grow the file by one cluster and give it refcount 1: a leak."""
        size = os.path.getsize(self.path)
        cluster = -(-size // self.cs)
        with open(self.path, "r+b") as f:
            f.truncate((cluster + 1) * self.cs)
        self.set_refcount(cluster, 1)
        return cluster
