"""Interop helpers for VHDX: normalize away what differs between identical runs.

Two ``qemu-img create`` (or qemu-io) runs with the same arguments differ only
in: header checksums and sequence numbers, the file/data write and log GUIDs,
the page 83 GUID, log entry GUIDs and checksums, and -- between qemu and
blockdrv -- the creator string and the unused tail of log descriptor sectors
(qemu leaves it uninitialized).  ``normalize_vhdx`` rewrites exactly those:

* creator (bytes 8..520): zeroed;
* header checksums: zeroed; sequence numbers: made relative to the smaller
  one, so which header is current is still compared;
* GUIDs: each distinct non-zero GUID is replaced by a small counter in order
  of first appearance, so "zero or not" and "equal or not" (log entry GUID =
  header log GUID, same file write GUID in both headers) are still compared;
* log entries (any 4 KiB sector of the log starting with ``loge``): checksum
  zeroed, GUID mapped as above, descriptor-sector tail after the last
  descriptor zeroed.

Everything else -- region tables, metadata, BAT, payload -- is compared as is.
The parsers here are deliberately lenient: a damaged image normalizes without
raising, so a test still gets a byte diff to look at.

Files are compared with ``blockdrv.testing.compare.compare_files(a, b,
"vhdx")``, which normalizes the prefix up to :func:`structure_end` and reads
the payload extent by extent.  :class:`PosixFile` is the node interface over
a host file, for driving the driver's create and log code directly.
"""

from __future__ import annotations

import os
import struct

HEADER_OFFSETS = (64 * 1024, 128 * 1024)
REGION_TABLE_OFFSET = 192 * 1024
METADATA_GUID = bytes.fromhex("06a27c8b90479a4bb8fe575f050f886e")
PAGE83_GUID = bytes.fromhex("ab12cabee6b2234593efc309e000c746")
_ZERO16 = bytes(16)
SECTOR = 4096


class _Guids:
    def __init__(self, buf: bytearray):
        self.buf, self.ids = buf, {}

    def __call__(self, off: int) -> None:
        if off + 16 > len(self.buf):
            return
        g = bytes(self.buf[off:off + 16])
        if g != _ZERO16:
            self.buf[off:off + 16] = self.ids.setdefault(g, (len(self.ids) + 1).to_bytes(16, "big"))


def _u(fmt: str, buf, off: int):
    size = struct.calcsize(fmt)
    return struct.unpack_from(fmt, buf, off) if off + size <= len(buf) else None


def _metadata_offset(buf) -> int | None:
    head = _u("<4sII", buf, REGION_TABLE_OFFSET)
    if not head or head[0] != b"regi":
        return None
    for i in range(min(head[2], 2047)):
        e = _u("<16sQI", buf, REGION_TABLE_OFFSET + 16 + 32 * i)
        if e and e[0] == METADATA_GUID:
            return e[1]
    return None


def normalize_vhdx(data: bytes | bytearray) -> bytes:
    """Normalized copy of a VHDX image, or of a prefix of one (structures
    beyond the end of ``data`` are skipped)."""
    buf = bytearray(data)
    guid = _Guids(buf)
    if len(buf) >= 520:
        buf[8:520] = bytes(512)
    heads = [h for h in HEADER_OFFSETS if buf[h:h + 4] == b"head"]
    seqs = [struct.unpack_from("<Q", buf, h + 8)[0] for h in heads]
    logs = set()
    for h, seq in zip(heads, seqs):
        buf[h + 4:h + 8] = bytes(4)
        struct.pack_into("<Q", buf, h + 8, seq - min(seqs))
        for off in (16, 32, 48):
            guid(h + off)
        log_length, log_offset = struct.unpack_from("<IQ", buf, h + 68)
        logs.add((log_offset, log_length))

    md = _metadata_offset(buf)
    if md is not None and _u("<8sHH", buf, md) and buf[md:md + 8] == b"metadata":
        for i in range(min(struct.unpack_from("<H", buf, md + 10)[0], 2047)):
            e = _u("<16sII", buf, md + 32 + 32 * i)
            if e and e[0] == PAGE83_GUID and e[2] >= 16:
                guid(md + e[1])

    for log_offset, log_length in sorted(logs):
        end = min(log_offset + log_length, len(buf))
        for s in range(log_offset, end - SECTOR + 1, SECTOR):
            if buf[s:s + 4] != b"loge":
                continue
            entry_length, _, _, count = struct.unpack_from("<IIQI", buf, s + 8)
            buf[s + 4:s + 8] = bytes(4)
            guid(s + 32)
            used = 64 + 32 * count
            desc_end = s + -(-used // SECTOR) * SECTOR
            stop = min(desc_end, end, s + max(entry_length, SECTOR))
            if stop > s + used:
                buf[s + used:stop] = bytes(stop - s - used)
    return bytes(buf)


def structure_end(path: str) -> int:
    """End of the last header-section/log/BAT/metadata structure of an image,
    i.e. the prefix that ``normalize_vhdx`` needs (payload lies beyond)."""
    with open(path, "rb") as f:
        head = f.read(320 * 1024)
    end = 1 << 20
    for h in HEADER_OFFSETS:
        if head[h:h + 4] == b"head":
            log_length, log_offset = struct.unpack_from("<IQ", head, h + 68)
            end = max(end, log_offset + log_length)
    if head[REGION_TABLE_OFFSET:REGION_TABLE_OFFSET + 4] == b"regi":
        for i in range(min(struct.unpack_from("<I", head, REGION_TABLE_OFFSET + 8)[0], 2047)):
            _, off, length = struct.unpack_from("<16sQI", head, REGION_TABLE_OFFSET + 16 + 32 * i)
            end = max(end, off + length)
    return end


class PosixFile:
    """The node interface the VHDX driver's pieces (``create_vhdx``, the log
    reader and writer) need, over a host file; ``writes`` counts the calls
    that change the file (pwrite, truncate), so a test can assert none."""

    def __init__(self, path, writable: bool = True, create: bool = False) -> None:
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        self.fd = os.open(path, flags, 0o644)
        self.writes = 0

    def pread(self, offset: int, nbytes: int) -> bytes:
        return os.pread(self.fd, nbytes, offset)

    def pwrite(self, offset: int, data) -> None:
        self.writes += 1
        os.pwrite(self.fd, data, offset)

    def flush(self) -> None:
        os.fsync(self.fd)

    def getlength(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, length: int) -> None:
        self.writes += 1
        os.ftruncate(self.fd, length)

    def close(self) -> None:
        os.close(self.fd)


def _normalize_range(data: bytes, start: int) -> bytes:
    return normalize_vhdx(data) if start == 0 else bytes(data)


def _ranges(path: str) -> list[tuple[int, int]]:
    return [(0, structure_end(path))]


def _make_normalizer():
    from ..compare import Normalizer
    return Normalizer(_normalize_range, _ranges)


#: what ``compare_files(a, b, "vhdx")`` masks: the structures before the payload
normalizer = _make_normalizer()
