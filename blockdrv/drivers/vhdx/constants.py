"""Constants of the VHDX on-disk format (MS-VHDX v6.0).

GUIDs are kept as the 16 bytes found on disk: Microsoft GUIDs store their
first three fields little-endian, which is exactly ``uuid.UUID.bytes_le``.
Comparing raw bytes avoids converting every table entry we read.
"""

from __future__ import annotations

import os
from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    import uuid

# The uuid module (and the platform module it imports, ~1.5 ms) is loaded only
# by guid_from_bytes; parsing, formatting and new GUIDs need no UUID objects.

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

# --- Header section (spec 2.2): five 64 KiB slots inside the first 1 MiB ---
HEADER_SECTION_SIZE = 1 * MiB
FILE_ID_OFFSET = 0
HEADER1_OFFSET = 64 * KiB
HEADER2_OFFSET = 128 * KiB
REGION_TABLE1_OFFSET = 192 * KiB
REGION_TABLE2_OFFSET = 256 * KiB
HEADER_OFFSETS = (HEADER1_OFFSET, HEADER2_OFFSET)
REGION_TABLE_OFFSETS = (REGION_TABLE1_OFFSET, REGION_TABLE2_OFFSET)

HEADER_SIZE = 4 * KiB            # the header checksum covers 4 KiB, not the 80 used bytes
REGION_TABLE_SIZE = 64 * KiB     # the region table checksum covers the whole 64 KiB slot
METADATA_TABLE_SIZE = 64 * KiB   # the metadata table occupies the first 64 KiB of its region
CREATOR_SIZE = 512               # UTF-16 creator string in the file type identifier

# --- Signatures ---
FILE_SIGNATURE = b"vhdxfile"
HEADER_SIGNATURE = b"head"
REGION_SIGNATURE = b"regi"
METADATA_SIGNATURE = b"metadata"
LOG_ENTRY_SIGNATURE = b"loge"
LOG_DESC_SIGNATURE = b"desc"
LOG_ZERO_SIGNATURE = b"zero"
LOG_DATA_SIGNATURE = b"data"

# --- Limits ---
MAX_TABLE_ENTRIES = 2047         # region table and metadata table alike
MAX_USER_METADATA_ENTRIES = 1024
METADATA_ITEM_MAX_LENGTH = 1 * MiB
BLOCK_SIZE_MIN = 1 * MiB
BLOCK_SIZE_MAX = 256 * MiB
MAX_VIRTUAL_SIZE = 64 * TiB
MAX_SECTORS_PER_BLOCK = 1 << 23  # defines the chunk ratio (spec 2.5)
SECTOR_BITMAP_BLOCK_SIZE = 1 * MiB
LOG_SECTOR_SIZE = 4 * KiB
DEFAULT_LOG_SIZE = 1 * MiB
ALIGNMENT = 1 * MiB              # every object in the file is 1 MiB aligned (spec 2.1)
SECTOR_SIZES = (512, 4096)

# --- Payload BAT entry states (spec 2.5.1.1) ---
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_UNMAPPED_V095 = 5  # pre-1.0 spec value, still found in old files (qemu accepts it)
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
# Payload states that read as zeros and get a new block on write (dynamic and
# fixed images); ZERO_STATES are those that read as zeros in a differencing
# image too (NOT_PRESENT reads from the parent there).
ABSENT_STATES = frozenset((PAYLOAD_BLOCK_NOT_PRESENT, PAYLOAD_BLOCK_UNDEFINED,
                           PAYLOAD_BLOCK_ZERO, PAYLOAD_BLOCK_UNMAPPED,
                           PAYLOAD_BLOCK_UNMAPPED_V095))
ZERO_STATES = ABSENT_STATES - {PAYLOAD_BLOCK_NOT_PRESENT}

# --- Sector bitmap BAT entry states (spec 2.5.1.2) ---
SB_BLOCK_NOT_PRESENT = 0
SB_BLOCK_PRESENT = 6

BAT_STATE_MASK = 0x7
BAT_OFFSET_SHIFT = 20            # FileOffsetMB occupies bits 20..63
BAT_OFFSET_MASK = ~((1 << BAT_OFFSET_SHIFT) - 1) & ((1 << 64) - 1)

# --- Region table entry flags (spec 2.2.3.2) ---
REGION_REQUIRED = 0x1

# --- Metadata table entry flags (spec 2.6.1.2) ---
META_IS_USER = 0x1
META_IS_VIRTUAL_DISK = 0x2
META_IS_REQUIRED = 0x4

# --- File parameters flags (spec 2.6.2.1) ---
PARAM_LEAVE_BLOCKS_ALLOCATED = 0x1
PARAM_HAS_PARENT = 0x2


def round_up(value: int, align: int) -> int:
    """``value`` rounded up to a multiple of ``align``."""
    return -(-value // align) * align


def _swap(raw: bytes) -> bytes:
    """Big-endian UUID bytes <-> Microsoft on-disk GUID bytes (an involution)."""
    return raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:]


def guid_to_bytes(value: uuid.UUID | str) -> bytes:
    """The 16 on-disk bytes of a GUID given as ``uuid.UUID`` or string."""
    if isinstance(value, str):
        text = value.strip().removeprefix("urn:").removeprefix("uuid:").strip("{}")
        raw = bytes.fromhex(text.replace("-", ""))
        if len(raw) != 16:
            raise ValueError("badly formed hexadecimal UUID string")
        return _swap(raw)
    return value.bytes_le


def guid_from_bytes(raw: bytes) -> uuid.UUID:
    """The ``uuid.UUID`` whose Microsoft on-disk form is ``raw``."""
    import uuid
    return uuid.UUID(bytes_le=bytes(raw))


def guid_str(raw: bytes) -> str:
    """``str(guid_from_bytes(raw))`` without a UUID object."""
    h = _swap(bytes(raw)).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_guid() -> bytes:
    """A random version-4 GUID in on-disk form (reads back as a v4 UUID),
    as ``uuid.uuid4().bytes_le``."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40          # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80          # RFC 4122 variant
    return _swap(bytes(raw))


ZERO_GUID = bytes(16)

# Known regions (spec 2.2.3.2)
BAT_GUID = guid_to_bytes("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = guid_to_bytes("8B7CA206-4790-4B9A-B8FE-575F050F886E")

# Known metadata items (spec 2.6.2)
FILE_PARAMETERS_GUID = guid_to_bytes("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = guid_to_bytes("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_DATA_GUID = guid_to_bytes("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE_GUID = guid_to_bytes("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE_GUID = guid_to_bytes("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = guid_to_bytes("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")

# Parent locator type for a VHDX parent (spec 2.6.2.6.3)
PARENT_LOCATOR_VHDX_GUID = guid_to_bytes("B04AEFB7-D19E-4A81-B789-25B8E9445913")
