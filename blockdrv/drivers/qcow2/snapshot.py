"""The internal snapshot table (qcow2.txt "Snapshots"): parsed and listed;
applying a snapshot is not implemented."""

from __future__ import annotations

import struct
from blockdrv._startup import dataclass

from blockdrv.common import SnapshotInfo
from blockdrv.errors import InvalidArgumentError

from .constants import MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOTS, MAX_SNAPSHOTS_SIZE

# l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec,
# vm_clock_nsec, vm_state_size, extra_data_size
_ENTRY = struct.Struct(">QIHHIIQII")
assert _ENTRY.size == 40
# extra data: vm_state_size_large, disk_size, icount (each present if long enough)
_EXTRA = (">Q", ">Q", ">q")


@dataclass
class Snapshot:
    id: str
    name: str
    l1_table_offset: int = 0
    l1_size: int = 0
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int | None = None
    icount: int | None = None
    extra: bytes = b""

    def info(self) -> SnapshotInfo:
        """What qemu's qcow2_snapshot_list hands up: C strings (cut at a NUL)
        in its fixed buffers, 127 bytes of id and 255 of name; an icount of
        -1 (or none stored) is "not recorded"."""
        def cstr(text: str, room: int) -> str:
            raw = text.encode("utf-8", "surrogateescape").split(b"\0", 1)[0][:room]
            return raw.decode("utf-8", "replace")
        icount = self.icount if self.icount is not None and self.icount != -1 else None
        return SnapshotInfo(id=cstr(self.id, 127), name=cstr(self.name, 255),
                            vm_state_size=self.vm_state_size, date_sec=self.date_sec,
                            date_nsec=self.date_nsec, vm_clock_nsec=self.vm_clock_nsec,
                            icount=icount)

    def pack(self) -> bytes:
        ident, name = self.id.encode(), self.name.encode()
        extra = bytearray(self.extra)
        fields = [self.vm_state_size, self.disk_size or 0,
                  -1 if self.icount is None else self.icount]
        for i, (fmt, value) in enumerate(zip(_EXTRA, fields)):
            if len(extra) < (i + 1) * 8:
                extra += bytes((i + 1) * 8 - len(extra))
            struct.pack_into(fmt, extra, i * 8, value)
        small = self.vm_state_size if self.vm_state_size < 1 << 32 else 0
        raw = _ENTRY.pack(self.l1_table_offset, self.l1_size, len(ident), len(name),
                          self.date_sec, self.date_nsec, self.vm_clock_nsec, small,
                          len(extra)) + bytes(extra) + ident + name
        return raw + bytes(-len(raw) % 8)


def parse_table(buf: bytes, count: int) -> tuple[list[Snapshot], int]:
    """The ``count`` entries at the start of ``buf``; returns them and the
    table's length in bytes.  Refuses what qemu's qcow2_read_snapshots does."""
    if count > MAX_SNAPSHOTS:
        raise InvalidArgumentError("Too many snapshots")
    out = []
    pos = 0
    for _ in range(count):
        if pos + _ENTRY.size > len(buf):
            raise InvalidArgumentError("Snapshot table exceeds the file")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmsize,
         extra_len) = _ENTRY.unpack_from(buf, pos)
        pos += _ENTRY.size
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA:
            raise InvalidArgumentError("Too much extra metadata in snapshot table entry")
        end = pos + extra_len + id_len + name_len
        if end > len(buf):
            raise InvalidArgumentError("Snapshot table exceeds the file")
        extra = bytes(buf[pos:pos + extra_len])
        pos += extra_len
        vals = []
        for i, fmt in enumerate(_EXTRA):
            vals.append(struct.unpack_from(fmt, extra, i * 8)[0]
                        if extra_len >= (i + 1) * 8 else None)
        snap = Snapshot(id=bytes(buf[pos:pos + id_len]).decode("utf-8", "replace"),
                        name=bytes(buf[pos + id_len:end]).decode("utf-8", "replace"),
                        l1_table_offset=l1_off, l1_size=l1_size, date_sec=dsec,
                        date_nsec=dnsec, vm_clock_nsec=clock,
                        vm_state_size=vals[0] if vals[0] is not None else vmsize,
                        disk_size=vals[1], icount=vals[2], extra=extra)
        pos = end + (-end % 8)
        if pos > MAX_SNAPSHOTS_SIZE:
            raise InvalidArgumentError("Snapshot table is too big")
        out.append(snap)
    return out, pos
