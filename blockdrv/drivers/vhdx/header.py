"""File type identifier (spec 2.2.1) and the two headers (spec 2.2.2)."""

from __future__ import annotations

import struct
from blockdrv._startup import dataclass, field

from blockdrv.errors import CorruptImageError, UnsupportedError

from . import checksum as _crc
from .constants import (ALIGNMENT, CREATOR_SIZE, FILE_SIGNATURE, HEADER_SECTION_SIZE,
                        HEADER_SIGNATURE, HEADER_SIZE, ZERO_GUID)

# Spec 2.2.1: Signature (8 bytes) then Creator, 512 bytes of UTF-16LE.
_FILE_ID = struct.Struct("<8s512s")


@dataclass
class FileIdentifier:
    creator: str = ""

    @classmethod
    def parse(cls, buf) -> "FileIdentifier":
        if len(buf) < _FILE_ID.size:
            raise CorruptImageError("VHDX file identifier is truncated")
        signature, raw = _FILE_ID.unpack_from(buf)
        if signature != FILE_SIGNATURE:
            raise CorruptImageError("Not a VHDX image: bad file signature")
        # Diagnostic only (the spec forbids acting on it): decode leniently.
        text = bytes(raw).decode("utf-16-le", errors="replace")
        return cls(creator=text.split("\0", 1)[0])

    def pack(self) -> bytes:
        raw = self.creator.encode("utf-16-le")
        if len(raw) > CREATOR_SIZE:
            raise ValueError("creator string longer than 512 bytes")
        return _FILE_ID.pack(FILE_SIGNATURE, raw)   # struct pads with zeros


# Spec 2.2.2: Signature, Checksum, SequenceNumber, FileWriteGuid, DataWriteGuid,
# LogGuid, LogVersion, Version, LogLength, LogOffset; the rest of 4 KiB reserved.
_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
assert _HEADER.size == 80


@dataclass
class Header:
    sequence_number: int = 0
    file_write_guid: bytes = ZERO_GUID
    data_write_guid: bytes = ZERO_GUID
    log_guid: bytes = ZERO_GUID
    log_version: int = 0
    version: int = 1
    log_length: int = 0
    log_offset: int = 0
    signature: bytes = HEADER_SIGNATURE
    # Stored checksum as read; pack() always recomputes it.
    checksum: int = field(default=0, compare=True)

    @classmethod
    def parse(cls, buf) -> "Header":
        """Parse and check signature, checksum and version (what makes a header valid)."""
        if len(buf) < HEADER_SIZE:
            raise CorruptImageError("VHDX header is truncated")
        (sig, stored, seq, fw, dw, lg, log_version, version, log_length,
         log_offset) = _HEADER.unpack_from(buf)
        if sig != HEADER_SIGNATURE:
            raise CorruptImageError("VHDX header has a bad signature")
        if stored != _crc.compute(memoryview(buf)[:HEADER_SIZE]):
            raise CorruptImageError("VHDX header checksum mismatch")
        if version != 1:
            raise CorruptImageError(f"VHDX header has unknown version {version}")
        return cls(seq, fw, dw, lg, log_version, version, log_length, log_offset, sig, stored)

    def pack(self) -> bytes:
        """The 4 KiB header with a fresh checksum (reserved bytes zero)."""
        buf = bytearray(HEADER_SIZE)
        _HEADER.pack_into(buf, 0, self.signature, 0, self.sequence_number,
                          self.file_write_guid, self.data_write_guid, self.log_guid,
                          self.log_version, self.version, self.log_length, self.log_offset)
        self.checksum = _crc.seal(buf)
        return bytes(buf)

    @property
    def has_log(self) -> bool:
        return self.log_guid != ZERO_GUID

    def check_log_fields(self) -> None:
        """Validate the log location of the current header (spec 2.2.2)."""
        if self.log_version != 0 and self.has_log:
            raise UnsupportedError(f"VHDX log version {self.log_version} is not supported")
        if self.log_offset % ALIGNMENT or self.log_length % ALIGNMENT:
            raise CorruptImageError("VHDX log offset or length is not 1 MiB aligned")
        if self.log_length and self.log_offset < HEADER_SECTION_SIZE:
            raise CorruptImageError("VHDX log overlaps the header section")
        if self.has_log and not self.log_length:
            raise CorruptImageError("VHDX header has a log GUID but an empty log")


def select_current_header(buf1, buf2) -> tuple[int, Header]:
    """Return ``(index, header)`` of the current header (0 = at 64 KiB).

    A header is valid when signature, checksum and version check out; one valid
    header is enough.  With two, the higher sequence number wins; equal numbers
    are accepted only when both headers are identical (Disk2VHD writes those).
    The current header's log fields are then validated.
    """
    headers: list[Header | None] = []
    reasons = []
    for buf in (buf1, buf2):
        try:
            headers.append(Header.parse(buf))
        except CorruptImageError as exc:
            headers.append(None)
            reasons.append(str(exc))
    h1, h2 = headers
    if h1 is None and h2 is None:
        raise CorruptImageError("No valid VHDX header found (" + "; ".join(reasons) + ")")
    if h2 is None:
        index = 0
    elif h1 is None:
        index = 1
    elif h1.sequence_number != h2.sequence_number:
        index = 0 if h1.sequence_number > h2.sequence_number else 1
    elif h1 == h2:
        index = 0
    else:
        raise CorruptImageError("VHDX headers have equal sequence numbers but differ")
    current = headers[index]
    assert current is not None
    current.check_log_fields()
    return index, current
