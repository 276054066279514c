"""qcow2 constants (docs/interop/qcow2.txt), shared by every structure module."""

from __future__ import annotations

MAGIC = b"QFI\xfb"

MIN_CLUSTER_BITS = 9             # 512 bytes
MAX_CLUSTER_BITS = 21            # 2 MiB
DEFAULT_CLUSTER_SIZE = 1 << 16

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
V3_HEADER_LENGTH = 112           # qemu 7.2: + compression type byte, padded to 8

# qemu's caps on the tables it loads whole (qcow2.h); a header naming a bigger
# table is refused before anything is allocated.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOTS_SIZE = 1024 * MAX_SNAPSHOTS      # bytes of the whole snapshot table
MAX_SNAPSHOT_EXTRA_DATA = 1024
MAX_BACKING_FILE_NAME = 1023
MAX_CLUSTER_OFFSET = (1 << 56) - 1

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)

COMPAT_LAZY_REFCOUNTS = 1 << 0

AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

# Feature name table entry types.
FEAT_INCOMPAT, FEAT_COMPAT, FEAT_AUTOCLEAR = 0, 1, 2

# The table qemu 7.2 writes into every v3 header, in its order.
FEATURE_NAMES = (
    (FEAT_INCOMPAT, 0, "dirty bit"),
    (FEAT_INCOMPAT, 1, "corrupt bit"),
    (FEAT_INCOMPAT, 2, "external data file"),
    (FEAT_INCOMPAT, 3, "compression type"),
    (FEAT_INCOMPAT, 4, "extended L2 entries"),
    (FEAT_COMPAT, 0, "lazy refcounts"),
    (FEAT_AUTOCLEAR, 0, "bitmaps"),
    (FEAT_AUTOCLEAR, 1, "raw external data"),
)

COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2
